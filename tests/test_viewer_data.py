"""geoview's Qt-free parts: the view-model over a real store and the shared state."""

from __future__ import annotations

import numpy as np
import pytest

import geostore
from tests.conftest import random_params
from viewer import data as viewer_data
from viewer.data import HISTOGRAM_BINS, ViewerData, fixed_histograms
from viewer.state import ViewerState

EPOCHS = [0, 10, 20, 40, 80, 160, 320, 640]


def make_store(path, model, epochs=EPOCHS, *, flatness: bool = True, metrics: bool = True, seed: int = 0):
    """A real store of random-walk weights; flatness of every epoch but the first when asked."""
    from geostore.store.writer import StoreWriter

    n = len(epochs)
    params = {name: np.cumsum(value, axis=0) for name, value in random_params(model, range(n), seed).items()}
    steps = np.linspace(0, 1, n)
    recorded = {"train_loss": 2.0 * np.exp(-6 * steps), "test_loss": 2.5 - steps,
                "train_accuracy": np.minimum(1, 0.1 + 2 * steps), "test_accuracy": steps} if metrics else None
    writer = StoreWriter.open(path, model=model, task={"family": "modular_addition", "p": 7})
    writer.append(epochs, params, recorded)
    if flatness:
        rng = np.random.default_rng(seed)
        baseline = 2.0 * np.exp(-4 * steps[1:])
        deltas = np.abs(rng.standard_normal((n - 1, 16))) * baseline[:, None] * np.linspace(1, 0.05, n - 1)[:, None]
        writer.write_flatness(epochs[1:], baseline, deltas, epsilon=0.1, seed=0)
    return path


@pytest.fixture
def store(tmp_path, tiny_model):
    return geostore.open_store(make_store(tmp_path / "run.zarr", tiny_model))


def test_fixed_histograms_share_bins_and_count_every_finite_value():
    values = np.array([[0.0, 1.0, 2.0, 3.0], [np.nan, np.nan, np.nan, np.nan], [1.5, 1.5, np.nan, 3.0]])
    edges, counts = fixed_histograms(values, 3)
    np.testing.assert_allclose(edges, [0, 1, 2, 3])
    assert counts.tolist() == [[1, 1, 2], [0, 0, 0], [0, 2, 1]]
    for row, expected in zip(values, counts, strict=True):
        assert np.histogram(row[np.isfinite(row)], edges)[0].tolist() == expected.tolist()


def test_fixed_histograms_of_constant_values_still_have_width():
    edges, counts = fixed_histograms(np.full((2, 5), 0.25), 4)
    assert edges[0] < 0.25 < edges[-1] and counts.sum() == 10


def test_nearest_and_exact_epochs(store):
    data = ViewerData(store)
    assert [data.nearest_index(e) for e in (-5, 0, 14, 16, 100, 10_000)] == [0, 0, 1, 2, 4, 7]
    assert data.index_of(320) == 6
    with pytest.raises(geostore.StoreError, match="epoch 321 is not stored \\(nearest: 320\\)"):
        data.index_of(321)


def test_everything_comes_through_the_store_api(store):
    data = ViewerData(store)
    trajectory = data.load_trajectory("mlp")
    expected = store.pca("mlp", n_components=len(EPOCHS) - 1)
    np.testing.assert_allclose(trajectory.projections, expected["projections"])
    assert data.trajectory("mlp") is trajectory and data.trajectory("all") is None
    for per_epoch in (True, False):
        velocities = data.load_velocities(per_epoch)
        for group, values in store.velocities(per_epoch=per_epoch).items():
            np.testing.assert_allclose(velocities[group], values)
    flatness = data.load_flatness()
    summary = store.flatness_summary(threshold=flatness.threshold)
    for key, values in summary.items():
        np.testing.assert_allclose(flatness.summary[key], values)
    assert flatness.counts.shape == (len(EPOCHS), HISTOGRAM_BINS)
    assert flatness.counts[0].sum() == 0 and (flatness.counts[1:].sum(axis=1) == 16).all()
    assert flatness.complete.tolist() == [False] + [True] * (len(EPOCHS) - 1)


def test_reasons_for_missing_data(tmp_path, tiny_model):
    bare = ViewerData(geostore.open_store(make_store(tmp_path / "bare.zarr", tiny_model, flatness=False,
                                                     metrics=False)))
    assert "geostore flatness" in bare.missing("flatness") and "metrics" in bare.missing("metrics")
    assert not bare.has_flatness
    with pytest.raises(geostore.StoreError):
        bare.load_flatness()


def test_a_store_of_one_epoch_is_refused(tmp_path, tiny_model):
    one = geostore.open_store(make_store(tmp_path / "one.zarr", tiny_model, [5], flatness=False))
    with pytest.raises(geostore.StoreError, match="needs at least two"):
        ViewerData(one)


def test_state_emits_only_real_changes(store):
    state = ViewerState(5, tuple(store.groups))  # the store's groups: all, embedding, attention, mlp
    seen = []
    state.epoch_changed.connect(seen.append)
    state.group_changed.connect(seen.append)
    state.set_index(0)
    state.set_index(3)
    state.step(10)
    state.step(-100)
    state.set_group("all")
    state.set_group("mlp")
    assert seen == [3, 4, 0, "mlp"]
    with pytest.raises(ValueError, match="unknown group"):
        state.set_group("bias")


def test_the_spectrum_starts_on_a_matrix_whose_svd_is_quick(store, monkeypatch):
    """A vocabulary-sized embedding (GPT-2's `W_E`: seconds of SVD per epoch) is not the Spectrum dock's default."""
    data = ViewerData(store)
    assert data.default_matrix == data.matrices[0] == "W_E"
    embedding = int(np.prod(store.params["W_E"].shape[-2:]))
    monkeypatch.setattr(viewer_data, "SPECTRUM_DEFAULT_SIZE", embedding - 1)
    data = ViewerData(store)
    assert data.default_matrix != "W_E"
    assert np.prod(store.params[data.default_matrix].shape[-2:]) < embedding
