"""Many hands on one store: concurrent writers, readers during inserts and kills (issue 12).

Every checkpoint here holds its own epoch number in every weight (`labelled_source`), so any mix-up shows:
a store position whose weights differ from its epoch label is a mislabelled epoch. Writers are real
processes (`python -m geostore.cli ...`, or a spawned helper script), never forks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import geostore
from geostore.errors import StoreError
from geostore.store import lock
from geostore.store.integrity import StoreChangedError
from geostore.store.location import LOCK_KEY, Location
from geostore.store.writer import StoreWriter
from tests.checkpoint_factories import config_json, family_model, tiny_config, write_state_dict_dir
from tests.conftest import snapshot

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_config()
MODEL = family_model(CONFIG)
NAMES = MODEL.table.names
TIMEOUT = 120


def labelled(epochs) -> dict[int, dict[str, np.ndarray]]:
    """Parameters whose every value is the epoch number."""
    return {int(e): {p.name: np.full(p.shape, float(e), dtype=np.float32) for p in MODEL.table.parameters}
            for e in epochs}


def stacked(epochs) -> dict[str, np.ndarray]:
    """`labelled` rows stacked `(len(epochs), *shape)`, as `StoreWriter.append` takes them."""
    rows = labelled(epochs)
    return {n: np.stack([rows[int(e)][n] for e in epochs]) for n in NAMES}


def labelled_source(path: Path, epochs) -> Path:
    return write_state_dict_dir(path, labelled(epochs), config=CONFIG, config_file=config_json(CONFIG))


def geostore_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "geostore.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        out.append((proc.returncode, err))
    return out


def assert_labelled(store: geostore.Store, expected=None) -> None:
    """Every stored epoch's weights are its own checkpoint's; the axis is strictly increasing."""
    epochs = store.epochs
    assert np.all(np.diff(epochs) > 0) and np.all(epochs >= 0)
    if expected is not None:
        np.testing.assert_array_equal(epochs, sorted(expected))
    if not epochs.size:  # a staged insertion before every epoch: the intact prefix is empty
        return
    for name in ("W_E", "W_K", "W_in", "b_U"):
        values = store.params[name].compute().reshape(len(epochs), -1)
        np.testing.assert_array_equal(values, np.broadcast_to(epochs[:, None].astype(np.float32), values.shape),
                                      err_msg=f"{name} does not match its epoch labels")


@pytest.fixture
def sources(tmp_path):
    root = tmp_path / "sources"
    return {
        "a": labelled_source(root / "a", range(0, 200, 10)),
        "b": labelled_source(root / "b", range(5, 205, 10)),
        "ab": labelled_source(root / "ab", range(100, 300, 10)),  # overlaps a
        "early": labelled_source(root / "early", [1, 2, 3, 4]),
    }


def test_two_ingests_creating_one_store_at_once_end_as_one_ingest_of_the_union(tmp_path, sources):
    store = tmp_path / "new.zarr"
    results = finish([geostore_cli("ingest", str(sources[k]), str(store), "--no-flatness", "--quiet")
                      for k in ("a", "ab")])
    assert [rc for rc, _ in results] == [0, 0], results
    assert_labelled(geostore.open_store(store), sorted(set(range(0, 200, 10)) | set(range(100, 300, 10))))


def test_four_ingests_of_disjoint_overlapping_identical_and_earlier_sources_into_one_store(tmp_path, sources):
    store = tmp_path / "s.zarr"
    assert finish([geostore_cli("ingest", str(sources["a"]), str(store), "--no-flatness", "--quiet")])[0][0] == 0
    procs = [geostore_cli("ingest", str(sources[k]), str(store), "--no-flatness", "--quiet")
             for k in ("b", "ab", "a", "early")]
    results = finish(procs)
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    union = set(range(0, 200, 10)) | set(range(5, 205, 10)) | set(range(100, 300, 10)) | {1, 2, 3, 4}
    reopened = geostore.open_store(store)
    assert_labelled(reopened, union)
    assert not reopened.interrupted and not (store / "_pending").exists()


def test_a_noop_reingest_waits_for_a_live_writer_and_touches_none_of_its_work(tmp_path, sources):
    """The break: the no-op's recovery took the live writer's uncommitted rows for crash debris and shrank
    the arrays under it; the live writer's commit then listed epochs labelled -1 with zero weights."""
    store = tmp_path / "s.zarr"
    assert finish([geostore_cli("ingest", str(sources["a"]), str(store), "--no-flatness", "--quiet")])[0][0] == 0
    writer = StoreWriter.open(store, model=MODEL, task={})
    new = sorted(labelled(range(200, 400, 10)).items())
    columns = writer._columns(np.array([e for e, _ in new]),
                              {n: np.stack([p[n] for _, p in new]) for n in NAMES}, None)
    writer._write_region(writer._n, columns)  # a live writer, mid-batch: rows written, not yet committed
    noop = geostore_cli("ingest", str(sources["a"]), str(store), "--no-flatness", "--quiet")
    said = noop.stderr.readline()  # blocks until the second writer reaches the lock (start-up takes seconds)
    assert "waiting" in said and noop.poll() is None, "the second writer did not wait"
    assert geostore.open_store(store).epochs.size == 20
    writer._commit(np.concatenate([writer._epochs, columns["epoch"]]))
    writer.close()
    rc, err = finish([noop])[0]
    assert rc == 0, said + err
    assert_labelled(geostore.open_store(store), list(range(0, 400, 10)))


