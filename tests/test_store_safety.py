"""Damage is detected, failures roll back, every error is one line (issue 12).

A corpus of broken stores runs through every `geostore` command: each exits non-zero with one line naming
the store and what is wrong, and leaves the store byte-identical. Failures that are not geostore errors
(MemoryError, KeyboardInterrupt) leave the store as it was; object-store failures are one line too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import geostore
from geostore.cli import main
from geostore.errors import GeostoreWarning, StoreError
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings
from geostore.store.integrity import StoreDamagedError, check
from geostore.store.location import Location
from tests.checkpoint_factories import config_json, write_state_dict_dir
from tests.conftest import snapshot
from tests.test_concurrency import CONFIG, MODEL, labelled, labelled_source

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = FlatnessSettings(n_directions=2, seed=1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small store (20 epochs in chunks of 4, flatness with 2 directions) and a source of later epochs."""
    root = tmp_path_factory.mktemp("pristine")
    rng = np.random.default_rng(0)
    traj = {e: {n: v + rng.standard_normal(v.shape).astype(np.float32) for n, v in p.items()}
            for e, p in labelled(range(0, 200, 10)).items()}
    source = write_state_dict_dir(root / "src", traj, config=CONFIG, config_file=config_json(CONFIG))
    from geostore.store.writer import StoreWriter

    StoreWriter.open(root / "s.zarr", model=MODEL, task={}, chunk_epochs=4).close()  # small chunks
    ingest(source, root / "s.zarr", flatness=SETTINGS, progress=False)
    later = labelled_source(root / "later", range(300, 320, 10))
    return root / "s.zarr", later


