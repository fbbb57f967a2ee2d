"""Trajectory: the run's path through weight space, projected on two principal components.

Points are coloured through shared brushes and drawn once per group or colouring; scrubbing moves only the
highlight ring. By default they are coloured by the test loss when the sources recorded it (grokking shows as a
sweep through the colour map where epoch colouring puts the whole post-memorisation phase in one knot), else
by log epoch; epoch, test accuracy and the stored baseline loss are the other choices. Clicking near a point
selects its epoch. The scree plot beside it says how faithful the 2D picture is.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

from viewer import palette
from viewer.data import Trajectory, group_label
from viewer.docks.base import ViewerDock

PAIRS = {"1-2": "1 – 2", "1-3": "1 – 3", "2-3": "2 – 3"}
COLOURS = {"test_loss": "test loss", "test_accuracy": "test accuracy", "log_epoch": "log epoch", "epoch": "epoch",
           "baseline": "baseline loss"}
CLICK_RADIUS_PX = 14
"""A click selects the nearest point within this many pixels."""
END_LABEL_ROOM_PX = (90, 40)
"""A "start"/"end" label hides while the current point is within this many pixels (x, y) of its point."""


class TrajectoryDock(ViewerDock):
    """2D PCA projection of a component group, from `Store.pca`."""

    NAME = "trajectory"
    TITLE = "Trajectory"

    def build(self) -> None:
        self.group = self.combo("group", {g: group_label(g) for g in self.state.groups},
                                lambda: self.state.set_group(self.group.currentData()))
        self.group.setCurrentIndex(self.state.groups.index(self.state.group))
        self.pair = self.combo("PCs", PAIRS, self._draw)
        self.colour = self.combo("colour", COLOURS, self._on_colour_changed)
        if not self.data.has_flatness:
            self.disable_choice(self.colour, "baseline", "needs stored flatness")
        for metric in ("test_loss", "test_accuracy"):
            if not np.isfinite(self.data.metrics.get(metric, np.array([np.nan]))).any():
                self.disable_choice(self.colour, metric, f"no {metric.replace('_', ' ')} recorded by the sources")
        if not self.colour.model().item(0).isEnabled():
            self.colour.setCurrentIndex(self.colour.findData("log_epoch"))

        self.trajectory_plot = self.plot(0, 0, x_label="PC1", y_label="PC2")
        self.trajectory_plot.setAspectLocked(False)
        self.path = self.trajectory_plot.plot(pen=palette.pen(palette.PATH, 1.2))
        self.points = pg.ScatterPlotItem(size=7, pen=None)
        self.trajectory_plot.addItem(self.points)
        # a dark ring on a white halo: visible on every colour map (a coloured ring vanished in plasma's reds)
        self.halo = pg.ScatterPlotItem(size=20, pen=palette.pen("w", 6), brush=None)
        self.current = pg.ScatterPlotItem(size=20, pen=palette.pen(palette.FOREGROUND, 2.4), brush=None)
        for z, ring in enumerate((self.halo, self.current)):
            ring.setZValue(29 + z)
            self.trajectory_plot.addItem(ring, ignoreBounds=True)
        # below-right of the current point, the start/end labels above theirs: never on top of each other
        self.current_label = pg.TextItem(color=palette.CURRENT, anchor=(-0.1, -0.1))
        self.current_label.setZValue(31)
        self.trajectory_plot.addItem(self.current_label, ignoreBounds=True)
        self.ends = [pg.TextItem(text, color=palette.FOREGROUND, anchor=(0.5, 1.3)) for text in ("start", "end")]
        for item in self.ends:
            self.trajectory_plot.addItem(item, ignoreBounds=True)
        self.colour_bar = pg.ColorBarItem(values=(0, 1), colorMap=palette.EPOCH_MAP, interactive=False,
                                          colorMapMenu=False, width=14, label="epoch")
        self.canvas.addItem(self.colour_bar, row=0, col=1)

        self.scree = self.plot(0, 2, x_label="component", y_label="variance explained (%)")
        self.scree.setMouseEnabled(x=False, y=False)
        self.scree_bars = pg.BarGraphItem(x=[], height=[], width=0.65)
        self.scree.addItem(self.scree_bars)
        self.cumulative = self.scree.plot(pen=palette.pen(palette.FOREGROUND, 1.2), symbol="o", symbolSize=5,
                                          symbolBrush=palette.FOREGROUND, name="cumulative variance (%)")
        self.hover(self.trajectory_plot)
        self.hover(self.scree)
        self.scree.setYRange(0, 100, padding=0.02)
        self.static(self.path, self.points, self.scree_bars, self.cumulative)
        self.canvas.ci.setContentsMargins(4, 4, 18, 4)  # room for the scree's last tick label
        self.canvas.ci.layout.setColumnStretchFactor(0, 3)
        self.canvas.ci.layout.setColumnStretchFactor(2, 1)
        self.canvas.scene().sigMouseClicked.connect(self._on_clicked)
        self.state.group_changed.connect(self._on_group_changed)
        self._xy = np.zeros((0, 2))

    # --------------------------------------------------------------------------- loading
    def load(self) -> None:
        self._on_group_changed(self.state.group)
        if self.colour.currentData() == "baseline":
            self._on_colour_changed()

    def _on_group_changed(self, group: str) -> None:
        self.group.blockSignals(True)
        self.group.setCurrentIndex(self.state.groups.index(group))
        self.group.blockSignals(False)
        if self.reason is not None:
            return
        if self.data.trajectory(group) is not None:
            self._draw()
        else:
            self.run(lambda: self.data.load_trajectory(group), lambda _t: self._draw())

    def _on_colour_changed(self) -> None:
        if self.colour.currentData() == "baseline" and self.data.flatness is None:
            self.run(self.data.load_flatness, lambda _f: self._draw())
        else:
            self._draw()

    @property
    def components(self) -> tuple[int, int]:
        """Zero-based indices of the two principal components shown."""
        first, second = self.pair.currentData().split("-")
        return int(first) - 1, int(second) - 1

    # ----------------------------------------------------------------------------- drawing
    def _draw(self) -> None:
        trajectory: Trajectory | None = self.data.trajectory(self.state.group)
        if trajectory is None or self.reason is not None:
            return
        a, b = self.components
        if b >= trajectory.projections.shape[1]:
            self.pair.setCurrentIndex(0)
            return
        self._xy = trajectory.projections[:, [a, b]]
        x, y = self._xy[:, 0], self._xy[:, 1]
        ratio = trajectory.explained_variance_ratio * 100
        name = group_label(trajectory.group)
        self.trajectory_plot.setLabel("bottom", f"PC{a + 1} ({ratio[a]:.1f}% of variance) · {name} weights")
        self.trajectory_plot.setLabel("left", f"PC{b + 1} ({ratio[b]:.1f}% of variance)")
        self.path.setData(x, y)
        self.points.setData(x, y, brush=self._brushes())
        for item, i in zip(self.ends, (0, -1), strict=True):
            item.setPos(x[i], y[i])
        self.trajectory_plot.autoRange(padding=0.06)

        k = np.arange(1, ratio.size + 1)
        shown = [palette.CURRENT if i in (a, b) else palette.HISTOGRAM for i in range(ratio.size)]
        self.scree_bars.setOpts(x=k, height=ratio, brushes=shown, pens=[None] * ratio.size)
        self.cumulative.setData(k, np.cumsum(ratio))
        self.scree.setXRange(0.4, ratio.size + 0.6, padding=0)
        self.set_key(self.scree, [("shown", palette.CURRENT), ("cumul.", palette.FOREGROUND)])
        self.refresh(self.state.index)

    def _brushes(self) -> list:
        values, label, cmap = self.colour_values()
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        self.colour_bar.setColorMap(pg.colormap.get(cmap))
        self.colour_bar.setLevels((low, high))
        self.colour_bar.getAxis("left").setLabel(label)
        shades = palette.shade_brushes(cmap)
        missing = pg.mkBrush(palette.PATH)
        return [shades[i] if np.isfinite(v) else missing
                for i, v in zip(palette.shade_indices(values, low, high), values, strict=True)]

    def colour_values(self) -> tuple[np.ndarray, str, str]:
        """What the points are coloured by: a value per epoch (NaN: grey), the colour bar's label, the map."""
        kind, metrics, x = self.colour.currentData(), self.data.metrics, self.data.x
        with np.errstate(divide="ignore", invalid="ignore"):
            if kind == "baseline" and self.data.flatness is not None:
                baseline = self.data.flatness.summary["baseline_loss"]
                return np.log10(baseline), "log₁₀ baseline loss (nats)", palette.LOSS_MAP
            if kind == "test_loss":
                return np.log10(metrics["test_loss"]), "log₁₀ test loss (nats)", palette.LOSS_MAP
            if kind == "test_accuracy":
                return np.asarray(metrics["test_accuracy"], dtype=float), "test accuracy", palette.EPOCH_MAP
            if kind == "log_epoch":
                return np.log10(x - x[0] + 1.0), f"log₁₀({self.data.unit} − first + 1)", palette.EPOCH_MAP
        return x.astype(float), self.data.unit, palette.EPOCH_MAP

    def refresh(self, index: int) -> None:
        if not len(self._xy):
            return
        x, y = self._xy[index]
        self.current.setData([x], [y])
        self.halo.setData([x], [y])
        self.current_label.setText(f"{self.data.unit} {self.data.epochs[index]}")
        self.current_label.setPos(x, y)
        # an end's label gives way to the current epoch's when the two points are close on screen
        width, height = self.trajectory_plot.vb.viewPixelSize()
        for item, end in zip(self.ends, (0, -1), strict=True):
            dx, dy = (self._xy[end] - (x, y)) / (width, height)
            item.setVisible(not (abs(dx) < END_LABEL_ROOM_PX[0] and abs(dy) < END_LABEL_ROOM_PX[1]))

    def describe(self, plot: pg.PlotItem, item: pg.PlotDataItem, i: int) -> str:
        if plot is not self.trajectory_plot:
            return super().describe(plot, item, i)
        a, b = self.components
        values, label, _cmap = self.colour_values()
        pcs = f"PC{a + 1} {self._xy[i, 0]:.4g}, PC{b + 1} {self._xy[i, 1]:.4g}"
        return f"{self.data.unit} {self.data.epochs[i]}\n{pcs}\n{label}: {values[i]:.4g}"

    # ---------------------------------------------------------------------------- clicking
    def _on_clicked(self, event) -> None:
        vb = self.trajectory_plot.vb
        if event.button() != Qt.MouseButton.LeftButton or not len(self._xy) \
                or not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        where = vb.mapSceneToView(event.scenePos())
        width, height = vb.viewPixelSize()
        pixels = np.hypot((self._xy[:, 0] - where.x()) / width, (self._xy[:, 1] - where.y()) / height)
        nearest = int(np.argmin(pixels))
        if pixels[nearest] <= CLICK_RADIUS_PX:
            self.state.set_index(nearest)

    # ------------------------------------------------------------------------ export, settings
    def table(self) -> dict[str, np.ndarray]:
        trajectory = self.data.trajectory(self.state.group)
        if trajectory is None:
            return {}
        return {"epoch": self.data.epochs,
                **{f"{trajectory.group}_pc{i + 1}": trajectory.projections[:, i]
                   for i in range(trajectory.projections.shape[1])}}

    def get_settings(self) -> dict:
        return {"pair": self.pair.currentData(), "colour": self.colour.currentData()}

    def set_settings(self, settings: dict) -> None:
        for box, key in ((self.pair, "pair"), (self.colour, "colour")):
            index = box.findData(settings.get(key))
            if index >= 0 and box.model().item(index).isEnabled():
                box.setCurrentIndex(index)
