"""Flatness over training: a chosen statistic of the delta losses, the p10-p90 band, the baseline loss.

The baseline loss sits on a secondary (right, log) axis in its own view box, linked in x (pyqtgraph's
MultiplePlotAxes pattern), so a flat landscape can be read against where the loss itself is.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

from viewer import palette
from viewer.data import METRIC_LABELS, Flatness
from viewer.docks.base import ViewerDock


class FlatnessDock(ViewerDock):
    """Per-epoch statistics of `Store.flatness_summary`."""

    NAME = "flatness"
    TITLE = "Flatness"
    NEEDS = "flatness"

    def build(self) -> None:
        self.statistic = self.combo("statistic", METRIC_LABELS, self._draw)
        self.log_y = self.checkbox("log y", False, self._on_log_changed)
        self.flatness_plot = self.plot(y_label="Δloss (nats)")
        edge = pg.mkPen(palette.BAND, width=1)  # FillBetweenItem fills between drawn curves only
        self.band_low = pg.PlotDataItem(pen=edge, connect="finite")
        self.band_high = pg.PlotDataItem(pen=edge, connect="finite")
        self.band = pg.FillBetweenItem(self.band_low, self.band_high, brush=palette.translucent(palette.BAND, 90))
        for item in (self.band_low, self.band_high, self.band):
            self.flatness_plot.addItem(item)
        self.curve = self.flatness_plot.plot(pen=palette.pen(palette.METRIC, 2), connect="finite")
        self.marker = pg.PlotDataItem(pen=None, symbol="o", symbolSize=9, symbolPen=palette.pen("w", 1.2),
                                      symbolBrush=palette.CURRENT)
        self.marker.setZValue(30)
        self.flatness_plot.addItem(self.marker, ignoreBounds=True)  # the y range must not follow it

        self.baseline_view = pg.ViewBox()
        self.flatness_plot.showAxis("right")
        self.flatness_plot.scene().addItem(self.baseline_view)
        right = self.flatness_plot.getAxis("right")
        right.linkToView(self.baseline_view)
        right.setLabel("baseline loss (nats, log)", color=palette.BASELINE)
        right.setLogMode(False, True)
        self.baseline_view.setXLink(self.flatness_plot)
        self.baseline = pg.PlotDataItem(pen=palette.pen(palette.BASELINE, 1.6, Qt.PenStyle.DashLine), connect="finite")
        self.baseline.setLogMode(False, True)
        self.baseline_view.addItem(self.baseline)
        self.static(self.band_low, self.band_high, self.band, self.curve, self.baseline)
        self.flatness_plot.vb.sigResized.connect(self._sync_views)
        self.select_by_x(self.flatness_plot)
        self.line = self.epoch_line(self.flatness_plot)

    def _sync_views(self) -> None:
        self.baseline_view.setGeometry(self.flatness_plot.vb.sceneBoundingRect())
        self.baseline_view.linkedViewChanged(self.flatness_plot.vb, self.baseline_view.XAxis)

    def load(self) -> None:
        self.run(self.data.load_flatness, lambda _flatness: self._draw())

    @property
    def key(self) -> str:
        """The summary statistic shown (a key of `Store.flatness_summary`)."""
        return self.statistic.currentData()

    def _draw(self) -> None:
        flatness: Flatness | None = self.data.flatness
        if flatness is None:
            return
        x, summary, key = self.data.x, flatness.summary, self.key
        ratio = key == "flatness_ratio"
        self.curve.setData(x, summary[key])
        self.band_low.setData(x, summary["p10_delta_loss"])
        self.band_high.setData(x, summary["p90_delta_loss"])
        for item in (self.band, self.band_low, self.band_high):
            item.setVisible(not ratio)
        self.baseline.setData(x, summary["baseline_loss"])
        self.set_key(self.flatness_plot, [(METRIC_LABELS[key], palette.METRIC)]
                     + ([] if ratio else [("p10–p90 band", palette.BAND)])
                     + [("baseline loss (right axis)", palette.BASELINE)])
        threshold = f" (Δloss < {flatness.threshold:g}·baseline)" if ratio else " (nats)"
        self.flatness_plot.setLabel("left", ("share of flat directions" if ratio else METRIC_LABELS[key]) + threshold)
        self.log_y.setEnabled(not ratio)
        self._on_log_changed()
        self.flatness_plot.setXRange(x[0], x[-1], padding=0.02)
        self.refresh(self.state.index)

    def refresh(self, index: int) -> None:
        self.line.setValue(self.data.x[index])
        flatness = self.data.flatness
        if flatness is not None:
            value = flatness.summary[self.key][index]
            self.marker.setData(*(([self.data.x[index]], [value]) if np.isfinite(value) else ([], [])))

    def _on_log_changed(self) -> None:
        self.flatness_plot.setLogMode(y=self.log_y.isChecked() and self.log_y.isEnabled())
        self.flatness_plot.enableAutoRange(y=True)
        self.refresh(self.state.index)

    def table(self) -> dict[str, np.ndarray]:
        flatness = self.data.flatness
        return {"epoch": self.data.epochs, **(flatness.summary if flatness else {})}

    def get_settings(self) -> dict:
        return {"metric": self.key, "log_y": self.log_y.isChecked()}

    def set_settings(self, settings: dict) -> None:
        index = self.statistic.findData(settings.get("metric"))
        if index >= 0:
            self.statistic.setCurrentIndex(index)
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
