"""The loss plane of the trajectory's PC1 and PC2 (`geostore plane`): real stores, the family's real model, and
the Landscape dock drawing it (pytest-qt, offscreen)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import geostore
import geostore.analysis.plane as plane_numerics
from geostore.cli import main
from geostore.family import hooked
from geostore.family.modular_addition import probe
from geostore.store.writer import StoreWriter
from tests.conftest import random_params
from tests.test_viewer import open_window, private_settings  # noqa: F401 (fixtures)
from tests.test_viewer_data import EPOCHS, make_store
from viewer.data import ViewerData


@pytest.fixture
def store_path(tmp_path, tiny_model):
    """A real store of 8 random-walk epochs of the p=7 modular-addition model."""
    return make_store(tmp_path / "run.zarr", tiny_model)


def plane_of(path, group: str = "all"):
    return geostore.open_store(path).loss_plane(group)


def compute(path, **kwargs):
    return geostore.loss_plane(path, device="cpu", progress=False, **kwargs)


def numpy_pca(store, names):
    """Mean of every parameter over the epochs and the group's first two principal axes, by numpy's SVD."""
    params = {name: np.asarray(store.params[name], dtype=np.float64) for name in store.table.names}
    mean = {name: value.mean(axis=0) for name, value in params.items()}
    x = np.concatenate([params[n].reshape(len(store.epochs), -1) - mean[n].reshape(1, -1) for n in names], axis=1)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return mean, vt[:2], u[:, :2] * s[:2]


def test_plane_losses_equal_a_plain_float64_forward_of_the_rebuilt_weights(store_path, tiny_model):
    report = compute(store_path, group="mlp", resolution=5, span=1.5, dtype="float64")
    assert (report.group, report.resolution, report.computed, report.already) == ("mlp", 5, 5, 0)
    store = geostore.open_store(store_path)
    plane = store.loss_plane("mlp")
    names = store.resolve("mlp")
    mean, axes, scores = numpy_pca(store, names)
    signs = np.sign(np.sum(scores * plane["projections"].values, axis=0))
    np.testing.assert_allclose(plane["projections"].values, scores * signs, rtol=1e-9, atol=1e-9)
    axes = axes * signs[:, None]
    # the grid spans the trajectory's scores, 1.5 times their half-range either side of their middle
    for k, name in enumerate(("pc1", "pc2")):
        low, high = scores[:, k].min() * signs[k], scores[:, k].max() * signs[k]
        low, high = min(low, high), max(low, high)
        grid = plane[name].values
        assert grid.size == 5 and grid[0] < low and grid[-1] > high
        np.testing.assert_allclose([grid[0], grid[-1]], [(low + high) / 2 - 0.75 * (high - low),
                                                         (low + high) / 2 + 0.75 * (high - low)], rtol=1e-12)
    assert plane["loss"].dims == ("pc1", "pc2") and plane.attrs["dtype"] == "float64"
    assert plane.attrs["members"] == list(names) and plane.attrs["stale"] is False
    assert plane.attrs["fit_epochs"] == EPOCHS and plane.attrs["complete_rows"] == 5

    module = tiny_model.build().double()
    tokens, labels = probe(7)
    widths = np.cumsum([mean[n].size for n in names])[:-1]
    for i, j in ((0, 0), (4, 4), (1, 3), (2, 2)):
        a, b = plane["pc1"].values[i], plane["pc2"].values[j]
        moved = a * axes[0] + b * axes[1]  # only the group's columns move; the rest stays at the mean
        point = dict(mean) | {n: mean[n] + piece.reshape(mean[n].shape)
                              for n, piece in zip(names, np.split(moved, widths), strict=True)}
        hooked.load_stored(module, tiny_model.table, point)
        with torch.no_grad():
            truth = F.cross_entropy(module(tokens)[:, -1, :7], labels).item()
        assert plane["loss"].values[i, j] == pytest.approx(truth, rel=1e-8), (i, j)


def test_an_interrupted_plane_resumes_with_only_the_missing_rows_and_the_same_values(store_path, tmp_path,
                                                                                     monkeypatch, capsys):
    other = tmp_path / "other.zarr"
    shutil.copytree(store_path, other)
    compute(other, resolution=6)
    want = plane_of(other)["loss"].values

    real, calls = plane_numerics.plane_row, []

    def interrupted_at(row: int):
        """`plane_row` with Ctrl-C while row `row` (0-based) of a run is being evaluated."""
        calls.clear()

        def row_or_interrupt(*args, **kwargs):
            calls.append(1)
            if len(calls) == row + 1:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(plane_numerics, "plane_row", row_or_interrupt)

    interrupted_at(2)
    assert main(["plane", str(store_path), "--resolution", "6", "--quiet", "--device", "cpu"]) == 130
    assert "keeps the rows of the plane finished so far" in capsys.readouterr().err
    monkeypatch.undo()
    kept = plane_of(store_path)
    assert kept.attrs["complete_rows"] == 2 and np.isnan(kept["loss"].values[2:]).all()
    assert kept["loss"].values[:2].tobytes() == want[:2].tobytes()

    report = compute(store_path)  # the stored settings; the lock was released by the interrupted run
    assert (report.resolution, report.computed, report.already) == (6, 4, 2)
    assert plane_of(store_path)["loss"].values.tobytes() == want.tobytes()
    assert compute(store_path).computed == 0
    interrupted_at(0)  # a recompute stopped before its first row leaves the complete plane as it was
    assert main(["plane", str(store_path), "--recompute", "--quiet", "--device", "cpu"]) == 130
    monkeypatch.undo()
    assert plane_of(store_path)["loss"].values.tobytes() == want.tobytes()


def test_other_settings_and_a_stale_basis_are_refused_unless_recomputed(store_path, tiny_model, capsys):
    compute(store_path, resolution=4)
    for args, message in ((["--resolution", "5"], "--resolution 5: the stored loss plane of group all has 4"),
                          (["--span", "2"], "--span 2.0: the stored loss plane of group all has 1.25"),
                          (["--span", "0", "--recompute"], "--span must be a positive number"),
                          (["--resolution", "1", "--recompute"], "--resolution must be at least 2"),
                          (["--group", "nope"], "nope")):
        assert main(["plane", str(store_path), "--quiet", *args]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], (args, err)
    with pytest.raises(geostore.StoreError, match="geostore plane .* --group attention"):
        plane_of(store_path, "attention")
    assert plane_of(store_path).attrs["resolution"] == 4  # refused runs left the plane as it was

    writer = StoreWriter.open(store_path, model=tiny_model, task={"family": "modular_addition", "p": 7})
    with writer:
        writer.append([1280], random_params(tiny_model, [0], seed=5))
    stale = plane_of(store_path)
    assert stale.attrs["stale"] is True and stale["epoch"].values.tolist() == EPOCHS
    shown = ViewerData(geostore.open_store(store_path)).load_plane("all")  # what the Landscape dock draws
    assert shown.stale and shown.position(1280) is None  # the new epoch has no place on the old plane
    np.testing.assert_array_equal(shown.position(10), stale["projections"].values[1])
    assert "stale: fitted on 8 epochs, the store holds 9" in geostore.open_store(store_path).describe()
    assert main(["plane", str(store_path), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "is stale: its basis was fitted on 8 epochs, the store now holds 9" in err and "--recompute" in err
    assert main(["plane", str(store_path), "--quiet", "--recompute"]) == 0
    assert "loss plane of group all (4 x 4 points, span 1.25): 4 rows computed" in capsys.readouterr().out
    fresh = plane_of(store_path)
    assert fresh.attrs["stale"] is False and fresh["epoch"].values.tolist() == [*EPOCHS, 1280]
    assert "plane       group all: 4 x 4 points" in geostore.open_store(store_path).describe()


def test_the_landscape_dock_draws_the_plane_the_path_and_the_current_epoch(qtbot, open_window, store_path,  # noqa: F811
                                                                          tmp_path):
    compute(store_path, resolution=5)
    window = open_window(store_path)
    dock = window.docks["landscape"]
    assert dock.reason is None and dock.pages.currentWidget() is dock.canvas
    plane = plane_of(store_path)
    image = dock.image.image
    assert image.shape == (33, 33) and np.isfinite(image).all()
    levels = np.unique(image)
    assert 2 <= levels.size <= 14  # filled bands of log10 loss, their range that of the plane's losses
    low, high = dock.colour_bar.levels()
    assert low == pytest.approx(np.log10(plane["loss"].values.min()))
    assert high == pytest.approx(np.log10(plane["loss"].values.max()))
    assert any(edge.path is not None or edge.data is not None for edge in dock.edges)
    x, y = dock.path.getData()
    np.testing.assert_allclose(np.c_[x, y], plane["projections"].values)
    for index in (0, 5):
        window.epoch_control.slider.setValue(index)
        marked = np.c_[dock.current.getData()]
        np.testing.assert_allclose(marked.ravel(), plane["projections"].values[index])
        assert dock.label.textItem.toPlainText() == f"epoch {EPOCHS[index]}"
        assert (dock.label.pos().x(), dock.label.pos().y()) == tuple(marked.ravel())
    index = int(np.argmin(np.abs(plane["pc1"].values - x[3]))), int(np.argmin(np.abs(plane["pc2"].values - y[3])))
    readout = dock.describe(dock.plane_plot, dock.path, 3)  # what hovering over the path's fourth point shows
    assert readout.startswith(f"epoch {EPOCHS[3]}\n") and f"{plane['loss'].values[index]:.4g}" in readout
    png = dock.export("png", tmp_path / "landscape.png")
    assert png.stat().st_size > 1000
    svg = dock.export("svg", tmp_path / "landscape.svg").read_text()
    assert "<svg" in svg and svg.count("<path") > 3
    header, *rows = dock.export("csv", tmp_path / "landscape.csv").read_text().splitlines()
    assert header == "pc1,pc2,loss" and len(rows) == 25
    assert float(rows[6].split(",")[2]) == pytest.approx(plane["loss"].values[1, 1], rel=1e-9)
