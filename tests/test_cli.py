"""The `geostore` and `geoview` commands: start-up cost, messages, exit codes, `info`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from geostore.cli import main
from geostore.store.writer import StoreWriter
from tests.conftest import random_params

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_info_start_without_torch_transformer_lens_or_dask(tmp_path, tiny_model):
    StoreWriter.open(tmp_path / "s.zarr", model=tiny_model, task={"family": "modular_addition", "p": 7}).append(
        [0], random_params(tiny_model, [0]))
    probe = (
        "import sys\n"
        "from geostore.cli import main\n"
        f"main(['info', {str(tmp_path / 's.zarr')!r}])\n"
        "heavy = [m for m in ('torch', 'transformer_lens', 'dask.array', 'xarray', 'PySide6') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "HEAVY []" in out.stdout
    help_out = subprocess.run([sys.executable, "-m", "geostore.cli", "--help"], capture_output=True, text=True,
                              check=True, cwd=ROOT)
    for command in ("train", "ingest", "info", "families"):
        assert command in help_out.stdout


def test_info_describes_the_store(tmp_path, tiny_model, capsys):
    from geostore.family.modular_addition import grid_split

    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, model=tiny_model, task={"family": "modular_addition", "p": 7},
                              split=grid_split(7, np.arange(20)))
    writer.record_source({"kind": "state-dict-dir", "path": "/data/run"})
    writer.append([0, 50, 100], random_params(tiny_model, range(3)), {"test_loss": np.ones(3)})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 stored, 0..100" in out
    for name in tiny_model.table.names:
        assert re.search(rf"^  {re.escape(name)}\s", out, re.M), name
    assert re.search(r"^  W_in  \(1, 16, 64\) +layer=1, d_model=16, d_mlp=64$", out, re.M)  # one layer, stacked
    assert re.search(r"^  b_in  \(1, 64\) .*\(frozen\)$", out, re.M)
    assert f"9 trainable parameters hold {tiny_model.table.n_trainable():,} numbers per epoch" in out
    assert "embedding: W_E, W_pos, W_U; attention: W_Q, W_K, W_V, W_O; mlp: W_in, W_out" in out
    assert "test_loss" in out and "train_loss" not in out
    assert "20 of 49 examples" in out
    assert "state-dict-dir: /data/run" in out
    assert "on disk" in out and "analyses    none stored yet" in out


def test_families_lists_the_built_in_families(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert "modular_addition" in out and "hooked_transformer" in out


def test_info_on_bad_paths_is_one_line_and_non_zero(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for target, message in [(tmp_path / "missing", "no such store"), (tmp_path, "not a geostore store"),
                            (tmp_path / "file.txt", "not a geostore store")]:
        assert main(["info", str(target)]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(target) in err


def test_geoview_refuses_a_non_store_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "viewer.app", str(tmp_path / "nope")], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "no such store" in out.stderr and "Traceback" not in out.stderr
