"""Distribution: the histogram of the delta losses at the current epoch, mean and median marked.

By default the bins fit the current epoch's values (bins fixed for the whole run put all of an epoch into one
bar at the start and the end of training, where the spread is tiny); bins and the y range fixed over the whole
run (`ViewerData` precomputes every epoch's counts) show the distribution narrowing or widening against a
still frame.

The weights source shows a parameter's or a group's values instead (`Store.histograms`, bins fixed for the
run): the current epoch's histogram above an epoch x value heat map of every epoch's counts (TensorBoard's
histogram view; log colour scale, one column per stored epoch, the current one marked). It needs no
analysis, so a store without flatness offers it while the Δloss source says how to add flatness.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

from viewer import palette
from viewer.data import Flatness, WeightHistograms, group_label
from viewer.docks.base import ViewerDock

BINS = {"epoch": "fitted to this epoch", "run": "same for every epoch"}
SOURCES = {"delta": "Δloss", "weights": "weights"}
EPOCH_TICKS = 6
"""Epochs labelled under the heat map (its columns are stored epochs, evenly spaced whatever their gaps)."""


class DistributionDock(ViewerDock):
    """`delta_losses[epoch]` as a histogram over fixed bins, from `Store.analysis("flatness")`; or a group's
    weights, from `Store.histograms`."""

    NAME = "distribution"
    TITLE = "Distribution"

    def build(self) -> None:
        self.source = self.combo("source", SOURCES, self._on_source_changed)
        self.weights_group = self.combo("of", {g: group_label(g) if g in self.data.groups else g
                                               for g in self.data.weight_choices}, self._on_group_changed)
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
        self._build_weights()
        self.reason = self._missing()
        self._arrange()

    def _on_threshold_changed(self, _threshold: float) -> None:
        self.refresh(self.state.index)

    def _build_weights(self) -> None:
        """The weights source's plots: this epoch's histogram above the epoch x value heat map."""
        self.weights_plot = self.plot(row=1, x_label="weight value", y_label="values")
        self.hover(self.weights_plot)
        self.weights_histogram = self.weights_plot.plot(stepMode="center", fillLevel=0, fillOutline=True,
                                                        pen=palette.pen(palette.MEAN, 1.2),
                                                        brush=palette.translucent(palette.HISTOGRAM, 170))
        self.weights_caption = pg.LabelItem(justify="right", size="10pt", color=palette.FOREGROUND)
        self.weights_caption.setParentItem(self.weights_plot.vb)
        self.weights_caption.anchor(itemPos=(1, 0), parentPos=(1, 0), offset=(-8, 4))
        self.heat_plot = self.plot(row=2, x_label=self.data.unit, y_label="weight value")
        self.heat_plot.setTitle("colour: log₁₀(1 + count)", size="9pt")
        self.heat_map = pg.ImageItem(axisOrder="col-major")
        self.heat_map.setColorMap(pg.colormap.get(palette.EPOCH_MAP))
        self.heat_plot.addItem(self.heat_map)
        self.heat_marker = pg.InfiniteLine(angle=90, pen=palette.pen(palette.CURRENT, 1.5))
        self.heat_marker.setZValue(20)
        self.heat_plot.addItem(self.heat_marker, ignoreBounds=True)
        n = self.data.n_epochs
        ticks = np.unique(np.linspace(0, n - 1, min(n, EPOCH_TICKS)).round().astype(int))
        self.heat_plot.getAxis("bottom").setTicks([[(float(i), str(self.data.epochs[i])) for i in ticks]])

    @property
    def weights(self) -> bool:
        """Whether the weights source is shown (else the Δloss distribution)."""
        return self.source.currentData() == "weights"

    def _missing(self) -> str | None:
        """Why the chosen source cannot be shown, or None: Δloss needs flatness, weights need nothing."""
        reason = None if self.weights else self.data.missing("flatness")
        return f"{reason} Or choose the source “weights”." if reason else None

    def _arrange(self) -> None:
        """The chosen source's plots in the canvas, the other's taken out; only its controls enabled."""
        layout = self.canvas.ci
        wanted = [self.weights_plot, self.heat_plot] if self.weights else [self.histogram_plot]
        for item in list(layout.items):
            if item not in wanted:
                layout.removeItem(item)
        for row, item in enumerate(wanted):
            if item not in layout.items:
                layout.addItem(item, row=row, col=0)
        self.weights_group.setEnabled(self.weights)
        self.bins.setEnabled(not self.weights)

    def _on_source_changed(self) -> None:
        reason = self._missing()
        if reason:
            self.set_unavailable(reason)
            return
        self.set_available()
        self._arrange()
        self.load()

    def _on_group_changed(self) -> None:
        if self.weights:
            self._on_source_changed()

    def set_unavailable(self, reason: str) -> None:
        """As every dock, but the source stays a choice: the other source may be available."""
        super().set_unavailable(reason)
        self.source.setEnabled(True)

    def _marker(self, color: str, style: Qt.PenStyle) -> pg.InfiniteLine:
        line = pg.InfiniteLine(angle=90, pen=palette.pen(color, 2, style))
        line.setZValue(10)
        self.histogram_plot.addItem(line, ignoreBounds=True)
        return line

    def load(self) -> None:
        if not self.weights:
            self.run(self.data.load_flatness, self._draw)
            return
        group = self.weights_group.currentData()
        self.run_unless_cached(self.data.weight_histograms(group), lambda: self.data.load_weight_histograms(group),
                               self._draw_weights)

    def _draw_weights(self, found: WeightHistograms) -> None:
        """The heat map of every epoch, and the axes fixed to the run's bins and largest count."""
        if found.group != self.weights_group.currentData():
            return  # a group chosen before this one finished loading
        edges, counts = found.edges, found.counts
        self.heat_map.setImage(np.log10(1.0 + counts), autoLevels=True)
        self.heat_map.setRect(-0.5, edges[0], counts.shape[0], edges[-1] - edges[0])
        self.heat_plot.setXRange(-0.5, counts.shape[0] - 0.5, padding=0)
        self.heat_plot.setYRange(edges[0], edges[-1], padding=0)
        self.weights_plot.setXRange(edges[0], edges[-1], padding=0.02)
        self.weights_plot.setYRange(0, max(1, int(counts.max())) * 1.08, padding=0)

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
        if self.weights:
            self._refresh_weights(index)
            return
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
            self.caption.setText(f"{self.data.unit} {epoch} · flatness ratio (&lt; {threshold:g}× baseline) "
                                 f"<b>{ratio:.2f}</b>"
                                 f" · ε = {flatness.settings.get('epsilon', float('nan')):g}"
                                 f" · {flatness.deltas.shape[1]} directions")
        else:
            self.caption.setText(f"{self.data.unit} {epoch} · no flatness computed")

    def _refresh_weights(self, index: int) -> None:
        found = self.data.weight_histograms(self.weights_group.currentData())
        if found is None:
            return
        self.weights_histogram.setData(found.edges, found.counts[index])
        self.heat_marker.setValue(index)
        self.weights_caption.setText(f"{self.data.unit} {self.data.epochs[index]} · "
                                     f"{self.weights_group.currentText()} · {int(found.counts[index].sum())} values")

    def table(self) -> dict[str, np.ndarray]:
        if self.weights:
            found = self.data.weight_histograms(self.weights_group.currentData())
            if found is None:
                return {}
            n, bins = found.counts.shape
            return {"epoch": np.repeat(self.data.epochs, bins), "bin_low": np.tile(found.edges[:-1], n),
                    "bin_high": np.tile(found.edges[1:], n), "count": found.counts.ravel()}
        flatness = self.data.flatness
        if flatness is None:
            return {}
        index = self.state.index
        edges, counts = flatness.histogram(index, same_bins=self.same_bins)
        return {"epoch": np.full(counts.size, self.data.epochs[index]),
                "bin_low": edges[:-1], "bin_high": edges[1:], "count": counts}

    def get_settings(self) -> dict:
        return {"bins": self.bins.currentData(), "source": self.source.currentData(),
                "weights_group": self.weights_group.currentData()}

    def set_settings(self, settings: dict) -> None:
        for box, key in ((self.bins, "bins"), (self.weights_group, "weights_group"), (self.source, "source")):
            index = box.findData(settings.get(key))
            if index >= 0:
                box.setCurrentIndex(index)
