"""Weights over time: histograms equal numpy's per epoch and are cached incrementally; spectra equal numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest

import geostore
from geostore.analysis.weights import participation_ratio, singular_values
from geostore.cli import main
from geostore.errors import StoreError
from geostore.store import derived, weights
from geostore.store.writer import StoreWriter
from tests.conftest import random_params
from tests.test_trajectory import TaskCounter, fresh_copy, write_random_store

TASK = {"family": "modular_addition", "p": 7}


def values_at(store, names, index: int) -> np.ndarray:
    """Every value of `names` at epoch position `index` (float64), read by numpy from the zarr arrays."""
    return np.concatenate([np.asarray(store.member(n)[index]).ravel() for n in names]).astype(np.float64)


def assert_numpy_histograms(result, store, group, bins: int) -> None:
    """Each row equals `numpy.histogram` of that epoch's values over the run-wide range's `bins` bins."""
    names = store.resolve(group)
    everything = np.concatenate([values_at(store, names, i) for i in range(store.epochs.size)])
    _, edges = np.histogram(everything, bins=bins)
    np.testing.assert_array_equal(result.attrs["edges"], edges)
    np.testing.assert_array_equal(result["bin_low"], edges[:-1])
    np.testing.assert_array_equal(result.epoch, store.epochs)
    for i in range(store.epochs.size):
        np.testing.assert_array_equal(result[i], np.histogram(values_at(store, names, i), bins=edges)[0])


def test_histograms_equal_numpy_and_update_only_new_epochs(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    write_random_store(path, tiny_model, [0, 10, 20, 30], chunk_epochs=2)
    store = geostore.open_store(path)
    first = store.histograms("attention", bins=16)
    assert first.dims == ("epoch", "bin") and first.shape == (4, 16)
    assert_numpy_histograms(first, store, "attention", 16)
    assert_numpy_histograms(store.histograms(["W_in", "W_U"], bins=5), store, ["W_in", "W_U"], 5)

    with TaskCounter() as counter:  # reopened: from the cache, nothing read
        again = geostore.open_store(path).histograms("attention", bins=16)
    assert counter.count == 0
    np.testing.assert_array_equal(again, first)
    (cache,) = (path / derived.DERIVED / weights.HISTOGRAMS).glob("16-*.npz")
    cache.write_bytes(cache.read_bytes()[:200])  # torn: never read, recomputed
    np.testing.assert_array_equal(geostore.open_store(path).histograms("attention", bins=16), first)

    # New epochs inside the cached range: only their rows are read (extremes, then counts) and counted.
    writer = StoreWriter.open(path, model=tiny_model, task=TASK)
    writer.append([40, 50], {k: v * 0.01 for k, v in random_params(tiny_model, range(2), 1).items()})
    store = geostore.open_store(path)
    with TaskCounter() as counter:
        updated = store.histograms("attention", bins=16)
    with TaskCounter() as full_counter:
        fresh = geostore.open_store(fresh_copy(path, tmp_path / "fresh.zarr")).histograms("attention", bins=16)
    assert 0 < counter.count < full_counter.count
    np.testing.assert_array_equal(updated[:4], first)
    np.testing.assert_array_equal(updated, fresh)
    np.testing.assert_array_equal(updated.attrs["edges"], fresh.attrs["edges"])

    # Epochs before and outside the range: the bins move and every epoch is counted again.
    writer.insert([5], {k: v * 10 for k, v in random_params(tiny_model, range(1), 2).items()})
    store = geostore.open_store(path)
    assert_numpy_histograms(store.histograms("attention", bins=16), store, "attention", 16)


def test_histogram_arguments_are_checked(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    write_random_store(path, tiny_model, [0, 1])
    store = geostore.open_store(path)
    for bins in (0, -3, 2.5):
        with pytest.raises(StoreError, match="bins must be a positive integer"):
            store.histograms("all", bins=bins)
    with pytest.raises(StoreError, match="unknown group 'nope'"):
        store.histograms("nope")
    assert not (path / derived.DERIVED).exists()


def test_spectrum_equals_numpy_svd_per_layer_and_head(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    params = write_random_store(path, tiny_model, [0, 10, 20])
    store = geostore.open_store(path)
    result = store.spectrum("W_Q")
    assert result["singular_values"].dims == ("epoch", "layer", "head", "singular_index")
    assert result["participation_ratio"].dims == ("epoch", "layer", "head")
    expected = np.linalg.svd(params["W_Q"].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(result["singular_values"], expected, rtol=1e-12)
    np.testing.assert_allclose(result["participation_ratio"], expected.sum(-1) ** 2 / (expected ** 2).sum(-1))
    np.testing.assert_allclose(store.spectrum("W_O[0]")["singular_values"],
                               np.linalg.svd(params["W_O"][:, 0].astype(np.float64), compute_uv=False))
    assert store.spectrum("W_E")["singular_values"].dims == ("epoch", "singular_index")
    with pytest.raises(StoreError, match="b_O has shape \\(1, 16\\): a spectrum needs a matrix"):
        store.spectrum("b_O")
    with pytest.raises(StoreError, match="'attention' is a group"):
        store.spectrum("attention")


def test_participation_ratio_is_one_at_rank_one_and_n_for_the_identity(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    assert participation_ratio(singular_values(np.eye(5))) == pytest.approx(5)
    assert participation_ratio(singular_values(np.outer(rng.standard_normal(6), rng.standard_normal(4)))) == \
        pytest.approx(1)
    assert np.isnan(participation_ratio(singular_values(np.zeros((3, 3)))))
    # Through a store: W_E (8 x 16) a rank-1 matrix at the first epoch, eight unit singular values at the second.
    params = random_params(tiny_model, range(2))
    params["W_E"] = np.stack([np.outer(rng.standard_normal(8), rng.standard_normal(16)), np.eye(8, 16)])
    StoreWriter.open(tmp_path / "s.zarr", model=tiny_model, task=TASK).append([0, 1], params)
    ratio = geostore.open_store(tmp_path / "s.zarr").spectrum("W_E")["participation_ratio"]
    np.testing.assert_allclose(ratio, [1, 8], rtol=1e-6)


def test_cli_prints_the_participation_ratio_per_epoch(tmp_path, tiny_model, capsys):
    path = tmp_path / "s.zarr"
    write_random_store(path, tiny_model, [0, 10])
    assert main(["spectrum", str(path), "W_Q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ratio = geostore.open_store(path).spectrum("W_Q")["participation_ratio"]
    assert lines[0].split() == ["epoch", "layer0.head0", "layer0.head1"]
    assert [float(v) for v in lines[2].split()[1:]] == pytest.approx(ratio[1].values.ravel(), rel=1e-4)
    assert main(["spectrum", str(path), "b_U"]) == 3
    assert "b_U" in capsys.readouterr().err
