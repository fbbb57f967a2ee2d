"""Trajectory PCA and velocity: equal to scikit-learn and numpy, out of core, cached, incremental, distributed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback
from sklearn.decomposition import PCA

import geostore
from geostore.analysis.trajectory import pca_from_gram
from geostore.cli import main
from geostore.errors import StoreError
from geostore.ingestion import ingest
from geostore.store import derived, layout
from geostore.store.location import PARTIAL_SUFFIX
from geostore.store.writer import StoreWriter
from tests.conftest import ma_model, random_params

ROOT = Path(__file__).resolve().parents[1]
# The modular-addition family's groups (a 1-layer HookedTransformer without normalisation), and a list of names.
FAMILY_GROUPS = ["all", "embedding", "attention", "mlp"]
GROUPS = [*FAMILY_GROUPS, ["W_in", "b_in", "W_U"]]


@pytest.fixture(scope="module")
def run_store(trained_run, tmp_path_factory) -> Path:
    """A real trained run, ingested (no cache yet; tests copy it before caching)."""
    path = tmp_path_factory.mktemp("traj") / "run.zarr"
    ingest(trained_run, path, progress=False)
    return path


def fresh_copy(path: Path, target: Path) -> Path:
    """The store without its derived cache."""
    shutil.copytree(path, target, ignore=shutil.ignore_patterns(derived.DERIVED))
    return target


def matrix(store, group) -> np.ndarray:
    return store.flatten(group).compute().astype(np.float64)


def assert_same_pca(result: xr.Dataset, x: np.ndarray, fit: np.ndarray | None = None, k: int = 3) -> None:
    """Equal to scikit-learn's exact PCA fitted on rows `fit` of `x`, up to the sign of each component."""
    fit = np.arange(len(x)) if fit is None else fit
    np.testing.assert_array_equal(np.flatnonzero(result["fit"]), fit)
    reference = PCA(k, svd_solver="full").fit(x[fit])
    expected = reference.transform(x)
    projections = result["projections"].values
    signs = np.sign((projections * expected).sum(axis=0))
    scale = np.abs(expected).max()
    assert np.abs(projections * signs - expected).max() < 1e-6 * scale
    np.testing.assert_allclose(result["explained_variance"], reference.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(result["explained_variance_ratio"], reference.explained_variance_ratio_,
                               rtol=1e-6, atol=1e-12)
    if "components" in result:
        assert isinstance(result["components"].data, da.Array)  # lazy
        np.testing.assert_allclose(result["components"].values * signs[:, None], reference.components_,
                                   atol=1e-6 * np.abs(reference.components_).max())


def numpy_velocity(x: np.ndarray, epochs: np.ndarray, per_epoch: bool = False) -> np.ndarray:
    speed = np.linalg.norm(np.diff(x, axis=0), axis=1)
    return speed / np.diff(epochs) if per_epoch else speed


def test_pca_and_velocity_equal_sklearn_and_numpy_for_every_group(run_store, tmp_path):
    store = geostore.open_store(fresh_copy(run_store, tmp_path / "s.zarr"))
    n = store.epochs.size
    assert list(store.groups) == FAMILY_GROUPS
    for group in GROUPS:
        x = matrix(store, group)
        result = store.pca(group, 3, loadings=True)
        assert result["projections"].dims == ("epoch", "component") and result["projections"].dtype == np.float64
        assert result["explained_variance_ratio"].dims == result["explained_variance"].dims == ("component",)
        assert result["components"].shape == (3, x.shape[1])
        np.testing.assert_array_equal(result["epoch"], store.epochs)
        np.testing.assert_array_equal(result["component"], [1, 2, 3])
        assert result["explained_variance_ratio"].sum() <= 1.0
        assert np.all(np.diff(result["explained_variance"]) <= 0)
        assert_same_pca(result, x)
        # The sign convention: each component's largest-magnitude projection is positive.
        projections = result["projections"]
        assert np.all(projections[np.abs(projections).argmax(axis=0), range(3)] > 0)
        # REQ_029's velocity by default, each step labelled by its later epoch; the rate per epoch on request
        speed = store.velocity(group)
        np.testing.assert_allclose(speed, numpy_velocity(x, store.epochs), rtol=1e-12)
        np.testing.assert_array_equal(speed["epoch"], store.epochs[1:])
        np.testing.assert_array_equal(speed["from_epoch"], store.epochs[:-1])
        np.testing.assert_allclose(store.velocity(group, per_epoch=True),
                                   numpy_velocity(x, store.epochs, per_epoch=True), rtol=1e-12)
    all_velocities = store.velocities()
    assert set(all_velocities) == {"all", *store.table.partition()} == set(FAMILY_GROUPS)
    for group, speed in all_velocities.items():
        assert speed.shape == (n - 1,)
        np.testing.assert_allclose(speed, numpy_velocity(matrix(store, group), store.epochs, False), rtol=1e-12)


def test_fit_window_projects_every_epoch_on_the_fitted_basis(run_store, tmp_path):
    store = geostore.open_store(fresh_copy(run_store, tmp_path / "s.zarr"))
    x = matrix(store, "attention")
    epochs = store.epochs
    window = store.pca("attention", 2, fit_epochs=(int(epochs[2]), int(epochs[6])), loadings=True)
    assert_same_pca(window, x, np.arange(2, 7), k=2)
    listed = store.pca("attention", 3, fit_epochs=[int(e) for e in epochs[[0, 3, 4, 8]]])
    assert_same_pca(listed, x, np.array([0, 3, 4, 8]))
    with pytest.raises(StoreError, match="not stored"):
        store.pca(fit_epochs=[int(epochs[0]), int(epochs[0]) + 1])
    with pytest.raises(StoreError, match="at least 2"):
        store.pca(n_components=1, fit_epochs=(int(epochs[0]), int(epochs[0])))
    with pytest.raises(StoreError, match="n_components"):
        store.pca(n_components=len(epochs) + 1)
    with pytest.raises(StoreError, match="unknown group"):
        store.pca("bogus")
    with pytest.raises(StoreError, match="unknown parameter"):
        store.velocity(["W_in", "nope"])


def write_random_store(path: Path, model, epochs, *, chunk_epochs: int = 4, seed: int = 0) -> dict:
    params = random_params(model, epochs, seed)
    StoreWriter.open(path, model=model, task={"family": "modular_addition", "p": 7},
                     chunk_epochs=chunk_epochs).append(epochs, params)
    return params


def test_any_memory_budget_gives_the_same_exact_result(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    write_random_store(path, tiny_model, [0, 1, 3, 7, 8, 9, 20, 21, 22, 40, 41, 50, 60])
    store = geostore.open_store(path)
    x = matrix(store, "all")
    for budget in (1, 20_000, 10**9):  # one row per panel, a few chunks per panel, everything in one
        shutil.rmtree(path / derived.DERIVED, ignore_errors=True)
        assert_same_pca(store.pca("all", 4, memory_budget=budget), x, k=4)
        np.testing.assert_allclose(store.velocity(), numpy_velocity(x, store.epochs), rtol=1e-12)  # same pass


class TaskCounter(Callback):
    """Counts the dask tasks that run: zero means nothing was read from the store."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _posttask(self, key, result, dsk, state, id):
        self.count += 1


def test_cache_is_instant_incremental_and_equal_to_recomputation(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    params = write_random_store(path, tiny_model, [0, 10, 20, 30, 40, 50])
    root_meta = (path / layout.ROOT_META).read_bytes()
    first = geostore.open_store(path).pca("all", 3)
    assert (path / layout.ROOT_META).read_bytes() == root_meta  # the commit record is never touched
    assert sorted(p.name for p in (path / derived.DERIVED / derived.TRAJECTORY).iterdir()) == [
        "attention.npz", "embedding.npz", "mlp.npz"]

    with TaskCounter() as counter:  # reopened: from the cache, no task, no read
        again = geostore.open_store(path)
        np.testing.assert_array_equal(again.pca("all", 3)["projections"], first["projections"])
        again.pca("mlp", 2, fit_epochs=(10, 40))
        again.velocities()
    assert counter.count == 0
    assert xr.open_zarr(path, consolidated=True).sizes["epoch"] == 6
    np.testing.assert_array_equal(geostore.open_store(path).params["W_E"].compute(), params["W_E"])

    # Ingest adds epochs after and between the cached ones: the update equals a full recomputation.
    writer = StoreWriter.open(path, model=tiny_model, task={"family": "modular_addition", "p": 7})
    writer.append([60, 70], random_params(tiny_model, range(2), 1))
    writer.insert([5, 35], random_params(tiny_model, range(2), 2))
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.epochs, [0, 5, 10, 20, 30, 35, 40, 50, 60, 70])
    updated = {str(group): store.pca(group, 3) for group in GROUPS}
    speeds = store.velocities()
    full = geostore.open_store(fresh_copy(path, tmp_path / "full.zarr"))
    for group in GROUPS:
        recomputed = full.pca(group, 3)
        for key in ("projections", "explained_variance", "explained_variance_ratio"):
            np.testing.assert_allclose(updated[str(group)][key], recomputed[key], rtol=1e-9, atol=1e-12)
        assert_same_pca(updated[str(group)], matrix(store, group))
    for group, speed in speeds.items():
        np.testing.assert_allclose(speed, full.velocity(group), rtol=1e-12)
    assert xr.open_zarr(path, consolidated=True).sizes["epoch"] == 10


def test_update_reads_only_the_new_rows_against_the_old(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    write_random_store(path, tiny_model, range(16), chunk_epochs=4)
    store = geostore.open_store(path)
    cached = derived.unit_passes(store, store.groups["mlp"])["mlp"]
    StoreWriter.open(path, model=tiny_model, task={"family": "modular_addition", "p": 7}).append(
        [16, 17], random_params(tiny_model, range(2), 3))
    store = geostore.open_store(path)
    with TaskCounter() as counter:
        updated = derived.unit_passes(store, store.groups["mlp"])["mlp"]
    # Per array: one panel (the new edge chunk), its self product, one product per stored chunk.
    assert counter.count < 2 * (5 + 1 + 1 + 5) + 10
    np.testing.assert_array_equal(updated.gram[:16, :16], cached.gram)
    x = matrix(store, "mlp")
    np.testing.assert_allclose(updated.gram, x @ x.T, rtol=1e-12)


def test_a_damaged_cache_is_recomputed(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    write_random_store(path, tiny_model, range(7))
    store = geostore.open_store(path)
    expected = store.pca("embedding", 2)
    cache = path / derived.DERIVED / derived.TRAJECTORY / "embedding.npz"
    cache.write_bytes(cache.read_bytes()[:100])  # torn, as no rename would leave it, or a bad disk
    (cache.parent / f"mlp.npz.123{PARTIAL_SUFFIX}").write_bytes(b"half")  # a killed writer's leftover
    again = geostore.open_store(path).pca("embedding", 2)
    np.testing.assert_allclose(again["projections"], expected["projections"], rtol=1e-12)
    assert derived._load(store, "embedding", store.groups["embedding"]) is not None
    StoreWriter.open(path, model=tiny_model, task={"family": "modular_addition", "p": 7})  # recovery
    assert not list(cache.parent.glob(f"*{PARTIAL_SUFFIX}"))


def test_distributed_cluster_equals_local(run_store, tmp_path):
    from distributed import Client, LocalCluster

    local = geostore.open_store(fresh_copy(run_store, tmp_path / "local.zarr"))
    remote = geostore.open_store(fresh_copy(run_store, tmp_path / "remote.zarr"))
    environ = dict(os.environ)
    try:  # LocalCluster sets OMP_NUM_THREADS=1 in this process too: restore it afterwards
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster):
            on_cluster = remote.pca("all", 3, memory_budget=200_000)  # several panels, several computes
            speeds = remote.velocities()
    finally:
        os.environ.clear()
        os.environ.update(environ)
    expected = local.pca("all", 3)
    np.testing.assert_allclose(on_cluster["projections"], expected["projections"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(on_cluster["explained_variance"], expected["explained_variance"], rtol=1e-10)
    for group, speed in speeds.items():
        np.testing.assert_allclose(speed, local.velocity(group), rtol=1e-12)


def test_cli_prints_tables_and_writes_csv(run_store, tmp_path, capsys):
    path = fresh_copy(run_store, tmp_path / "s.zarr")
    store = geostore.open_store(path)
    assert main(["pca", str(path), "--group", "mlp", "--components", "2"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].split() == ["epoch", "PC1", "PC2"] and len(lines) == store.epochs.size + 1
    assert "explained variance ratio PC1" in out.err
    expected = store.pca("mlp", 2)["projections"]
    assert [float(v) for v in lines[1].split()[1:]] == pytest.approx(expected[0], rel=1e-5)

    table = tmp_path / "pca.csv"
    first, last = int(store.epochs[1]), int(store.epochs[5])
    assert main(["pca", str(path), "--group", "W_in,W_out", "--fit-epochs", f"{first}:{last}",
                 "--csv", str(table)]) == 0
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["epoch", "PC1", "PC2", "PC3"]
    np.testing.assert_allclose(np.array(rows[1:], dtype=float)[:, 1:],
                               store.pca("mlp", 3, fit_epochs=(first, last))["projections"], rtol=1e-12)

    speed_csv = tmp_path / "v.csv"
    assert main(["velocity", str(path), "--per-checkpoint", "--csv", str(speed_csv)]) == 0
    rows = np.array(list(csv.reader(speed_csv.open()))[1:], dtype=float)
    np.testing.assert_array_equal(rows[:, :2], np.stack([store.epochs[:-1], store.epochs[1:]], axis=1))
    np.testing.assert_allclose(rows[:, 2], store.velocity(), rtol=1e-12)
    assert main(["velocity", str(path), "--group", "attention"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["from_epoch", "to_epoch", "velocity"]
    assert main(["velocity", str(path), "--per-epoch", "--csv", str(speed_csv)]) == 0
    rows = np.array(list(csv.reader(speed_csv.open()))[1:], dtype=float)
    np.testing.assert_allclose(rows[:, 2], store.velocity(per_epoch=True), rtol=1e-12)

    assert main(["pca", str(path), "--group", "bogus"]) == StoreError.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"geostore: error: {path}: unknown group 'bogus': use one of all, embedding, attention, mlp")
    assert len(err.strip().splitlines()) == 1


# Peak RSS from VmHWM: ru_maxrss would carry over the (large) RSS of the test process that forked the child.
MEMORY_CHILD = """
import json, re, sys
import xarray  # loaded before the baseline: results are labelled
import geostore

def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

store = geostore.open_store(sys.argv[1])
store.params["W_in"][:1].compute()  # libraries loaded: the baseline
before = peak()
result = store.pca("all", 3, memory_budget=int(sys.argv[2]))
speed = store.velocity("all", per_epoch=False, memory_budget=int(sys.argv[2]))
print(json.dumps({"before": before, "peak": peak(), "projections": result["projections"].values.tolist(),
                  "velocity": speed.values.tolist()}))
"""


def test_store_larger_than_the_memory_budget_completes_exactly(tmp_path):
    """A ~700 MB store under a 96 MiB budget: completes exactly, with peak memory set by the budget.

    The peak adds to the libraries' baseline (~180 MB) the panels (the budget), chunks in flight, and what
    glibc's per-thread heaps keep of freed chunk buffers (measured 0.5-2x the budget here).
    """
    from geostore.family.modular_addition import model_config

    model = ma_model(model_config(113, d_model=256))  # ~3.2 MB per epoch; W_in alone 1 MB
    path = tmp_path / "big.zarr"
    writer = StoreWriter.open(path, model=model, task={"family": "modular_addition", "p": 113})
    rng = np.random.default_rng(0)
    n = 208
    for start in range(0, n, writer.chunk_epochs):
        epochs = list(range(start, start + writer.chunk_epochs))
        writer.append(epochs, {p.name: rng.standard_normal((len(epochs), *p.shape), dtype=np.float32)
                               for p in model.table.parameters})
    size = geostore.open_store(path).nbytes_on_disk()
    assert size > 600e6
    budget = 96 * 2**20
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), str(budget)], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["peak"] - report["before"] < 4 * budget
    assert report["peak"] < 0.75 * size

    # The exact answer, from a plain numpy Gram matrix over one parameter at a time.
    store = geostore.open_store(path)
    gram, steps2 = np.zeros((n, n)), np.zeros(n - 1)
    for name in store.groups["all"]:
        x = store.params[name].compute().reshape(n, -1).astype(np.float64)
        gram += x @ x.T
        steps2 += np.square(np.diff(x, axis=0)).sum(axis=1)
    expected = pca_from_gram(gram, 3).projections
    np.testing.assert_allclose(np.array(report["projections"]), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(report["velocity"], np.sqrt(steps2), rtol=1e-12)
