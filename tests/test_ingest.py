"""Ingest end to end on real files: a trained run, state-dict folders, incremental and killed ingests."""

from __future__ import annotations

import json
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
import torch
import xarray as xr
from safetensors.numpy import load_file
from safetensors.torch import save_file

import geostore
from geostore.cli import main
from geostore.family import tl_compat
from geostore.family.modular_addition import MODULAR_ADDITION, model_config
from geostore.ingestion import ingest
from geostore.store import schema
from geostore.store.writer import StoreWriter
from tests.conftest import ma_model, snapshot
from tests.terminal import run_on_terminal

ROOT = Path(__file__).resolve().parents[1]


def state_dict_dir(directory: Path, epochs, *, config=None, seed: int = 0, suffix: str = ".safetensors") -> dict:
    """Real HookedTransformer-layout state dicts (as `geostore train` writes on every TransformerLens), one file per
    epoch; returns {epoch: state_dict}."""
    config = config or model_config(7, d_model=16, n_heads=2)
    directory.mkdir(parents=True, exist_ok=True)
    model = MODULAR_ADDITION.model(config).build(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for epoch in epochs:
        state = {k: (v + 0.01 * epoch * torch.randn(v.shape, generator=generator)).contiguous()
                 for k, v in tl_compat.hooked_state(model).items()}
        if suffix == ".safetensors":
            save_file(state, directory / f"model_step{epoch}.safetensors")
        else:
            torch.save(state, directory / f"ckpt_{epoch}{suffix}")
        states[epoch] = state
    return states


def test_trained_run_ingests_bit_equal_with_metrics_and_split(trained_run, tmp_path):
    store_path = tmp_path / "run.zarr"
    report = ingest(trained_run, store_path, progress=False)
    run = json.loads((trained_run / "run.json").read_text())
    assert report.kind == "geostore-run" and report.added == len(run["checkpoints"]) == 9

    store = geostore.open_store(store_path)
    np.testing.assert_array_equal(store.epochs, [c["epoch"] for c in run["checkpoints"]])
    for index, entry in enumerate(run["checkpoints"]):
        tensors = load_file(trained_run / entry["file"])
        for parameter in store.table.parameters:  # layered ones: the blocks' entries stacked along `layer`
            expected = np.stack([tensors[key] for key in parameter.keys]) if parameter.layered else tensors[
                parameter.keys[0]]
            got = store.params[parameter.name][index].compute()
            assert got.shape == expected.shape and got.tobytes() == expected.tobytes(), (entry["epoch"], parameter)
        assert {key for p in store.table.parameters for key in p.keys} == set(tensors)
    metrics = store.metrics()
    for name in schema.METRICS:
        np.testing.assert_array_equal(metrics[name], [c[name] for c in run["checkpoints"]])
    mask = store.train_mask().reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(mask), run["task"]["train_indices"])
    assert store.family == "modular_addition" and store.model.family == "modular_addition"
    assert {k: store.config[k] for k in run["model_config"]} == run["model_config"]
    assert store.task["p"] == 11 and store.task["data_seed"] == run["task"]["data_seed"]
    assert store.sources == [{"kind": "geostore-run", "path": str(trained_run.resolve())}]

    ds = xr.open_zarr(store_path)
    assert np.all(np.diff(ds["epoch"].values) > 0)
    assert set(store.table.names) <= set(ds.data_vars)
    assert ds["W_Q"].dims == ("epoch", "layer", "n_heads", "d_model", "d_head")
    # The model of the last epoch, rebuilt from the store, scores what training recorded.
    from geostore.family import modular_addition as fam

    tokens, labels = fam.probe(11)
    with torch.no_grad():
        logits = store.model_at(int(store.epochs[-1]))(tokens)
    test = ~mask
    assert fam.loss(logits[test], labels[test], 11).item() == pytest.approx(run["checkpoints"][-1]["test_loss"],
                                                                               rel=1e-5)
    acc = (logits[:, -1, :11].argmax(-1) == labels).numpy()[test].mean()
    assert acc == pytest.approx(run["checkpoints"][-1]["test_accuracy"], abs=1e-6)


