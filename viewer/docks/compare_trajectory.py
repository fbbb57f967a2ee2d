"""Trajectories of the shown runs in one shared basis (`Sweep.pca`: a PCA fitted on all runs' epochs), one colour
per run, the current epoch ringed on every run that holds it.

Each run's path joins the epochs it holds. The basis is fitted on every run of the sweep, so hiding a run moves
nobody else. Clicking near a point selects its epoch.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

from viewer import palette
from viewer.data import group_label
from viewer.docks.compare_base import CompareDock
from viewer.docks.trajectory import CLICK_RADIUS_PX, PAIRS, TrajectoryDock
from viewer.sweep_data import SharedTrajectory


class CompareTrajectoryDock(CompareDock, TrajectoryDock):
    """Every run's 2D path in the shared PCA basis of a component group; the group and PC choices are
    `TrajectoryDock`'s."""

    TITLE = "Trajectories (shared basis)"

    def build(self) -> None:
        self.group = self.combo("group", {g: group_label(g) for g in self.state.groups},
                                lambda: self.state.set_group(self.group.currentData()))
        self.group.setCurrentIndex(self.state.groups.index(self.state.group))
        self.pair = self.combo("PCs", PAIRS, self._draw)
        self.trajectory_plot = self.plot(x_label="PC1", y_label="PC2")
        self.paths: dict[str, pg.PlotDataItem] = {}
        self.rings: dict[str, pg.ScatterPlotItem] = {}
        for run in self.state.runs:
            colour = self.colour_of(run)
            self.paths[run] = self.for_run(run, self.trajectory_plot.plot(
                pen=palette.pen(colour, 1.4), symbol="o", symbolSize=5, symbolPen=None, symbolBrush=colour, name=run))
            # the run's colour on a white halo: a ring stays visible over every run's path
            ring = pg.ScatterPlotItem(size=18, pen=palette.pen(colour, 2.6), brush=pg.mkBrush("w"))
            ring.setZValue(30)
            self.trajectory_plot.addItem(ring, ignoreBounds=True)
            self.rings[run] = self.for_run(run, ring)
        self.static(*self.paths.values())
        self.current_label = pg.TextItem(color=palette.CURRENT, anchor=(0, 1))
        self.trajectory_plot.addItem(self.current_label, ignoreBounds=True)
        self.run_key(self.trajectory_plot)
        self.hover(self.trajectory_plot)
        self.canvas.scene().sigMouseClicked.connect(self._on_clicked)
        self.state.group_changed.connect(self._on_group_changed)

    def load(self) -> None:
        self._on_group_changed(self.state.group)

    def points(self, run: str) -> np.ndarray:
        """`(n_epoch, 2)`: `run`'s projections on the shown components over the shared axis (NaN where it lacks an
        epoch); empty before the basis is loaded."""
        trajectory: SharedTrajectory | None = self.data.trajectory(self.state.group)
        if trajectory is None:
            return np.zeros((0, 2))
        return trajectory.projections[trajectory.runs.index(run)][:, list(self.components)]

    def _draw(self) -> None:
        trajectory = self.data.trajectory(self.state.group)
        if trajectory is None or self.reason is not None:
            return
        a, b = self.components
        if b >= trajectory.projections.shape[2]:
            self.pair.setCurrentIndex(0)
            return
        ratio = trajectory.explained_variance_ratio * 100
        self.trajectory_plot.setLabel("bottom", f"PC{a + 1} ({ratio[a]:.1f}% of variance) · "
                                                f"{group_label(trajectory.group)} weights, all runs")
        self.trajectory_plot.setLabel("left", f"PC{b + 1} ({ratio[b]:.1f}% of variance)")
        for run, path in self.paths.items():
            xy = self.points(run)[self.data.present[run]]
            path.setData(xy[:, 0], xy[:, 1])
        self.trajectory_plot.autoRange(padding=0.06)
        self.refresh(self.state.index)

    def refresh(self, index: int) -> None:
        if self.data.trajectory(self.state.group) is None:
            return
        marked = None
        for run, ring in self.rings.items():
            xy = self.points(run)[index]
            held = bool(self.data.present[run][index]) and np.isfinite(xy).all()
            ring.setData(*(([xy[0]], [xy[1]]) if held else ([], [])))
            if held and run in self.state.selected and marked is None:
                marked = xy
        self.current_label.setText(f"{self.data.unit} {self.data.epochs[index]}" if marked is not None else "")
        if marked is not None:
            self.current_label.setPos(*marked)

    def marked_runs(self) -> list[str]:
        """The shown runs whose current-epoch ring is drawn."""
        return [run for run, ring in self.rings.items() if ring.isVisible() and len(ring.data)]

    def describe(self, plot: pg.PlotItem, item: pg.PlotDataItem, i: int) -> str:
        run = item.name()
        epoch = self.data.epochs[self.data.present[run]][i]
        a, b = self.components
        x, y = self.points_of(item)
        return f"{run} · {self.data.unit} {epoch}\nPC{a + 1} {x[i]:.4g}, PC{b + 1} {y[i]:.4g}"

    def _on_clicked(self, event) -> None:
        vb = self.trajectory_plot.vb
        if event.button() != Qt.MouseButton.LeftButton or self.data.trajectory(self.state.group) is None \
                or not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        where = vb.mapSceneToView(event.scenePos())
        width, height = vb.viewPixelSize()
        best, best_pixels = None, CLICK_RADIUS_PX
        for run in self.state.selected:
            xy = self.points(run)
            with np.errstate(invalid="ignore"):
                pixels = np.hypot((xy[:, 0] - where.x()) / width, (xy[:, 1] - where.y()) / height)
            pixels[~np.isfinite(pixels)] = np.inf
            if pixels.size and pixels.min() <= best_pixels:
                best, best_pixels = int(np.argmin(pixels)), pixels.min()
        if best is not None:
            self.state.set_index(best)

    def table(self) -> dict[str, np.ndarray]:
        trajectory = self.data.trajectory(self.state.group)
        if trajectory is None:
            return {}
        return {self.data.unit: self.data.epochs,
                **{f"{run}_{trajectory.group}_pc{k + 1}": trajectory.projections[i, :, k]
                   for i, run in enumerate(trajectory.runs) if run in self.state.selected
                   for k in range(trajectory.projections.shape[2])}}

    def get_settings(self) -> dict:
        return {"pair": self.pair.currentData()}

    def set_settings(self, settings: dict) -> None:
        index = self.pair.findData(settings.get("pair"))
        if index >= 0:
            self.pair.setCurrentIndex(index)
