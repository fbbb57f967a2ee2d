"""Loss landscape: the stored loss plane of a group (`geostore plane`) as filled contours of log₁₀ loss, with the
trajectory's path on the plane and the current epoch marked.

The grid is interpolated linearly onto a finer one (`UPSAMPLE` times per axis, so band edges look smooth) and
its log loss cut into `BANDS` equal bands between the plane's lowest and highest values: a banded image (the
filled contours) with a line at each band edge. The path is the trajectory projected on the plane's own
basis, as stored with it, so a stale plane (epochs added after its basis was fitted) still draws a consistent
path, without the epochs it predates (no marker at those); its title says it is stale.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF

from viewer import palette
from viewer.data import Plane, group_label, upsample
from viewer.docks.base import ViewerDock

BANDS = 14
UPSAMPLE = 8


class LandscapeDock(ViewerDock):
    """`Store.loss_plane(group)` of the chosen stored group, and the trajectory on it."""

    NAME = "landscape"
    TITLE = "Loss landscape"
    NEEDS = "plane"

    def build(self) -> None:
        groups = self.data.planes if self.reason is None else []
        self.group = self.combo("group", {g: group_label(g) for g in groups} or {"all": "All"}, self.load)
        self.plane_plot = self.plot(x_label="PC1", y_label="PC2")
        self.image = pg.ImageItem()
        self.plane_plot.addItem(self.image)
        self.edges = [pg.IsocurveItem(pen=palette.pen(palette.FOREGROUND, 0.7)) for _ in range(BANDS - 1)]
        for edge in self.edges:
            edge.setParentItem(self.image)  # in the image's coordinates: placed with it
        self.path = self.plane_plot.plot(pen=palette.pen("w", 1.6), symbol="o", symbolSize=4, symbolPen=None,
                                         symbolBrush="w")
        self.current = pg.ScatterPlotItem(size=16, pen=palette.pen("w", 2.4), brush=palette.CURRENT)
        self.current.setZValue(30)
        self.plane_plot.addItem(self.current)
        self.colour_bar = pg.ColorBarItem(values=(0, 1), colorMap=palette.LOSS_MAP, interactive=False,
                                          colorMapMenu=False, width=14, label="log₁₀ loss")
        self.colour_bar.setImageItem(self.image)
        self.canvas.addItem(self.colour_bar, row=0, col=1)
        self.label = pg.TextItem(color=palette.CURRENT, fill=palette.translucent(palette.BACKGROUND, 210),
                                 anchor=(0, 1.2))
        self.label.setZValue(31)
        self.plane_plot.addItem(self.label, ignoreBounds=True)
        self.static(self.image, self.path, *self.edges)
        self.hover(self.plane_plot)

    @property
    def shown(self) -> Plane | None:
        """The plane on screen, once loaded."""
        return self.data.plane(self.group.currentData())

    def load(self) -> None:
        self.run(lambda: self.data.load_plane(self.group.currentData()), self._draw)

    def _draw(self, plane: Plane) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            fine = upsample(np.log10(plane.loss), UPSAMPLE)
        finite = fine[np.isfinite(fine)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        step = (high - low) / BANDS if high > low else 1.0
        bands = np.clip(np.floor((fine - low) / step), 0, BANDS - 1)
        self.image.setImage(low + (bands + 0.5) * step, autoLevels=False)
        self.colour_bar.setLevels((low, low + BANDS * step))
        width, height = plane.pc1[-1] - plane.pc1[0], plane.pc2[-1] - plane.pc2[0]
        # pixel centres on the grid points: the image reaches half a fine step beyond the outer ones
        n1, n2 = fine.shape
        self.image.setRect(QRectF(plane.pc1[0] - width / (n1 - 1) / 2, plane.pc2[0] - height / (n2 - 1) / 2,
                                  width * n1 / (n1 - 1), height * n2 / (n2 - 1)))
        for k, edge in enumerate(self.edges, start=1):
            edge.setData(np.nan_to_num(fine, nan=low - step), low + k * step)
        self.path.setData(plane.projections[:, 0], plane.projections[:, 1])
        for axis, name, ratio in (("bottom", "PC1", plane.explained[0]), ("left", "PC2", plane.explained[1])):
            self.plane_plot.setLabel(axis, f"{name} of {group_label(plane.group).lower()} ({ratio:.0%} of variance)")
        self.plane_plot.setRange(xRange=(plane.pc1[0], plane.pc1[-1]), yRange=(plane.pc2[0], plane.pc2[-1]),
                                 padding=0)
        self.plane_plot.setTitle(f"stale: fitted on {plane.epochs.size} of {self.data.n_epochs} {self.data.unit}s; "
                                 f"`geostore plane --recompute` refits it" if plane.stale else None, size="9pt")

    def refresh(self, index: int) -> None:
        plane = self.shown
        if plane is None:
            return
        epoch = int(self.data.epochs[index])
        where = plane.position(epoch)  # None: an epoch added after the plane was fitted
        self.current.setData(*([[where[0]], [where[1]]] if where is not None else [[], []]))
        self.label.setVisible(where is not None)
        if where is not None:
            self.label.setText(f"{self.data.unit} {epoch}")
            self.label.setPos(*where)

    def describe(self, plot: pg.PlotItem, item: pg.PlotDataItem, i: int) -> str:
        plane = self.shown
        if plane is None or item is not self.path:
            return super().describe(plot, item, i)
        a, b = plane.projections[i]
        return (f"{self.data.unit} {plane.epochs[i]}\nPC1 {a:.4g}, PC2 {b:.4g}\n"
                f"loss at the nearest grid point: {plane.loss_near(a, b):.4g}")

    def table(self) -> dict[str, np.ndarray]:
        plane = self.shown
        if plane is None:
            return {}
        pc1, pc2 = np.meshgrid(plane.pc1, plane.pc2, indexing="ij")
        return {"pc1": pc1.ravel(), "pc2": pc2.ravel(), "loss": plane.loss.ravel()}

    def get_settings(self) -> dict:
        return {"group": self.group.currentData()}

    def set_settings(self, settings: dict) -> None:
        index = self.group.findData(settings.get("group"))
        if index >= 0:
            self.group.setCurrentIndex(index)
