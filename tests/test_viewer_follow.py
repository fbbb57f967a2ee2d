"""`geoview --follow` on a real store that a Recorder extends while the window is open (pytest-qt, offscreen)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from test_follow import _recorder, _state

import geostore
from tests.conftest import random_params
from tests.test_viewer import open_window, private_settings  # noqa: F401 (fixtures)

EPOCHS = [0, 5, 10, 20, 40]


def _pca_ratio(store, k):
    """PC variance ratios of the flattened trainable weights by numpy's SVD (independent of `Store.pca`)."""
    x = np.asarray(store.flatten("all").compute(), dtype=np.float64)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    return (s**2 / (s**2).sum())[:k]


def test_a_followed_window_shows_new_epochs_and_follows_the_newest_unless_moved(
        qtbot, open_window, tmp_path, tiny_model, tiny_config):  # noqa: F811
    """Recorded epochs appear (slider, rug, curves, the refitted trajectory), the slider follows the newest epoch
    but stays where the user moved it, and an analysis computed meanwhile enables its dock."""
    path = tmp_path / "live.zarr"
    params = random_params(tiny_model, EPOCHS, seed=5)
    recorder = _recorder(path, tiny_model, tiny_config)

    def record(i):
        recorder.record(EPOCHS[i], _state(tiny_model, params, i), {"train_loss": 1.0 / (i + 1)})

    for i in range(3):
        record(i)
    window = open_window(path, index=2, follow=True)
    window.follow_timer.setInterval(50)
    control, training = window.epoch_control, window.docks["training"]

    def shows(n, analysed=0):
        def check():  # the window caught up with the store: every epoch, and the analysed ones, loaded and drawn
            assert control.slider.maximum() == n - 1 and not window.jobs.busy, (
                window.statusBar().currentMessage(), window.jobs.failures)
            assert analysed == 0 or window.data.store.analysis_epochs("flatness").size == analysed
        qtbot.waitUntil(check, timeout=60_000)  # the 2 shared cores are slow
        assert window.data.n_epochs == n
        np.testing.assert_array_equal(window.data.epochs, EPOCHS[:n])
        marks = [item for item in training.rug.items if isinstance(item, pg.ScatterPlotItem)]
        np.testing.assert_array_equal(marks[0].getData()[0], EPOCHS[:n])  # the rug extended

    record(3)
    shows(4)
    assert window.state.index == 3 and control.spin.value() == EPOCHS[3]  # it followed the newest epoch
    assert control.position.text() == "checkpoint 4 / 4"
    trajectory = window.data.trajectory("all")
    assert trajectory.projections.shape[0] == 4  # refitted on the new epochs, drawn by the dock
    assert len(window.docks["trajectory"].points.data) == 4
    np.testing.assert_allclose(trajectory.explained_variance_ratio[:3],
                               _pca_ratio(geostore.open_store(path), 3), rtol=1e-6)
    np.testing.assert_array_equal(training.loss_plot.listDataItems()[0].yData, [1, 1 / 2, 1 / 3, 1 / 4])

    control.slider.setValue(1)  # the user moves away from the newest epoch: new epochs do not move it
    assert window.docks["flatness"].reason is not None  # no flatness stored yet
    record(4)
    geostore.compute(path, n_directions=2, progress=False)  # an analysis added while the window follows
    shows(5, analysed=5)
    assert window.state.index == 1 and control.spin.value() == EPOCHS[1]
    assert control.position.text() == "checkpoint 2 / 5"
    assert window.docks["flatness"].reason is None
    np.testing.assert_array_equal(window.data.flatness.complete, [True] * 5)

    qtbot.keyClick(control, Qt.Key.Key_End)  # back at the newest epoch, where new ones will be followed again
    assert window.state.index == 4 and control.spin.value() == EPOCHS[4]


def test_geoview_follow_waits_for_a_store_that_holds_too_few_epochs(tmp_path, tiny_model, tiny_config, capsys):
    """A run that has just begun recording holds one epoch: `--follow` waits (saying so once) for the second."""
    import threading

    from viewer.app import wait_for_epochs

    path = tmp_path / "new.zarr"
    params = random_params(tiny_model, range(2), seed=6)
    recorder = _recorder(path, tiny_model, tiny_config)
    recorder.record(0, _state(tiny_model, params, 0))
    later = threading.Timer(0.3, lambda: recorder.record(7, _state(tiny_model, params, 1)))
    later.start()
    store = wait_for_epochs(geostore.open_store(path), poll=0.05)
    later.join()
    np.testing.assert_array_equal(store.epochs, [0, 7])
    assert capsys.readouterr().err == f"geoview: {path} holds 1 epoch(s); waiting for 2\n"


def test_a_newer_commit_comes_with_everything_the_old_data_had_loaded(tmp_path, tiny_model):
    """`ViewerData.follow` loads again every cache the docks filled (trajectory, velocities, flatness, curvature,
    weight histograms, spectra), over the new epochs: equal to what fresh data of the store loads."""
    from geostore.store.writer import StoreWriter
    from tests.test_viewer_data import EPOCHS as STORED
    from tests.test_viewer_data import make_store
    from viewer.data import ViewerData

    path = make_store(tmp_path / "run.zarr", tiny_model)
    data = ViewerData(geostore.open_store(path))
    data.load_trajectory("all")
    data.load_velocities(True)
    data.load_flatness()
    data.load_curvature()
    data.load_weight_histograms("all")
    data.load_spectrum(data.matrices[0])
    assert data.follow() is None  # nothing new
    with StoreWriter.open(path, model=tiny_model, task={"family": "modular_addition", "p": 7}) as writer:
        writer.append([STORED[-1] + 10], random_params(tiny_model, [0], seed=9))
    new = data.follow()
    assert new.n_epochs == len(STORED) + 1 and set(new._cache) == set(data._cache)
    fresh = ViewerData(geostore.open_store(path))
    np.testing.assert_allclose(new._cache[("trajectory", "all")].projections,
                               fresh.load_trajectory("all").projections)
    np.testing.assert_array_equal(new._cache[("velocities", True)]["all"], fresh.load_velocities(True)["all"])