def test_a_second_writer_with_no_patience_fails_with_one_line_and_changes_nothing(tmp_path, sources):
    store = tmp_path / "s.zarr"
    assert finish([geostore_cli("ingest", str(sources["a"]), str(store), "--no-flatness", "--quiet")])[0][0] == 0
    before = snapshot(store)
    with StoreWriter.open(store, model=MODEL, task={}):
        rc, err = finish([geostore_cli("ingest", str(sources["b"]), str(store), "--no-flatness", "--quiet",
                                       env={lock.TIMEOUT_ENV: "0"})])[0]
    assert rc == 3 and len(err.strip().splitlines()) == 1 and "being written" in err, err
    assert snapshot(store) == before


def test_flatness_during_an_ingest_serialises_and_completes_every_epoch(tmp_path, sources):
    store = tmp_path / "s.zarr"
    assert finish([geostore_cli("ingest", str(sources["a"]), str(store), "--directions", "2", "--quiet")])[0][0] == 0
    procs = [geostore_cli("ingest", str(sources["b"]), str(store), "--directions", "2", "--quiet"),
             geostore_cli("flatness", str(store), "--directions", "2", "--quiet")]
    results = finish(procs)
    assert [rc for rc, _ in results] == [0, 0], results
    opened = geostore.open_store(store)
    assert_labelled(opened, sorted(set(range(0, 200, 10)) | set(range(5, 205, 10))))
    np.testing.assert_array_equal(opened.analysis_epochs("flatness"), opened.epochs)


def test_a_new_sweep_is_created_under_its_lock_and_concurrent_runs_both_land(tmp_path, sources):
    """Sweep roots were made without the lock: a second ingest could find a half-made root and refuse it, or a
    single store created at the same path could have its root overwritten."""
    sweep = tmp_path / "sweep.zarr"
    sweep.mkdir()
    key = lock.acquire(Location.of(sweep))
    try:
        first = geostore_cli("ingest", str(sources["a"]), str(sweep), "--run", "a", "--no-flatness", "--quiet")
        said = first.stderr.readline()
        assert "waiting" in said and first.poll() is None and not (sweep / "zarr.json").exists()
    finally:
        lock.release(key)
    second = geostore_cli("ingest", str(sources["b"]), str(sweep), "--run", "b", "--no-flatness", "--quiet")
    results = finish([first, second])
    assert [rc for rc, _ in results] == [0, 0], results
    opened = geostore.open_sweep(sweep)
    assert opened.runs == ["a", "b"]
    assert_labelled(opened["a"], range(0, 200, 10))
    assert_labelled(opened["b"], range(5, 205, 10))


def test_two_writers_in_one_process_share_the_lock_but_the_stale_one_cannot_commit(tmp_path):
    """Writers of one process share the lock (no self-deadlock); the store is created once, and a writer whose
    committed state went stale is refused before it commits anything."""
    store = tmp_path / "s.zarr"
    first = StoreWriter.open(store, model=MODEL, task={})
    second = StoreWriter.open(store, model=MODEL, task={})
    assert first.created and not second.created
    first.append([0], {n: v[None] for n, v in labelled([0])[0].items()})
    with pytest.raises(StoreError, match="changed by another writer"):
        second.append([10], {n: v[None] for n, v in labelled([10])[10].items()})
    first.close()
    second.close()
    assert not lock.held(Location.of(store))


# ------------------------------------------------------------------------------------- readers
def test_a_handle_opened_before_an_insert_raises_instead_of_reading_another_epochs_weights(tmp_path):
    """The break: `params["W_E"][1]`, labelled 12, returned checkpoint 6's weights after 6 was inserted."""
    store = tmp_path / "s.zarr"
    with StoreWriter.open(store, model=MODEL, task={}, chunk_epochs=8) as writer:
        writer.append([0, 12, 24], stacked([0, 12, 24]))
    old = geostore.open_store(store)
    lazy = old.params["W_E"][1]
    xr_old = old.to_xarray()
    with StoreWriter.open(store, model=MODEL, task={}) as writer:
        writer.insert([6], {n: v[None] for n, v in labelled([6])[6].items()})
    with pytest.raises(StoreChangedError, match="open the store again"):
        lazy.compute()
    with pytest.raises(StoreChangedError):
        old.params_at(12)
    with pytest.raises(StoreChangedError):
        xr_old["W_E"].isel(epoch=1).values  # noqa: B018
    assert_labelled(geostore.open_store(store), [0, 6, 12, 24])


