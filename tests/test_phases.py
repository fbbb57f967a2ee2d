"""Training phases from recorded curves: hand-made curves with known boundaries, the options, a real store."""

from __future__ import annotations

import numpy as np
import pytest

import geostore
from geostore.analysis.phases import training_phases
from tests.conftest import random_params

EPOCHS = np.arange(0, 105, 5)  # 0, 5, ..., 100


def grokking_curves() -> dict[str, np.ndarray]:
    """Train loss reaches 1e-6 at epoch 20; test loss peaks at 4.0 (epoch 35), first 80% down (<= 0.8) at epoch
    60, first <= 1e-6 at epoch 80."""
    train = np.array([3.0, 1.0, 1e-2, 1e-4, 5e-7] + [1e-8] * 16)
    test = np.full(EPOCHS.size, 3.5)
    test[:7] = [2.0, 2.5, 3.0, 3.5, 3.8, 3.9, 3.7]
    test[7] = 4.0  # the peak, at epoch 35
    test[8:12] = [3.9, 3.0, 2.0, 1.0]  # epochs 40..55: not yet 80% down
    test[12:16] = [0.8, 1e-2, 1e-4, 1e-5]  # epoch 60: exactly 80% down
    test[16:] = [1e-6, 1e-7, 1e-7, 1e-7, 1e-7]  # epoch 80: first <= 1e-6
    return {"train_loss": train, "test_loss": test, "train_accuracy": np.minimum(1.0, EPOCHS / 50)}


def test_phases_of_hand_made_curves_have_the_known_boundaries():
    curves = grokking_curves()
    assert training_phases(EPOCHS, **curves) == {"memorisation": (0, 20), "plateau": (20, 60),
                                                 "second_descent": (60, 80), "final": (80, 100)}
    # 100% train accuracy ends memorisation when it comes before the loss threshold (epoch 50 here only if later)
    early = {**curves, "train_accuracy": np.where(EPOCHS >= 15, 1.0, 0.5)}
    assert training_phases(EPOCHS, **early)["memorisation"] == (0, 15)


def test_thresholds_are_options_and_a_run_that_never_gets_there_ends_at_its_minimum():
    curves = grokking_curves()
    phases = training_phases(EPOCHS, **curves, train_loss_threshold=1e-3, descent_fraction=0.5,
                             test_loss_threshold=1e-4)
    assert phases == {"memorisation": (0, 15), "plateau": (15, 50), "second_descent": (50, 70), "final": (70, 100)}
    stuck = curves["test_loss"].copy()
    stuck[14:] = [1e-3, 5e-4, 2e-4, 1e-4, 3e-4, 4e-4, 5e-4]  # never reaches 1e-6; lowest at epoch 85
    assert training_phases(EPOCHS, curves["train_loss"], stuck)["second_descent"] == (60, 85)
    assert training_phases(EPOCHS, curves["train_loss"], stuck)["final"] == (85, 100)
    with pytest.raises(ValueError, match="descent_fraction"):
        training_phases(EPOCHS, **curves, descent_fraction=0)


def test_only_the_phases_a_run_reaches_and_unrecorded_values_are_never_boundaries():
    curves = grokking_curves()
    flat_test = np.full(EPOCHS.size, 3.0)
    assert training_phases(EPOCHS, curves["train_loss"], flat_test) == {"memorisation": (0, 20)}
    assert training_phases(EPOCHS, np.full(EPOCHS.size, 1.0), flat_test) == {}
    holes = {name: values.copy() for name, values in curves.items()}
    holes["train_loss"][4] = np.nan  # epoch 20 unrecorded: memorisation ends at the next recorded epoch
    holes["test_loss"][12] = np.nan  # epoch 60 unrecorded: the descent starts at 65
    assert training_phases(EPOCHS, **holes) == {"memorisation": (0, 25), "plateau": (25, 65),
                                                "second_descent": (65, 80), "final": (80, 100)}


def test_a_store_gives_the_phases_of_its_recorded_curves(tmp_path, tiny_model):
    from geostore.store.writer import StoreWriter

    curves = grokking_curves()
    params = {name: np.cumsum(v, axis=0) for name, v in random_params(tiny_model, range(EPOCHS.size)).items()}
    writer = StoreWriter.open(tmp_path / "grok.zarr", model=tiny_model, task={"family": "modular_addition", "p": 7})
    writer.append(EPOCHS.tolist(), params, {**curves, "test_accuracy": np.zeros(EPOCHS.size)})
    writer.close()
    store = geostore.open_store(tmp_path / "grok.zarr")
    assert store.phases() == training_phases(EPOCHS, **curves)
    assert store.phases(descent_fraction=0.5)["second_descent"] == (50, 80)
