"""Runs of a sweep compared: the shared PCA basis against scikit-learn on the concatenated runs, divergence and
pairwise distances against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

import geostore
from geostore.store.location import Location
from geostore.store.sweep import create_sweep
from tests.conftest import random_params

RUNS = {"seed0": [0, 10, 20, 30, 40, 50], "seed1": [0, 10, 20, 40, 50, 60, 70], "seed2": [5, 10, 20, 30]}


def add_run(path, model, name: str, epochs: list[int], seed: int) -> dict[str, np.ndarray]:
    """Write run `name` of the sweep at `path`: a random walk of `model`'s weights; returns them as stored
    (float32)."""
    from geostore.store.writer import StoreWriter

    params = {k: np.cumsum(v, axis=0).astype(np.float32)
              for k, v in random_params(model, range(len(epochs)), seed).items()}
    writer = StoreWriter.open(path / "runs" / name, model=model, task={"family": "modular_addition", "p": 7})
    writer.append(epochs, params)
    writer.close()
    return params


@pytest.fixture
def sweep(tmp_path, tiny_model):
    path = tmp_path / "sweep.zarr"
    create_sweep(Location.of(path))
    weights = {name: add_run(path, tiny_model, name, epochs, seed)
               for seed, (name, epochs) in enumerate(RUNS.items())}
    return path, weights


def flat(params: dict[str, np.ndarray], names) -> np.ndarray:
    return np.concatenate([params[n].reshape(len(params[n]), -1).astype(np.float64) for n in names], axis=1)


def assert_same_up_to_sign(ours: np.ndarray, theirs: np.ndarray) -> None:
    signs = np.sign((ours * theirs).sum(axis=0))
    np.testing.assert_allclose(ours, theirs * signs, rtol=1e-7, atol=1e-7 * np.abs(theirs).max())


def test_the_shared_basis_is_scikit_learns_pca_of_the_concatenated_runs(sweep):
    path, weights = sweep
    opened = geostore.open_sweep(path)
    names = opened["seed0"].resolve("attention")
    rows = np.concatenate([flat(weights[r], names) for r in RUNS])
    reference = PCA(3, svd_solver="full").fit(rows)
    shared = opened.pca("attention", 3)
    assert shared["projections"].dims == ("run", "epoch", "component")
    assert shared["epoch"].values.tolist() == sorted({e for es in RUNS.values() for e in es})
    np.testing.assert_allclose(shared["explained_variance"], reference.explained_variance_, rtol=1e-9)
    expected = reference.transform(rows)
    ours = np.concatenate([shared["projections"].sel(run=r, epoch=RUNS[r]).values for r in RUNS])
    assert_same_up_to_sign(ours, expected)
    assert np.isnan(shared["projections"].sel(run="seed2", epoch=0)).all()  # seed2 lacks epoch 0
    assert (path / "derived" / "shared").is_dir()  # cached beside the runs
    np.testing.assert_array_equal(opened.pca("attention", 3)["projections"], shared["projections"])  # from the cache

    subset = opened.pca("attention", 2, runs=["seed0", "seed2"], fit_runs=["seed0"])
    two = np.concatenate([flat(weights[r], names) for r in ("seed0", "seed2")])
    fitted = PCA(2, svd_solver="full").fit(flat(weights["seed0"], names))
    assert subset["run"].values.tolist() == ["seed0", "seed2"]
    ours = np.concatenate([subset["projections"].sel(run=r, epoch=RUNS[r]).values for r in ("seed0", "seed2")])
    assert_same_up_to_sign(ours, fitted.transform(two))


def test_a_run_added_later_extends_the_cached_basis(sweep, tiny_model):
    path, weights = sweep
    geostore.open_sweep(path).pca("all", 2)
    cache = path / "derived" / "shared" / "attention.npz"
    with np.load(cache) as data:
        cached = {k: data[k] for k in data.files}
    cached["gram"][0, 0] += 1.0  # a mark on an old row: kept if old rows are reused, gone if recomputed
    np.savez(cache, **cached)
    weights["late"] = add_run(path, tiny_model, "late", [0, 30, 90], seed=7)
    geostore.open_sweep(path).pca("all", 2)
    with np.load(cache) as data:  # the new run's rows were added (runs sort by name), the old ones reused
        extended = {k: data[k] for k in data.files}
    assert extended["runs"].tolist() == ["late"] * 3 + [r for r in RUNS for _ in RUNS[r]]
    assert extended["gram"][3, 3] == cached["gram"][0, 0]
    extended["gram"][3, 3] -= 1.0  # the mark taken off: the extended cache gives scikit-learn's basis of all four
    np.savez(cache, **extended)
    shared = geostore.open_sweep(path).pca("all", 2)
    epochs = {**RUNS, "late": [0, 30, 90]}
    names = geostore.open_sweep(path)["late"].resolve("all")
    rows = np.concatenate([flat(weights[r], names) for r in sorted(epochs)])
    ours = np.concatenate([shared["projections"].sel(run=r, epoch=epochs[r]).values for r in sorted(epochs)])
    assert_same_up_to_sign(ours, PCA(2, svd_solver="full").fit(rows).transform(rows))


def test_divergence_and_pairwise_distances_are_numpys_norms(sweep):
    path, weights = sweep
    opened = geostore.open_sweep(path)
    names = opened["seed0"].resolve("all")
    shared = [0, 10, 20, 40, 50]
    a = flat(weights["seed0"], names)[[RUNS["seed0"].index(e) for e in shared]]
    b = flat(weights["seed1"], names)[[RUNS["seed1"].index(e) for e in shared]]
    found = opened.divergence("seed0", "seed1", per_parameter=True)
    assert found["epoch"].values.tolist() == shared
    np.testing.assert_allclose(found["distance"], np.linalg.norm(a - b, axis=1), rtol=1e-10)
    np.testing.assert_allclose(found["relative"], np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1))
    w_in = [RUNS["seed0"].index(e) for e in shared], [RUNS["seed1"].index(e) for e in shared]
    diff = weights["seed0"]["W_in"][w_in[0]].astype(np.float64) - weights["seed1"]["W_in"][w_in[1]]
    np.testing.assert_allclose(found["distance_per_parameter"].sel(parameter="W_in"),
                               np.linalg.norm(diff.reshape(len(shared), -1), axis=1), rtol=1e-10)

    at20 = opened.distances(20)
    rows = np.stack([flat(weights[r], names)[RUNS[r].index(20)] for r in RUNS])
    np.testing.assert_allclose(at20.values, np.linalg.norm(rows[:, None] - rows[None], axis=2), rtol=1e-10)
    assert opened.distances(30)["run"].values.tolist() == ["seed0", "seed2"]  # seed1 has no epoch 30


def test_comparisons_refuse_what_cannot_be_compared(sweep, tmp_path, tiny_config):
    from tests.conftest import ma_model

    path, _ = sweep
    opened = geostore.open_sweep(path)
    with pytest.raises(geostore.StoreError, match="no run 'nope'"):
        opened.pca("all", 2, runs=["seed0", "nope"])
    with pytest.raises(geostore.StoreError, match="fit_runs: 'seed1' is not among"):
        opened.pca("all", 2, runs=["seed0"], fit_runs=["seed1"])
    add_run(path, ma_model({**tiny_config, "d_mlp": 24}), "wide", [0, 10], seed=3)
    with pytest.raises(geostore.StoreError, match="hold different models"):
        geostore.open_sweep(path).divergence("seed0", "wide")


def test_the_command_line_prints_the_shared_basis(sweep, capsys, tmp_path):
    from geostore.cli import main

    path, _ = sweep
    assert main(["pca", str(path), "--shared", "--runs", "seed0,seed2", "--components", "2",
                 "--csv", str(tmp_path / "shared.csv")]) == 0
    lines = (tmp_path / "shared.csv").read_text().splitlines()
    expected = geostore.open_sweep(path).pca("all", 2, runs=["seed0", "seed2"])["projections"]
    assert lines[0] == "run,epoch,PC1,PC2" and len(lines) == 1 + len(RUNS["seed0"]) + len(RUNS["seed2"])
    run, epoch, *pcs = lines[-1].split(",")
    assert (run, int(epoch)) == ("seed2", 30)
    np.testing.assert_allclose([float(v) for v in pcs], expected.sel(run="seed2", epoch=30).values, rtol=1e-6)
    assert main(["pca", str(path), "--shared", "--run", "seed0"]) == 1
    assert "use --runs, not --run" in capsys.readouterr().err
