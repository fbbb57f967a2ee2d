"""Watching training live: the Recorder writes epochs as a run trains, readers and `flatness --follow` pick them up.

Real stores on disk, a real reader thread polling `open_store` while the Recorder commits, a real (tiny) training
run compared with an ingest of the run directory it wrote.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import random_params, snapshot

import geostore
from geostore.cli import main
from geostore.family.train_modular_addition import train_into_store
from geostore.follow import follow_compute
from geostore.recorder import Recorder

N_EPOCHS = 10


def _recorder(path, model, config):
    return Recorder(path, family="modular_addition", config=config, task={"p": 7, "data_seed": 3},
                    train_indices=np.arange(0, 49, 2))


def _state(model, params, i):
    """Epoch `i` of `random_params` as a HookedTransformer state dict (what a training loop's model gives)."""
    return model.table.state_dict({name: value[i] for name, value in params.items()})


def _metrics(i):
    return {"train_loss": 1.0 / (i + 1), "test_accuracy": i / N_EPOCHS}


def test_reader_polling_a_recorder_sees_every_epoch_once_in_order_and_whole(tmp_path, tiny_model, tiny_config):
    """While a Recorder commits N epochs, a reader thread re-opening the store sees the epoch axis only grow, as a
    prefix of what was recorded, and every epoch it sees holds exactly the recorded weights and metrics."""
    path = tmp_path / "live.zarr"
    epochs = [0, 1, 2, 4, 8, 16]
    params = random_params(tiny_model, epochs, seed=1)
    recorder = _recorder(path, tiny_model, tiny_config)
    seen: list[tuple[int, ...]] = []
    problems: list[str] = []
    done = threading.Event()

    def read() -> None:
        shown = 0
        while not done.is_set() or shown < len(epochs):
            store = geostore.open_store(path)
            now = tuple(int(e) for e in store.epochs)
            if now[:shown] != tuple(epochs[:shown]) or now != tuple(epochs[: len(now)]):
                problems.append(f"saw {now} after {epochs[:shown]}")
                return
            metrics = store.metrics()
            for i in range(shown, len(now)):  # each newly visible epoch, whole
                got = store.params_at(epochs[i])
                if not all(np.array_equal(got[name], params[name][i]) for name in params):
                    problems.append(f"epoch {epochs[i]}: weights differ from those recorded")
                if metrics["train_loss"][i] != _metrics(i)["train_loss"]:
                    problems.append(f"epoch {epochs[i]}: metrics differ")
            if len(now) > shown:
                seen.append(now)
            shown = len(now)

    reader = threading.Thread(target=read)
    reader.start()
    with recorder:
        for i, epoch in enumerate(epochs):
            recorder.record(epoch, _state(tiny_model, params, i), _metrics(i))
            assert tuple(geostore.open_store(path).epochs) == tuple(epochs[: i + 1])  # visible when record returns
    done.set()
    reader.join(timeout=60)
    assert not problems, problems
    assert seen[-1] == tuple(epochs)
    assert len(seen) >= 3, f"the reader saw too few intermediate states to test anything: {seen}"
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.train_mask().ravel(), np.isin(np.arange(49), np.arange(0, 49, 2)))
    assert store.task == {"family": "modular_addition", "p": 7, "data_seed": 3}
    np.testing.assert_array_equal(store.metrics()["test_accuracy"], [i / N_EPOCHS for i in range(len(epochs))])


