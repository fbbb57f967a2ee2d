"""Distribution: the histogram of the delta losses at the current epoch, mean and median marked.

By default the bins fit the current epoch's values (bins fixed for the whole run put all of an epoch into one
bar at the start and the end of training, where the spread is tiny); bins and the y range fixed over the whole
run (`ViewerData` precomputes every epoch's counts) show the distribution narrowing or widening against a
still frame.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

from viewer import palette
from viewer.data import Flatness
from viewer.docks.base import ViewerDock

BINS = {"epoch": "fitted to this epoch", "run": "same for every epoch"}


class DistributionDock(ViewerDock):
    """`delta_losses[epoch]` as a histogram over fixed bins, from `Store.analysis("flatness")`."""

    NAME = "distribution"
    TITLE = "Δloss distribution"
    NEEDS = "flatness"

    def build(self) -> None:
        self.bins = self.combo("bins", BINS, self._on_bins_changed)
        self.histogram_plot = self.plot(x_label="Δloss = L(θ + εd) − L(θ)  (nats)", y_label="directions")
        self.hover(self.histogram_plot)
        self.histogram = self.histogram_plot.plot(stepMode="center", fillLevel=0, fillOutline=True,
                                                  pen=palette.pen(palette.MEAN, 1.2),
                                                  brush=palette.translucent(palette.HISTOGRAM, 170))
        self.mean = self._marker(palette.MEAN, Qt.PenStyle.SolidLine)
        self.median = self._marker(palette.MEDIAN, Qt.PenStyle.DashLine)
        self.threshold = self._marker(palette.THRESHOLD, Qt.PenStyle.DotLine)
        self.set_key(self.histogram_plot, [("mean", palette.MEAN), ("median", palette.MEDIAN),
                                           ("flat threshold (ratio × baseline)", palette.THRESHOLD)])
        self.caption = pg.LabelItem(justify="right", size="10pt", color=palette.FOREGROUND)
        self.caption.setParentItem(self.histogram_plot.vb)
        self.caption.anchor(itemPos=(1, 0), parentPos=(1, 0), offset=(-8, 4))
        # a method, not a lambda: connected once however often the page is built (`renew`)
        self.state.threshold_changed.connect(self._on_threshold_changed)

    def _on_threshold_changed(self, _threshold: float) -> None:
        self.refresh(self.state.index)

    def _marker(self, color: str, style: Qt.PenStyle) -> pg.InfiniteLine:
        line = pg.InfiniteLine(angle=90, pen=palette.pen(color, 2, style))
        line.setZValue(10)
        self.histogram_plot.addItem(line, ignoreBounds=True)
        return line

    def load(self) -> None:
        self.run(self.data.load_flatness, self._draw)

    @property
    def same_bins(self) -> bool:
        """Whether every epoch is binned alike (epochs then compare by eye)."""
        return self.bins.currentData() == "run"

    def _on_bins_changed(self) -> None:
        if self.data.flatness is not None:
            self._draw(self.data.flatness)
            self.refresh(self.state.index)

    def _draw(self, flatness: Flatness) -> None:
        """Fix the axes to the whole run's bins and counts (with run-wide bins)."""
        self.histogram_plot.enableAutoRange(enable=not self.same_bins)
        if self.same_bins:
            edges = flatness.edges
            self.histogram_plot.setXRange(edges[0], edges[-1], padding=0.02)
            self.histogram_plot.setYRange(0, max(1, int(flatness.counts.max())) * 1.08, padding=0)

    def refresh(self, index: int) -> None:
        flatness = self.data.flatness
        if flatness is None:
            return
        epoch = int(self.data.epochs[index])
        self.histogram.setData(*flatness.histogram(index, same_bins=self.same_bins))
        summary = flatness.summary
        present = bool(flatness.complete[index])
        for line, key in ((self.mean, "mean_delta_loss"), (self.median, "median_delta_loss")):
            line.setVisible(present)
            if present:
                line.setValue(summary[key][index])
        self.threshold.setVisible(present)
        if present:
            threshold = self.state.threshold
            self.threshold.setValue(threshold * summary["baseline_loss"][index])
            ratio = self.data.flatness_ratio("one_sided", threshold)[index]
            self.caption.setText(f"{self.data.unit} {epoch} · flatness ratio (< {threshold:g}× baseline) "
                                 f"<b>{ratio:.2f}</b>"
                                 f" · ε = {flatness.settings.get('epsilon', float('nan')):g}"
                                 f" · {flatness.deltas.shape[1]} directions")
        else:
            self.caption.setText(f"{self.data.unit} {epoch} · no flatness computed")

    def table(self) -> dict[str, np.ndarray]:
        flatness = self.data.flatness
        if flatness is None:
            return {}
        index = self.state.index
        edges, counts = flatness.histogram(index, same_bins=self.same_bins)
        return {"epoch": np.full(counts.size, self.data.epochs[index]),
                "bin_low": edges[:-1], "bin_high": edges[1:], "count": counts}

    def get_settings(self) -> dict:
        return {"bins": self.bins.currentData()}

    def set_settings(self, settings: dict) -> None:
        index = self.bins.findData(settings.get("bins"))
        if index >= 0:
            self.bins.setCurrentIndex(index)
