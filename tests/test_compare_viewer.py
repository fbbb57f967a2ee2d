"""geoview's comparison mode on a real 3-run sweep, offscreen (pytest-qt): overlays checked against the sweep's own
results and numpy on the stored weights."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QImage

import geostore
from geostore.store.location import Location
from geostore.store.sweep import create_sweep
from tests.conftest import ma_model
from tests.test_viewer import private_settings  # noqa: F401 (autouse: geoview's settings in a temp file)
from tests.test_viewer_data import make_store
from viewer import palette
from viewer.app import load_data, main
from viewer.compare_window import CompareWindow
from viewer.data import ViewerData
from viewer.sweep_data import SweepViewerData
from viewer.sweep_state import SweepState

RUNS = {"seed0": [0, 10, 20, 40, 80], "seed1": [0, 10, 20, 40, 80, 160], "seed2": [5, 10, 20, 40, 80]}
FLAT = ("seed0", "seed1")
"""The runs given flatness; seed2 has none."""


@pytest.fixture(scope="module")
def sweep_path(tmp_path_factory):
    """One sweep for the module (the shared basis the window computes is cached in it for the next test)."""
    from geostore.family.modular_addition import model_config

    path = tmp_path_factory.mktemp("compare") / "sweep.zarr"
    create_sweep(Location.of(path))
    model = ma_model(model_config(7, d_model=16, n_heads=2))  # conftest's tiny model
    for seed, (run, epochs) in enumerate(RUNS.items()):
        make_store(path / "runs" / run, model, epochs, flatness=run in FLAT, seed=seed)
    return path


def weights(store: geostore.Store) -> dict[int, np.ndarray]:
    """epoch -> the run's weights of group `all` there, flattened, float64 (read independently of the analyses)."""
    flat = np.concatenate([np.asarray(store.member(name), dtype=np.float64).reshape(store.epochs.size, -1)
                           for name in store.resolve("all")], axis=1)
    return dict(zip(store.epochs.tolist(), flat, strict=True))


def visible_data(dock, run: str) -> list:
    """`run`'s drawn curves in `dock` that are shown and hold points."""
    return [item for item in dock.run_items[run] if item.isVisible() and getattr(item, "xData", None) is not None
            and len(item.xData)]