def test_reingest_adds_only_missing_epochs_and_inserts_in_order(tmp_path):
    full = tmp_path / "full"
    states = state_dict_dir(full, [0, 10, 20, 30, 40, 50])
    partial = tmp_path / "partial"
    partial.mkdir()
    for epoch in (10, 30, 40):
        shutil.copy(full / f"model_step{epoch}.safetensors", partial)

    store_path = tmp_path / "s.zarr"
    assert ingest(partial, store_path, progress=False).added == 3
    before = geostore.open_store(store_path).params["W_in"].compute()
    for epoch in (0, 20, 50):
        shutil.copy(full / f"model_step{epoch}.safetensors", partial)
    report = ingest(partial, store_path, progress=False)
    assert (report.added, report.skipped, report.total) == (3, 3, 6)
    store = geostore.open_store(store_path)
    np.testing.assert_array_equal(store.epochs, [0, 10, 20, 30, 40, 50])
    w_in = store.params["W_in"].compute()
    for i, epoch in enumerate(store.epochs):
        assert w_in[i, 0].tobytes() == states[epoch]["blocks.0.mlp.W_in"].numpy().tobytes()
    assert w_in[[1, 3, 4]].tobytes() == before.tobytes()
    assert ingest(partial, store_path, progress=False).added == 0