def store_copy(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine store to change."""
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def fail_on_call(monkeypatch, module, name: str, call: int, error: type[BaseException]) -> None:
    """Make `module.name` raise `error` on its `call`-th call (the calls before run the real function)."""
    real, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def damaged_copy(pristine, tmp_path, damage: str) -> Path:
    store = store_copy(pristine, tmp_path)
    chunk = store / "W_in" / "c" / "1" / "0" / "0" / "0"  # (epoch, layer, d_model, d_mlp) chunk keys
    if damage == "missing W_in chunk":
        chunk.unlink()
    elif damage == "truncated W_in chunk":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif damage == "flipped byte in W_in chunk":
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0x40
        chunk.write_bytes(bytes(data))
    elif damage == "deleted epoch/c/0":
        (store / "epoch" / "c" / "0").unlink()
    elif damage == "garbage W_E/zarr.json":
        (store / "W_E" / "zarr.json").write_text("{ not json")
    elif damage == "garbage root zarr.json":
        (store / "zarr.json").write_bytes(b"\x00\x01garbage")
    elif damage == "non-integer format version":
        root = json.loads((store / "zarr.json").read_text())
        root["attributes"]["geostore"]["version"] = "1.x"
        (store / "zarr.json").write_text(json.dumps(root))
    else:
        raise AssertionError(damage)
    return store


DAMAGES = ["missing W_in chunk", "truncated W_in chunk", "flipped byte in W_in chunk", "deleted epoch/c/0",
           "garbage W_E/zarr.json", "garbage root zarr.json", "non-integer format version"]
COMMANDS = {
    "info": lambda s, later: ["info", s],
    "check": lambda s, later: ["check", s],
    "pca": lambda s, later: ["pca", s, "--components", "2"],
    "velocity": lambda s, later: ["velocity", s],
    "flatness": lambda s, later: ["flatness", s, "--recompute", "--directions", "3", "--quiet"],
    "ingest": lambda s, later: ["ingest", later, s, "--quiet", "--directions", "2", "--seed", "1"],
}
# A flipped byte keeps the chunk's size: the quick check writers and `info` run (presence, sizes) cannot see
# it; every read of the chunk and `geostore check` do (flatness --recompute would drop the old values before
# reading it: see the README on recompute). A garbage array `zarr.json` is the writers' metadata: readers
# read through the commit record, which holds a good copy, so `pca` and `velocity` still answer correctly.
QUICK_BLIND = {("flipped byte in W_in chunk", c) for c in ("info", "ingest", "flatness")} | {
    ("garbage W_E/zarr.json", c) for c in ("pca", "velocity")}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_on_a_damaged_store_fails_with_one_line_and_changes_nothing(
        pristine, tmp_path, capsys, damage, command):
    if (damage, command) in QUICK_BLIND:
        pytest.skip("needs a full read; `geostore check` finds it")
    store = damaged_copy(pristine[0], tmp_path, damage)
    before = snapshot(store)
    capsys.readouterr()
    code = main(COMMANDS[command](str(store), str(pristine[1])))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    lines = [line for line in err if line.startswith("geostore: error")]
    assert len(lines) == 1 and str(store) in lines[0], err
    if command != "check":  # check lists every problem, then its one error line
        assert len(err) == 1, err
    assert snapshot(store) == before


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_viewer_on_a_damaged_store_says_so_in_one_line_and_changes_nothing(pristine, tmp_path, capsys, damage):
    """Damage the viewer meets on opening is its one-line error; damage a dock meets while loading shows in that
    dock, and a rendering exits non-zero with it. A garbage array `zarr.json` is not read (see QUICK_BLIND)."""
    from viewer.app import main as geoview

    store = damaged_copy(pristine[0], tmp_path, damage)
    before = snapshot(store)
    capsys.readouterr()
    code = geoview([str(store), "--screenshot", str(tmp_path / "shot.png")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("geoview")]
    if damage == "garbage W_E/zarr.json":
        assert code == 0 and not err
    else:
        assert code != 0 and len(err) == 1 and err[0].startswith("geoview: error: ") and str(store) in err[0], err
    if damage.endswith("W_in chunk"):
        assert "W_in" in err[0] and "epochs 40..70" in err[0]
    assert {k: v for k, v in snapshot(store).items() if not k.startswith("derived/")} == before  # PCA cached


@pytest.mark.parametrize("damage", ["missing W_in chunk", "truncated W_in chunk", "flipped byte in W_in chunk"])
def test_reading_a_damaged_chunk_names_the_array_and_epochs(pristine, tmp_path, damage):
    store = damaged_copy(pristine[0], tmp_path, damage)
    opened = geostore.open_store(store)
    with pytest.raises(StoreDamagedError, match=r"W_in chunk W_in/c/1/0/0/0 .*\(epochs 40\.\.70\)"):
        opened.params["W_in"].compute()
    with pytest.raises(StoreDamagedError):
        opened.model_at(50)
    opened.params_at(30)  # the intact chunks still read
    report = check(Location.of(store), deep=True)
    assert len(report.problems) == 1 and "W_in/c/1/0/0" in report.problems[0]


def test_a_deleted_epoch_chunk_is_never_read_as_epochs_minus_one_nor_extended(pristine, tmp_path):
    store = damaged_copy(pristine[0], tmp_path, "deleted epoch/c/0")
    with pytest.raises(StoreDamagedError, match="epoch chunk epoch/c/0 is missing"):
        geostore.open_store(store)
    with pytest.raises(StoreDamagedError):
        ingest(pristine[1], store, flatness=None, progress=False)


def test_a_pristine_store_checks_clean(pristine, capsys):
    assert main(["check", str(pristine[0])]) == 0
    assert "ok (20 epochs" in capsys.readouterr().out


# ----------------------------------------------------------------------------- failures roll back
def test_an_impossible_direction_count_is_refused_before_anything_is_written(pristine, tmp_path, capsys):
    store = store_copy(pristine[0], tmp_path)
    before = snapshot(store)
    assert main(["flatness", str(store), "--directions", "100000000", "--recompute", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--directions 100000000" in err[0] and "memory" in err[0], err
    assert snapshot(store) == before
    assert geostore.open_store(store).analysis_settings("flatness")["n_directions"] == 2


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt, ZeroDivisionError])
def test_any_exception_during_flatness_leaves_the_store_as_it_was(pristine, tmp_path, capsys, monkeypatch, error):
    """The break: a MemoryError after the settings were committed left them recorded for good."""
    import geostore.landscape as landscape

    store = store_copy(pristine[0], tmp_path)
    before = snapshot(store)

    def boom(*args, **kwargs):
        raise error()

    monkeypatch.setattr(landscape, "epoch_landscape", boom)
    code = main(["flatness", str(store), "--antithetic", "--quiet"])  # enables a new analysis, then fails
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert snapshot(store) == before
    assert "antithetic" not in geostore.open_store(store).analyses()


def test_a_failed_recompute_puts_the_old_values_back(pristine, tmp_path, capsys, monkeypatch):
    """The break: `--recompute` dropped the stored values first, so a failure midway lost them for good."""
    import geostore.landscape as landscape

    store = store_copy(pristine[0], tmp_path)
    before = snapshot(store)
    real = landscape.epoch_landscape
    monkeypatch.setattr(landscape, "FLUSH_SECONDS", 0.0)
    fail_on_call(monkeypatch, landscape, "epoch_landscape", 5, MemoryError)  # after 4 epochs of new values
    assert main(["flatness", str(store), "--recompute", "--directions", "3", "--quiet"]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert snapshot(store) == before
    assert geostore.open_store(store).analysis_settings("flatness")["n_directions"] == 2
    monkeypatch.setattr(landscape, "epoch_landscape", real)  # and a recompute that succeeds leaves nothing aside
    assert main(["flatness", str(store), "--recompute", "--directions", "3", "--quiet"]) == 0
    assert not (store / "_replaced").exists() and check(Location.of(store), deep=True).ok
    assert geostore.open_store(store).analysis("flatness")["delta_losses"].shape[1] == 3


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_any_exception_during_ingest_rolls_back_appended_batches(pristine, tmp_path, monkeypatch, error):
    import geostore.ingestion as ingest_module

    store = store_copy(pristine[0], tmp_path)
    before = snapshot(store)
    source = labelled_source(tmp_path / "more", range(300, 400, 10))  # 10 epochs: 3 batches of 4 here
    fail_on_call(monkeypatch, ingest_module, "_load", 3, error)  # the first batch is committed before this
    with pytest.raises(error):
        ingest(source, store, flatness=None, progress=False)
    assert snapshot(store) == before


def test_a_new_store_whose_ingest_fails_is_removed_and_unlocked(tmp_path, monkeypatch):
    import geostore.ingestion as ingest_module

    monkeypatch.setattr(ingest_module, "_write_new_epochs", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        ingest(labelled_source(tmp_path / "src", [0, 1]), tmp_path / "new.zarr", flatness=None, progress=False)
    assert not (tmp_path / "new.zarr").exists()


# ------------------------------------------------------------------------------ one-line errors
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, env: dict) -> tuple[int, list[str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    proc = subprocess.run([sys.executable, "-m", "geostore.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**base, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                               "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1", **env}, timeout=120)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("case", ["no credentials", "dead endpoint"])
def test_object_store_failures_are_one_line(case, pristine):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {"AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    if case == "dead endpoint":
        env.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    for args in (["info", "s3://bucket/run.zarr"], ["ingest", str(pristine[1]), "s3://bucket/run.zarr", "--quiet"]):
        code, err = run_cli(*args, env=env)
        assert code != 0 and len(err) == 1, err
        assert "s3://bucket/run.zarr" in err[0]
        assert ("no credentials" in err[0]) if case == "no credentials" else ("cannot reach" in err[0]), err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--lr", "0", "lr > 0"), ("--p", "0", "p=0"), ("--train-fraction", "0", "train_fraction"),
    ("--n-heads", "0", "n_heads=0"), ("--d-model", "0", "d_model=0"),
])
def test_train_takes_zero_as_a_value_and_refuses_it_in_one_line(tmp_path, capsys, option, value, message):
    assert main(["train", str(tmp_path / "run"), option, value, "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_train_runs_zero_epochs_when_asked(tmp_path, monkeypatch):
    import geostore.family.train_modular_addition as train_module

    seen = {}

    def fake_train(spec, out, **kwargs):
        seen["spec"] = spec
        raise StoreError("stop")

    monkeypatch.setattr(train_module, "train", fake_train)
    main(["train", str(tmp_path / "run"), "--epochs", "0", "--weight-decay", "0", "--seed", "0"])
    assert seen["spec"].epochs == 0 and seen["spec"].weight_decay == 0


# ----------------------------------------------------------------------- what ingest reports
def test_nonfinite_weights_are_stored_reported_and_their_nan_landscape_recorded_as_complete(tmp_path, capsys):
    traj = labelled(range(0, 50, 10))
    traj[20]["W_in"][0, 0, 0] = np.nan
    traj[30]["W_E"][1, 1] = np.inf
    source = write_state_dict_dir(tmp_path / "src", traj, config=CONFIG, config_file=config_json(CONFIG))
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(source), str(store), "--directions", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("geostore: warning")]
    assert len(warnings) == 2 and all("NaN or infinite" in w for w in warnings), captured.err
    assert "20, 30" in warnings[0]
    assert "computed for 3 epochs" in captured.out
    opened = geostore.open_store(store)
    assert np.isnan(opened.params_at(20)["W_in"][0, 0, 0])
    # completion is recorded apart from the values: NaN is the landscape at NaN weights, not "not computed"
    np.testing.assert_array_equal(opened.analysis_epochs("flatness"), [0, 10, 20, 30, 40])
    baseline = opened.analysis("flatness")["baseline_loss"].values
    assert np.isnan(baseline[[2, 3]]).all() and np.isfinite(baseline[[0, 1, 4]]).all()
    assert main(["flatness", str(store), "--quiet"]) == 0
    assert "computed for 0 epochs" in capsys.readouterr().out  # nothing left to do


def test_float64_checkpoints_are_rounded_with_one_warning_line(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    from tests.checkpoint_factories import tl_state_dict

    for epoch, params in labelled([0, 10, 20]).items():
        state = {k: v.to(torch.float64) for k, v in tl_state_dict(params, CONFIG).items()}
        state = {k: (v + 1e-12) if v.is_floating_point() else v for k, v in state.items()}
        torch.save(state, source / f"ckpt_{epoch}.pt")
    (source / "config.json").write_text(json.dumps(config_json(CONFIG)))
    assert main(["ingest", str(source), str(tmp_path / "s.zarr"), "--no-flatness", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("geostore: warning")]
    assert len(warnings) == 1 and "float64" in warnings[0] and "3 epochs" in warnings[0], warnings
    with pytest.warns(GeostoreWarning, match="float64"):
        ingest(source, tmp_path / "t.zarr", flatness=None, progress=False)