def test_the_comparison_window_overlays_every_run(sweep_path, qtbot, private_settings):  # noqa: F811
    palette.apply_theme()
    sweep = geostore.open_sweep(sweep_path)
    window = CompareWindow(SweepViewerData(sweep), settings=QSettings(str(private_settings),
                                                                      QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    window.resize(1200, 800)
    window.show()
    qtbot.waitExposed(window)
    assert window.jobs.wait() and not window.jobs.failures
    d, data = window.docks, window.data
    assert data.epochs.tolist() == sorted({e for es in RUNS.values() for e in es})

    shared = sweep.pca("all", 3)["projections"]
    theta = {run: weights(sweep[run]) for run in RUNS}
    for run, epochs in RUNS.items():
        store = sweep[run]
        path = d["trajectory"].paths[run]
        np.testing.assert_allclose(np.c_[path.xData, path.yData], shared.sel(run=run, epoch=epochs)[:, :2])
        loss = d["training"].curves[(d["training"].loss_plot, run, "test_loss")]
        assert loss.xData.tolist() == epochs
        np.testing.assert_allclose(loss.yData, store.metrics()["test_loss"])
        steps = [np.linalg.norm(theta[run][b] - theta[run][a]) / (b - a) for a, b in pairwise(epochs)]
        velocity = d["velocity"].curves[(d["velocity"].velocity_plot, run, "velocity_per_epoch")]
        assert velocity.xData.tolist() == epochs and np.isnan(velocity.yData[0])  # each step at its later epoch
        np.testing.assert_allclose(velocity.yData[1:], steps, rtol=1e-5)
    flatness = d["flatness"]
    for run in FLAT:
        curve = flatness.curves[(flatness.flatness_plot, run, "mean_delta_loss")]
        np.testing.assert_allclose(curve.yData, sweep[run].flatness_summary()["mean_delta_loss"])
    assert not visible_data(flatness, "seed2") and "no flatness: seed2" in flatness.flatness_plot.titleLabel.text

    def distances(reference: str, run: str) -> np.ndarray:
        """numpy's ‖θ_run − θ_reference‖ on the shared axis, NaN where not both hold an epoch."""
        return np.array([np.linalg.norm(theta[run][e] - theta[reference][e])
                         if e in theta[run] and e in theta[reference] else np.nan for e in data.epochs.tolist()])

    divergence = d["divergence"]  # from the reference seed0 to every other shown run, on the epochs both hold
    expected = sweep.divergence("seed0", "seed1")
    np.testing.assert_allclose(divergence.curve_values("seed1")[np.searchsorted(data.epochs, expected["epoch"])],
                               expected["distance"])
    for run in ("seed1", "seed2"):
        np.testing.assert_allclose(divergence.curve_values(run), distances("seed0", run), rtol=1e-5)
    assert not visible_data(divergence, "seed0")

    # the slider marks each run holding the epoch, on its own point
    for epoch, holders in ((5, ["seed2"]), (10, list(RUNS)), (160, ["seed1"])):
        window.epoch_control.slider.setValue(data.index_of(epoch))
        assert d["trajectory"].marked_runs() == holders
        ring = d["trajectory"].rings[holders[0]]
        np.testing.assert_allclose([ring.data["x"][0], ring.data["y"][0]], shared.sel(run=holders[0], epoch=epoch)[:2])

    # unchecking a run in the list removes its items from every dock, its columns from the exports
    window.runs_dock.item("seed1").setCheckState(Qt.CheckState.Unchecked)
    assert window.state.selected == ("seed0", "seed2")
    for dock in d.values():
        assert not visible_data(dock, "seed1"), dock.NAME
        assert not any(column.startswith("seed1") for column in dock.table()), dock.NAME
    window.epoch_control.slider.setValue(data.index_of(10))
    assert d["trajectory"].marked_runs() == ["seed0", "seed2"]
    assert visible_data(divergence, "seed2") and not visible_data(divergence, "seed1")

    # a chosen pair: seed2 from seed1 (the reference need not be shown)
    divergence.reference.setCurrentIndex(divergence.reference.findData("seed1"))
    divergence.other.setCurrentIndex(divergence.other.findData("seed2"))
    assert window.jobs.wait()
    assert window.state.reference == "seed1"
    np.testing.assert_allclose(divergence.curve_values("seed2"), distances("seed1", "seed2"), rtol=1e-5)
    assert [run for run in RUNS if visible_data(divergence, run)] == ["seed2"]
    window.close()


def test_geoview_opens_a_sweep_in_comparison_mode_and_one_run_with_run(sweep_path, tmp_path, capsys,
                                                                       private_settings):  # noqa: F811
    out = tmp_path / "compare.png"
    assert main([str(sweep_path), "--screenshot", str(out), "--size", "1024x700", "--epoch", "5"]) == 0
    image = QImage(str(out))
    assert (image.width(), image.height()) == (1024, 700)  # fits a small laptop screen
    assert not private_settings.exists()
    assert isinstance(load_data(str(sweep_path), None), SweepViewerData)
    assert isinstance(load_data(str(sweep_path), "seed0"), ViewerData)  # `--run NAME`: today's single-run view
    capsys.readouterr()
    assert main([str(sweep_path), "--epoch", "7", "--screenshot", str(tmp_path / "bad.png")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 7 is not stored (nearest: 5)" in err
    assert main([str(sweep_path), "--follow", "--screenshot", str(tmp_path / "follow.png")]) == 1
    assert "--follow watches one run: add --run" in capsys.readouterr().err


def test_the_run_selection_emits_only_real_changes_and_refuses_unknown_runs():
    state = SweepState(4, ("all",), ("a", "b", "c"))
    seen = []
    state.selection_changed.connect(seen.append)
    state.reference_changed.connect(seen.append)
    state.set_shown("b", False)
    state.set_selected(["c", "a"])  # the same runs: no event; kept in the sweep's order
    state.set_reference("b")  # the reference need not be shown
    state.set_reference("b")
    assert seen == [("a", "c"), "b"] and state.selected == ("a", "c")
    with pytest.raises(ValueError, match="unknown run 'd'"):
        state.set_selected(["a", "d"])
    with pytest.raises(ValueError, match="unknown run 'd'"):
        state.set_reference("d")
    assert state.selected == ("a", "c") and state.reference == "b"