def test_a_handle_keeps_reading_while_epochs_are_appended(tmp_path):
    store = tmp_path / "s.zarr"
    with StoreWriter.open(store, model=MODEL, task={}, chunk_epochs=8) as writer:
        writer.append([0, 1, 2], stacked([0, 1, 2]))
    old = geostore.open_store(store)
    with StoreWriter.open(store, model=MODEL, task={}) as writer:
        writer.append([3, 4], stacked([3, 4]))
    assert_labelled(old, [0, 1, 2])  # the snapshot it opened: appends never move committed values


def test_the_pca_cache_cannot_be_poisoned_by_an_insert(tmp_path):
    """The break: `pca` over a handle whose chunks an insert rewrote cached a Gram matrix of mixed epochs."""
    store = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    epochs = list(range(0, 100, 10))
    params = {n: rng.standard_normal((10, *MODEL.table[n].shape)).astype(np.float32)
              for n in NAMES}
    with StoreWriter.open(store, model=MODEL, task={}, chunk_epochs=4) as writer:
        writer.append(epochs, params)
    old = geostore.open_store(store)
    with StoreWriter.open(store, model=MODEL, task={}) as writer:
        writer.insert([5], {n: rng.standard_normal((1, *MODEL.table[n].shape)).astype(np.float32)
                            for n in NAMES})
    with pytest.raises(StoreChangedError):
        old.pca("attention", 2)
    cached = geostore.open_store(store).pca("attention", 2)
    import shutil

    shutil.rmtree(store / "derived")
    fresh = geostore.open_store(store).pca("attention", 2)
    np.testing.assert_allclose(cached["explained_variance_ratio"], fresh["explained_variance_ratio"], rtol=1e-12)


INSERTER = textwrap.dedent("""
    import sys
    import numpy as np
    from geostore.store.writer import StoreWriter
    from tests.test_concurrency import MODEL, labelled

    store, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for epoch in range(last, first - 1, -1):  # each one before every stored epoch: an insertion
        with StoreWriter.open(store, model=MODEL, task={}) as writer:
            writer.insert([epoch], {n: v[None] for n, v in labelled([epoch])[epoch].items()})
        print(epoch, flush=True)
""")


def _poll(store: Path, until, stats: dict) -> None:
    """Open and read the store in a loop; every read is labelled correctly or raises StoreChangedError."""
    while not until():
        try:
            opened = geostore.open_store(store)
            assert_labelled(opened)
            ds = opened.to_xarray()
            labels = ds["epoch"].values
            if not labels.size:
                continue
            assert np.all(np.diff(labels) > 0)
            np.testing.assert_array_equal(ds["W_in"].values.reshape(len(labels), -1).mean(axis=1), labels)
            stats["ok"] += 1
        except StoreChangedError:
            stats["changed"] += 1
        except StoreError as exc:  # the commit record went between listing and reading: reopen
            stats["other"].append(str(exc))


def late_epochs_and_inserter(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """A store of labelled epochs 1000..1038 (chunks of 4) and the INSERTER script beside it."""
    store, epochs = tmp_path / "s.zarr", list(range(1000, 1040, 2))
    with StoreWriter.open(store, model=MODEL, task={}, chunk_epochs=4) as writer:
        writer.append(epochs, stacked(epochs))
    script = tmp_path / "inserter.py"
    script.write_text(INSERTER)
    return store, script, epochs


def test_readers_polling_during_inserts_never_see_a_mislabelled_epoch(tmp_path):
    store, script, epochs = late_epochs_and_inserter(tmp_path)
    proc = subprocess.Popen([sys.executable, str(script), str(store), "100", "130"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    stats = {"ok": 0, "changed": 0, "other": []}
    deadline = time.monotonic() + TIMEOUT
    _poll(store, lambda: proc.poll() is not None or time.monotonic() > deadline, stats)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert not stats["other"], stats["other"][:3]
    assert stats["ok"] > 0
    assert_labelled(geostore.open_store(store), list(range(100, 131)) + epochs)
    print(f"polls: {stats['ok']} consistent, {stats['changed']} refused with StoreChangedError")


def test_a_writer_killed_mid_insert_leaves_readers_and_the_next_writer_a_consistent_store(tmp_path):
    store, script, _ = late_epochs_and_inserter(tmp_path)
    rng = np.random.default_rng(1)
    stats = {"ok": 0, "changed": 0, "other": []}
    for _trial in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(store), "0", "999"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        proc.stdout.readline()  # it has inserted once: now it is somewhere in the next insertion
        kill_at = time.monotonic() + rng.uniform(0.0, 0.5)
        _poll(store, lambda t=kill_at: time.monotonic() > t, stats)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        after = time.monotonic() + 0.3
        _poll(store, lambda t=after: time.monotonic() > t, stats)
        with StoreWriter.open(store, model=MODEL, task={}):  # recovery: redo a complete stage, drop the rest
            pass
        assert_labelled(geostore.open_store(store))
    assert not stats["other"], stats["other"][:3]
    assert stats["ok"] > 0
    assert not (store / LOCK_KEY).read_bytes()  # the lock file stays empty