def test_a_crash_inside_the_recorder_keeps_the_committed_epochs(tmp_path, tiny_model, tiny_config):
    """An exception in the training loop leaves every epoch recorded before it; a failing record (weights of
    another model) changes nothing; recording resumes after the stored epochs and refuses an earlier one."""
    path = tmp_path / "crash.zarr"
    params = random_params(tiny_model, range(5), seed=2)
    with pytest.raises(RuntimeError, match="training blew up"), _recorder(path, tiny_model, tiny_config) as recorder:
        for i in range(3):
            recorder.record(i * 10, _state(tiny_model, params, i), _metrics(i))
        raise RuntimeError("training blew up")
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.epochs, [0, 10, 20])
    for i in range(3):
        got = store.params_at(i * 10)
        assert all(np.array_equal(got[name], params[name][i]) for name in params)

    before = {f: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    resumed = _recorder(path, tiny_model, tiny_config)
    bad = _state(tiny_model, params, 3)
    bad["embed.W_E"] = bad["embed.W_E"][:, :4]
    with pytest.raises(geostore.SourceError, match="embed.W_E"):
        resumed.record(30, bad)
    with pytest.raises(geostore.StoreError, match="append needs new epochs"):
        resumed.record(20, _state(tiny_model, params, 3))
    assert {f: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()} == before
    resumed.record(30, _state(tiny_model, params, 3))
    np.testing.assert_array_equal(geostore.open_store(path).epochs, [0, 10, 20, 30])


def test_train_into_a_store_equals_ingesting_the_run_directory(tmp_path):
    """`geostore train OUT --store S` writes the run directory and a store equal to `ingest OUT --no-flatness`:
    epochs, every weight, metrics, split and every attribute (sources included), so re-ingesting adds nothing."""
    from geostore.family.train_modular_addition import TrainSpec

    spec = TrainSpec(p=7, d_model=8, n_heads=2, train_fraction=0.5, epochs=12, schedule="0:13:3")
    assert main(["train", str(tmp_path / "run"), "--store", str(tmp_path / "live.zarr"), "--p", "7", "--d-model",
                 "8", "--n-heads", "2", "--train-fraction", "0.5", "--epochs", "12", "--schedule", "0:13:3",
                 "--quiet"]) == 0
    geostore.ingest(tmp_path / "run", tmp_path / "ingested.zarr", analyses=[], progress=False)
    live, ingested = snapshot(tmp_path / "live.zarr"), snapshot(tmp_path / "ingested.zarr")
    assert live.keys() == ingested.keys()
    for key in live:  # every chunk of every array, and the commit record with its attributes
        assert live[key] == ingested[key], key
    store = geostore.open_store(tmp_path / "live.zarr")
    np.testing.assert_array_equal(store.epochs, [0, 3, 6, 9, 12])
    assert set(store.metrics()) == {"train_loss", "test_loss", "train_accuracy", "test_accuracy"}
    report = geostore.ingest(tmp_path / "run", tmp_path / "live.zarr", analyses=[], progress=False)
    assert (report.added, report.skipped) == (0, 5)
    with pytest.raises(geostore.GeostoreError, match="not empty"):  # the library call, as the CLI makes it
        train_into_store(spec, tmp_path / "run", tmp_path / "other.zarr", progress=False)
    assert not (tmp_path / "other.zarr").exists()


def test_flatness_follow_computes_the_epochs_that_arrive(tmp_path, tiny_model, tiny_config):
    """Each pass of the follower computes the epochs recorded since the last; the values equal a plain
    `compute` of the finished store's copy; it ends after `until_idle` seconds without new epochs."""
    path = tmp_path / "live.zarr"
    params = random_params(tiny_model, range(4), seed=3)
    recorder = _recorder(path, tiny_model, tiny_config)
    for i in range(2):
        recorder.record(i, _state(tiny_model, params, i))
    passes = follow_compute(path, n_directions=3, until_idle=0.3, poll=0.05, progress=False)
    assert next(passes).computed == 2
    for i in range(2, 4):
        recorder.record(i, _state(tiny_model, params, i))
    report = next(passes)
    assert (report.computed, report.already) == (2, 2)
    began = time.monotonic()
    assert list(passes) == []
    assert 0.25 < time.monotonic() - began < 5
    live = geostore.open_store(path)
    np.testing.assert_array_equal(live.analysis_epochs("flatness"), [0, 1, 2, 3])

    other = tmp_path / "after.zarr"
    copy = _recorder(other, tiny_model, tiny_config)
    for i in range(4):
        copy.record(i, _state(tiny_model, params, i))
    geostore.compute(other, n_directions=3, progress=False)
    expected = geostore.open_store(other).analysis("flatness")
    for name in ("baseline_loss", "delta_losses"):
        np.testing.assert_array_equal(live.analysis("flatness")[name].values, expected[name].values)


def test_flatness_follow_on_the_command_line_exits_0_on_ctrl_c(tmp_path, tiny_model, tiny_config, capsys):
    """`geostore flatness S --follow` keeps its finished passes and exits 0 when interrupted; `--until-idle`
    without `--follow` is one line and exit 1."""
    import _thread

    path = tmp_path / "live.zarr"
    recorder = _recorder(path, tiny_model, tiny_config)
    params = random_params(tiny_model, range(2), seed=4)
    for i in range(2):
        recorder.record(i, _state(tiny_model, params, i))
    stop = threading.Event()

    def interrupt_once_computed() -> None:  # Ctrl-C while the follower waits for more epochs
        while not stop.is_set():
            store = geostore.open_store(path)
            if "flatness" in store.analyses() and store.analysis_epochs("flatness").size == 2:
                time.sleep(0.2)
                if not stop.is_set():
                    _thread.interrupt_main()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=interrupt_once_computed)
    watcher.start()
    try:
        code = main(["flatness", str(path), "--follow", "--directions", "2", "--quiet"])
    finally:
        stop.set()
        watcher.join()
    out, err = capsys.readouterr()
    assert code == 0
    assert "flatness computed for 2 epochs" in out
    assert "stopped following" in err
    np.testing.assert_array_equal(geostore.open_store(path).analysis_epochs("flatness"), [0, 1])
    assert main(["flatness", str(path), "--until-idle", "1"]) == 1
    assert capsys.readouterr().err.strip() == "geostore: error: --until-idle ends --follow: add --follow"
