"""Flatness in the store: computed by ingest and by `geostore flatness`, deterministic however it was run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import geostore
from geostore.cli import main
from geostore.family.modular_addition import model_config
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings
from tests.conftest import snapshot
from tests.terminal import run_on_terminal
from tests.test_ingest import assert_one_line_error, run_cli, state_dict_dir

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = FlatnessSettings(n_directions=6, epsilon=0.1, seed=3)


def flatness_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    store = geostore.open_store(path)
    flatness = store.analysis("flatness")
    return flatness["baseline_loss"].values, flatness["delta_losses"].values


def test_ingest_stores_flatness_of_every_epoch_equal_to_the_plain_forward(trained_run, tmp_path):
    from tests.test_flatness import seed_reference

    path = tmp_path / "run.zarr"
    ingest(trained_run, path, flatness=SETTINGS, progress=False)
    store = geostore.open_store(path)
    settings = store.analysis_settings("flatness")
    assert (settings["epsilon"], settings["n_directions"], settings["seed"]) == (0.1, 6, 3)
    # the loss is the family's (modular addition: cross-entropy on the full grid), named generically since format 2
    assert "family's loss on its probe" in settings["loss"] and "unit L2 norm" in settings["directions"]
    baseline, deltas = flatness_of(path)
    assert deltas.shape == (store.epochs.size, 6) and np.isfinite(deltas).all()
    for index in (0, store.epochs.size // 2, store.epochs.size - 1):  # the seed's algorithm, epoch by epoch
        reference = seed_reference(store.model_at(int(store.epochs[index])), store.model, n_directions=6, seed=3)
        assert baseline[index] == pytest.approx(reference["baseline_loss"], rel=1e-5)
        # The float32 reference resolves a loss difference only to a few ulp of the loss itself
        # (test_flatness.py checks the fast path against a float64 forward at 1e-4).
        np.testing.assert_allclose(deltas[index], reference["delta_losses"], rtol=1e-4,
                                   atol=8 * np.finfo(np.float32).eps * baseline[index])

    summary = store.flatness_summary()
    np.testing.assert_array_equal(summary["mean_delta_loss"], deltas.mean(axis=1))
    np.testing.assert_array_equal(summary["max_delta_loss"], deltas.max(axis=1))
    np.testing.assert_array_equal(summary["p90_delta_loss"], np.percentile(deltas, 90, axis=1))
    np.testing.assert_array_equal(summary["flatness_ratio"], (deltas < 0.1 * baseline[:, None]).mean(axis=1))
    np.testing.assert_array_equal(summary["baseline_loss"], baseline)
    assert "flatness" in store.describe()


def test_flatness_is_bit_identical_however_epochs_arrive(tmp_path):
    full = tmp_path / "full"
    state_dict_dir(full, [0, 10, 20, 30, 40, 50])
    one_go = tmp_path / "one_go.zarr"
    ingest(full, one_go, flatness=SETTINGS, progress=False)

    partial = tmp_path / "partial"  # late epochs first, then the rest inserted before and between them
    partial.mkdir()
    for epoch in (30, 50):
        shutil.copy(full / f"model_step{epoch}.safetensors", partial)
    in_parts = tmp_path / "in_parts.zarr"
    ingest(partial, in_parts, flatness=SETTINGS, progress=False)
    ingest(full, in_parts, flatness=SETTINGS, progress=False)

    weights_first = tmp_path / "weights_first.zarr"  # weights alone, flatness later from the store
    ingest(full, weights_first, flatness=None, progress=False)
    assert geostore.open_store(weights_first).analyses() == []
    assert main(["flatness", str(weights_first), "--directions", "6", "--seed", "3", "--quiet"]) == 0

    expected = flatness_of(one_go)
    for path in (in_parts, weights_first):
        for got, want in zip(flatness_of(path), expected, strict=True):
            assert got.tobytes() == want.tobytes(), path.name
    seeded_other = tmp_path / "other_seed.zarr"
    ingest(full, seeded_other, flatness=FlatnessSettings(n_directions=6, seed=4), progress=False)
    assert not np.array_equal(flatness_of(seeded_other)[1], expected[1])


def test_other_settings_are_refused_unless_recomputed(tmp_path, capsys):
    source = tmp_path / "run"
    state_dict_dir(source, [0, 10, 20])
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(source), str(path), "--directions", "4", "--quiet"]) == 0
    before = snapshot(path)
    assert_one_line_error(run_cli("ingest", str(source), str(path), "--epsilon", "0.2"),
                          str(path), "holds flatness with epsilon=0.1, n_directions=4")
    assert_one_line_error(run_cli("flatness", str(path), "--directions", "5"), str(path), "recompute")
    assert snapshot(path) == before
    capsys.readouterr()
    assert main(["flatness", str(path), "--directions", "5", "--recompute", "--quiet"]) == 0
    assert "flatness computed for 3 epochs" in capsys.readouterr().out
    store = geostore.open_store(path)
    flatness = store.analysis("flatness")
    assert flatness.attrs["n_directions"] == 5 and np.isfinite(flatness["delta_losses"]).all()
    assert main(["flatness", str(path), "--directions", "5", "--quiet"]) == 0
    assert "computed for 0 epochs (3 already complete)" in capsys.readouterr().out

    assert_one_line_error(run_cli("flatness", str(tmp_path / "missing.zarr")), "missing.zarr", "no such store")
    assert_one_line_error(run_cli("flatness", str(path), "--epsilon", "-1"), "--epsilon")
    assert snapshot(path) != before  # (recomputed above) and unchanged by the refused calls since


def completed(path: Path) -> int:
    store = geostore.open_store(path)
    return int(np.isfinite(store.analysis("flatness")["baseline_loss"].values).sum()) if store.analyses() else 0


def test_killed_flatness_keeps_whole_epochs_and_resumes_to_the_same_values(tmp_path):
    config = model_config(53, d_model=64, n_heads=4)  # the demo's size: ~1 s of flatness for 40 epochs
    source = tmp_path / "run"
    state_dict_dir(source, range(0, 400, 10), config=config)
    reference = tmp_path / "reference.zarr"
    ingest(source, reference, flatness=None, progress=False)
    killed = tmp_path / "killed.zarr"
    shutil.copytree(reference, killed)
    args = ["flatness", "--directions", "20", "--quiet"]
    assert main([args[0], str(reference), *args[1:]]) == 0
    want_baseline, want_deltas = flatness_of(reference)

    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "geostore.cli", args[0], str(killed), *args[1:]], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = completed(killed)
        while completed(killed) == start and proc.poll() is None:  # wait until it is writing
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # then kill it at a random moment
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            break
        baseline, deltas = flatness_of(killed)
        done = np.isfinite(baseline)
        seen.append(int(done.sum()))
        assert np.isnan(deltas[~done]).all()  # an epoch shows whole or not at all
        assert baseline[done].tobytes() == want_baseline[done].tobytes()
        assert deltas[done].tobytes() == want_deltas[done].tobytes()
    assert any(0 < n < 40 for n in seen), seen
    assert main([args[0], str(killed), *args[1:]]) == 0
    assert snapshot(killed) == snapshot(reference), seen


def test_flatness_progress_shows_rates_and_eta_on_a_terminal(tmp_path):
    source = tmp_path / "run"
    state_dict_dir(source, [0, 1, 2, 3])
    path = tmp_path / "s.zarr"
    ingest(source, path, flatness=None, progress=False)
    code, text = run_on_terminal("flatness", str(path), "--directions", "8")
    assert code == 0
    assert "flatness" in text and "4/4" in text and "ckpt/s" in text and "dir/s" in text and "<" in text