def test_pt_files_and_wrapped_state_dicts_ingest(tmp_path):
    source = tmp_path / "pt"
    states = state_dict_dir(source, [3, 1, 2], suffix=".pt")
    torch.save({"model_state_dict": states[2], "optimizer": {}}, source / "ckpt_2.pt")
    store = geostore.open_store(ingest(source, tmp_path / "s.zarr", progress=False) and tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.epochs, [1, 2, 3])
    assert store.params["W_E"][1].compute().tobytes() == states[2]["embed.W_E"].numpy().tobytes()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geostore.cli", *args], capture_output=True, text=True, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_input_is_one_line_non_zero_and_leaves_the_store_unchanged(tmp_path):
    good = tmp_path / "good"
    state_dict_dir(good, [0, 10, 20])
    store_path = tmp_path / "s.zarr"
    assert main(["ingest", str(good), str(store_path), "--quiet"]) == 0
    before = snapshot(store_path)

    # A truncated checkpoint among good new ones: nothing of this ingest may remain.
    bad = tmp_path / "bad"
    state_dict_dir(bad, [0, 10, 20, 30, 40, 50])
    truncated = bad / "model_step40.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert_one_line_error(run_cli("ingest", str(bad), str(store_path)), str(truncated))
    assert snapshot(store_path) == before

    # Shapes that differ between checkpoints.
    mixed = tmp_path / "mixed"
    state_dict_dir(mixed, [0, 10, 20])
    state_dict_dir(mixed, [30], config=model_config(7, d_model=32, n_heads=2))
    assert_one_line_error(run_cli("ingest", str(mixed), str(store_path)), "model_step30.safetensors")
    assert snapshot(store_path) == before

    # A store of another model is refused before anything is written.
    other = tmp_path / "other"
    state_dict_dir(other, [60], config=model_config(11, d_model=16, n_heads=2))
    assert_one_line_error(run_cli("ingest", str(other), str(store_path)), str(store_path), "another model")
    assert snapshot(store_path) == before

    # Missing and empty sources; a target that is not a store.
    assert_one_line_error(run_cli("ingest", str(tmp_path / "nope"), str(store_path)), str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("ingest", str(tmp_path / "empty"), str(store_path)), str(tmp_path / "empty"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    assert_one_line_error(run_cli("ingest", str(good), str(notes)), str(notes), "not a geostore store")
    assert [p.name for p in notes.iterdir()] == ["a.txt"]
    assert snapshot(store_path) == before


def test_failed_first_ingest_leaves_no_store_behind(tmp_path):
    bad = tmp_path / "bad"
    state_dict_dir(bad, [0, 10])
    (bad / "model_step10.safetensors").write_bytes(b"\x00" * 10)
    assert main(["ingest", str(bad), str(tmp_path / "new.zarr"), "--quiet"]) != 0
    assert not (tmp_path / "new.zarr").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    source = tmp_path / "evil"
    state_dict_dir(source, [0], suffix=".pt")
    torch.save({"state_dict": _Evil()}, source / "ckpt_5.pt")
    result = subprocess.run([sys.executable, "-m", "geostore.cli", "ingest", str(source), str(tmp_path / "s.zarr")],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(result, str(source / "ckpt_5.pt"))
    assert not (tmp_path / "PWNED_MARKER").exists()
    assert not (tmp_path / "s.zarr").exists()


def committed(store: Path) -> int:
    """Epochs in the commit record (the root zarr.json), read without zarr."""
    try:
        meta = json.loads((store / "zarr.json").read_text())
    except ValueError:
        return -1
    return meta["consolidated_metadata"]["metadata"]["epoch"]["shape"][0]


def test_sigkilled_ingest_shows_whole_epochs_and_resumes_to_the_same_store(tmp_path):
    config = model_config(23, d_model=32, n_heads=4)
    source = tmp_path / "run"
    states = state_dict_dir(source, range(0, 2000, 10), config=config)
    task = {"family": "modular_addition", "p": 23}

    def fresh(path: Path) -> None:  # small chunks: many commits, so kills land between and inside them
        StoreWriter.open(path, model=ma_model(config), task=task, chunk_epochs=8)

    reference = tmp_path / "reference.zarr"
    fresh(reference)
    assert main(["ingest", str(source), str(reference), "--quiet", "--no-flatness"]) == 0

    store_path = tmp_path / "killed.zarr"
    fresh(store_path)
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = []
    for _ in range(4):
        start = committed(store_path)
        proc = subprocess.Popen([sys.executable, "-m", "geostore.cli", "ingest", str(source), str(store_path),
                                 "--quiet", "--no-flatness"],  # weights alone: test_landscape kills flatness
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while committed(store_path) == start and proc.poll() is None:  # wait until it is writing
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.01))  # then kill it at a random moment
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            break  # it finished before the kill: nothing more to interrupt
        store = geostore.open_store(store_path)
        seen.append(store.epochs.size)
        ds = xr.open_zarr(store_path)
        assert ds.sizes["epoch"] == store.epochs.size
        for i, epoch in enumerate(store.epochs):  # every visible epoch is whole and exact
            assert store.params["W_out"][i, 0].compute().tobytes() == states[epoch]["blocks.0.mlp.W_out"].numpy(
            ).tobytes()
            assert store.params["b_U"][i].compute().tobytes() == states[epoch]["unembed.b_U"].numpy().tobytes()
    assert sum(0 < n < len(states) for n in seen) >= 2, seen  # kills landed mid-ingest
    assert main(["ingest", str(source), str(store_path), "--quiet", "--no-flatness"]) == 0
    assert snapshot(store_path) == snapshot(reference), f"epochs visible after each kill: {seen}"


def test_ingest_shows_a_progress_bar_on_a_terminal(tmp_path):
    source = tmp_path / "run"
    state_dict_dir(source, [0, 1, 2])
    code, text = run_on_terminal("ingest", str(source), str(tmp_path / "s.zarr"), "--directions", "4")
    assert code == 0
    assert "ingest" in text and "3/3" in text and "ckpt/s" in text and "dir/s" in text


def test_arena_bundle_ingests_into_the_exact_original_model(tmp_path):
    from checkpoint_factories import (
        arena_trajectory,
        metrics_of,
        original_forward,
        to_original_layout,
        write_arena_bundle,
    )

    traj = arena_trajectory(p=7, epochs=(0, 100, 200))
    bundle = write_arena_bundle(tmp_path / "arena" / "full_run_data.pth", traj)
    assert main(["ingest", str(bundle.parent), str(tmp_path / "a.zarr"), "--quiet"]) == 0
    store = geostore.open_store(tmp_path / "a.zarr")
    np.testing.assert_array_equal(store.epochs, [0, 100, 200])
    assert store.config["d_vocab_out"] == 8 and store.task["p"] == 7
    tokens = torch.tensor([[a, b, 7] for a in range(7) for b in range(7)])
    for epoch in store.epochs:
        with torch.no_grad():
            ours = store.model_at(int(epoch))(tokens)
            theirs = original_forward(to_original_layout(traj[int(epoch)]), tokens)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(store.metrics()["train_loss"], [metrics_of(e)["train_loss"] for e in store.epochs])


def test_miscope_variant_ingests_metrics_and_split(tmp_path):
    from checkpoint_factories import metrics_of, tiny_config, trajectory, write_miscope_variant

    config = tiny_config()
    traj = trajectory(config, (0, 5, 50), biases="none")
    variant = write_miscope_variant(tmp_path / "modulo_addition_1layer_p7_seed3_dseed5", traj)
    assert main(["ingest", str(variant), str(tmp_path / "m.zarr"), "--quiet"]) == 0
    store = geostore.open_store(tmp_path / "m.zarr")
    np.testing.assert_array_equal(store.epochs, [0, 5, 50])
    for i, epoch in enumerate(store.epochs):
        assert store.params["W_Q"][i].compute().tobytes() == traj[int(epoch)]["W_Q"].tobytes()
    np.testing.assert_array_equal(store.metrics()["test_loss"], [metrics_of(e)["test_loss"] for e in (0, 5, 50)])
    from geostore.family.modular_addition import split

    np.testing.assert_array_equal(np.flatnonzero(store.train_mask().reshape(-1)), split(7, 0.3, 5))
    assert store.sources[0]["kind"] == "miscope"
