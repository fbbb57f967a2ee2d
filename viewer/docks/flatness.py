"""Flatness and curvature over training: one-sided Δloss or antithetic curvature (a statistic over directions,
with its p10-p90 band), the Hessian trace (Hutchinson, ±2 standard errors, beside the trace the antithetic
curvature implies) or the top Hessian eigenvalue, of the whole Hessian or of one component group's block (the
group chooser, for the Hessian measures of stores that hold `hessian_groups`), and the baseline loss.

The baseline loss sits on a secondary (right, log) axis in its own view box, linked in x (pyqtgraph's
MultiplePlotAxes pattern), so a flat landscape can be read against where the loss itself is. Measures the
store lacks stay in the selector, greyed out, their tooltip saying how to add them. Antithetic curvature, when
stored, is the default measure (it cancels the gradient's first-order term that dominates one-sided Δloss away
from a minimum). The flatness ratio's threshold (a multiple of the baseline loss) is the window's, set here.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDoubleSpinBox

from viewer import palette
from viewer.data import METRIC_LABELS, group_label
from viewer.docks.base import ViewerDock

MEASURES = {"one_sided": "one-sided Δloss", "antithetic": "antithetic curvature",
            "hessian_trace": "Hessian trace", "top_eigenvalue": "top Hessian eigenvalue"}
NEEDS = {"one_sided": "flatness", "antithetic": "antithetic", "hessian_trace": "hessian",
         "top_eigenvalue": "hessian"}
CURVATURE_LABELS = {key: text.replace("Δloss", "curvature") for key, text in METRIC_LABELS.items()}
MEASURE_AXES = {"hessian_trace": "Tr(H) (nats per unit² of weight)", "top_eigenvalue": "λ_max of H"}
# The p10-p90 band of the directions belongs beside a central statistic only (not under a std or a max).
BANDED = ("mean_delta_loss", "median_delta_loss")


class FlatnessDock(ViewerDock):
    """Per-epoch statistics of `Store.flatness_summary` and `Store.curvature_summary`, `Store.hessian_trace`
    and `Store.top_eigenvalue`."""

    NAME = "flatness"
    TITLE = "Flatness"
    NEEDS = "flatness"

    def build(self) -> None:
        self.measure = self.combo("measure", MEASURES, self._draw)
        for key, analysis in NEEDS.items():
            reason = self.data.missing(analysis)
            if reason:
                self.disable_choice(self.measure, key, reason)
        if self.data.missing("antithetic") is None:
            self.measure.setCurrentIndex(self.measure.findData("antithetic"))
        self.statistic = self.combo("statistic", METRIC_LABELS, self._draw)
        # the Hessian measures have no statistic: the group chooser takes its place (and its label's), so the
        # toolbar keeps its width
        self.statistic_label = self.toolbar.itemAt(self.toolbar.indexOf(self.statistic) - 1).widget()
        self.group = self.combo(None, {group: "whole Hessian" if group == "all" else f"{group_label(group)} block"
                                       for group in self.data.groups}, self._draw)
        self.group_reason = self.data.missing("hessian_groups")  # None when the store holds the groups' blocks
        self.group.setToolTip(self.group_reason or "The Hessian of all weights, or one component group's block")
        self.group.setEnabled(not self.group_reason)
        self.group.hide()
        self.log_y = self.checkbox("log y", False, self._on_log_changed)
        # shown in the log-y box's place while the flatness ratio (never log) is drawn: the toolbar keeps its width
        self.threshold = QDoubleSpinBox(decimals=3, minimum=0.001, maximum=100.0, singleStep=0.05,
                                        value=self.state.threshold, prefix="< ", suffix="× base",
                                        toolTip="A direction is flat when its Δloss (or curvature) stays below this "
                                                "multiple of the baseline loss")
        self.threshold.setKeyboardTracking(False)
        self.threshold.valueChanged.connect(self.state.set_threshold)
        self.state.threshold_changed.connect(self._on_threshold_changed)
        self.add_control(self.threshold)
        self.threshold.hide()
        self.key_entries: list[tuple[str, str]] = []  # the key's entries for what is drawn
        self.flatness_plot = self.plot(y_label="Δloss (nats)")
        edge = pg.mkPen(palette.BAND, width=1)  # FillBetweenItem fills between drawn curves only
        self.band_low = pg.PlotDataItem(pen=edge, connect="finite")
        self.band_high = pg.PlotDataItem(pen=edge, connect="finite")
        self.band = pg.FillBetweenItem(self.band_low, self.band_high, brush=palette.translucent(palette.BAND, 90))
        for item in (self.band_low, self.band_high, self.band):
            self.flatness_plot.addItem(item)
        self.curve = self.flatness_plot.plot(pen=palette.pen(palette.METRIC, 2), connect="finite")
        self.compare = self.flatness_plot.plot(pen=palette.pen(palette.MEDIAN, 1.6, Qt.PenStyle.DashLine),
                                               connect="finite")
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
        self.baseline.setLogMode(self.state.log_epoch, True)
        self.baseline_view.addItem(self.baseline)
        self.static(self.band_low, self.band_high, self.band, self.curve, self.compare, self.baseline)
        self.flatness_plot.vb.sigResized.connect(self._sync_views)
        self.epoch_axis(self.flatness_plot)
        self.line = self.epoch_line(self.flatness_plot)

    def _sync_views(self) -> None:
        self.baseline_view.setGeometry(self.flatness_plot.vb.sceneBoundingRect())
        self.baseline_view.linkedViewChanged(self.flatness_plot.vb, self.baseline_view.XAxis)

    def load(self) -> None:
        self.run(lambda: (self.data.load_flatness(), self.data.load_curvature()), lambda _loaded: self._draw())

    @property
    def key(self) -> str:
        """The summary statistic chosen (a key of `Store.flatness_summary`)."""
        return self.statistic.currentData()

    @property
    def kind(self) -> str:
        """The measure shown: `one_sided`, `antithetic`, `hessian_trace` or `top_eigenvalue`."""
        return self.measure.currentData()

    @property
    def group_name(self) -> str:
        """The component group whose Hessian block the Hessian measures show (`all`: the whole Hessian)."""
        return "all" if self.group_reason else self.group.currentData()

    def series(self) -> dict[str, np.ndarray] | None:
        """What the current measure draws, per epoch: `value`, optionally `low`/`high` (the band) and `compare`
        (a second estimate of the same quantity); None until loaded."""
        flatness, curvature, kind = self.data.flatness, self.data.curvature, self.kind
        if flatness is None or curvature is None:
            return None
        if kind in ("one_sided", "antithetic"):
            summary, suffix = ((flatness.summary, "delta_loss") if kind == "one_sided"
                               else (curvature.summary, "curvature"))
            key = self.key.replace("delta_loss", suffix)
            out = {"value": (self.data.flatness_ratio(kind, self.state.threshold) if key == "flatness_ratio"
                             else summary[key])}
            if self.key in BANDED:
                out.update(low=summary[f"p10_{suffix}"], high=summary[f"p90_{suffix}"])
            return out
        group = self.group_name
        hessian = curvature.hessian if group == "all" else curvature.hessian_groups[group]
        if kind == "hessian_trace":
            trace, error = hessian["hessian_trace"], 2 * hessian["hessian_trace_stderr"]
            out = {"value": trace, "low": trace - error, "high": trace + error}
            if curvature.summary is not None and group == "all":  # the antithetic pairs see the whole vector
                out["compare"] = curvature.summary["trace_estimate"]
            return out
        top, residual = hessian["top_eigenvalue"], hessian["top_eigenvalue_residual"]
        return {"value": top, "low": top - residual, "high": top + residual}

    def _draw(self) -> None:
        series = self.series()
        if series is None:
            return
        x, kind, key = self.data.x, self.kind, self.key
        directional = kind in ("one_sided", "antithetic")
        labels = METRIC_LABELS if kind == "one_sided" else CURVATURE_LABELS
        if directional:
            for index in range(self.statistic.count()):
                self.statistic.setItemText(index, labels[self.statistic.itemData(index)])
        self.statistic.setEnabled(directional)
        for widget in (self.statistic_label, self.statistic):
            widget.setVisible(directional)
        self.group.setVisible(not directional)
        block = "" if directional or self.group_name == "all" else f" of the {group_label(self.group_name)} block"
        name = labels[key] if directional else MEASURES[kind] + block
        band = {"one_sided": "p10–p90 band", "antithetic": "p10–p90 band", "hessian_trace": "±2 s.e.",
                "top_eigenvalue": "± Lanczos residual"}[kind]
        compare = "2D/ε² × mean antithetic curvature"
        self.curve.setData(x, series["value"], name=name)
        banded = "low" in series
        self.band_low.setData(x, series["low"] if banded else [], name=f"{band}, low")
        self.band_high.setData(x, series["high"] if banded else [], name=f"{band}, high")
        for item in (self.band, self.band_low, self.band_high):
            item.setVisible(banded)
        self.compare.setData(x, series.get("compare", []), name=compare)
        self.compare.setVisible("compare" in series)
        self.baseline.setData(x, self.data.flatness.summary["baseline_loss"])
        ratio = directional and key == "flatness_ratio"
        self.key_entries = ([(name, palette.METRIC)] + ([(band, palette.BAND)] if banded else [])
                            + ([(compare, palette.MEDIAN)] if "compare" in series else [])
                            + [("baseline loss (right axis)", palette.BASELINE)])
        if ratio:
            threshold = self.state.threshold
            what = "Δloss" if kind == "one_sided" else "curvature"
            label = f"share of flat directions ({what} < {threshold:g}·baseline)"
        else:
            label = f"{name} (nats)" if directional else MEASURE_AXES[kind] + block
        self.flatness_plot.setLabel("left", label)
        self.log_y.setEnabled(not ratio)
        self.log_y.setVisible(not ratio)
        self.threshold.setVisible(ratio)
        self._on_log_changed()
        self.fit_epochs(self.flatness_plot)
        self.refresh(self.state.index)

    def refresh(self, index: int) -> None:
        self.line.setValue(self.epoch_x(self.data.x[index]))
        series = self.series()
        if series is not None:
            value = series["value"][index]
            self.marker.setData(*(([self.data.x[index]], [value]) if np.isfinite(value) else ([], [])))

    def _on_threshold_changed(self, threshold: float) -> None:
        self.threshold.blockSignals(True)
        self.threshold.setValue(threshold)
        self.threshold.blockSignals(False)
        self._draw()

    def epoch_axis_changed(self, log: bool) -> None:
        self.baseline.setLogMode(log, True)  # in its own view box: the plot's log mode does not reach it
        self.flatness_plot.getAxis("right").setLogMode(False, True)
        self.band.updatePath()

    def _on_log_changed(self) -> None:
        log = self.log_y.isChecked() and self.log_y.isEnabled()
        self.flatness_plot.setLogMode(y=log)
        self.flatness_plot.getAxis("right").setLogMode(False, True)  # setLogMode resets every axis of the plot
        self.band.updatePath()  # the fill does not follow its curves into log mode by itself
        series = self.series()
        hidden = int(np.sum(series["value"] <= 0)) if log and series is not None else 0
        # a log axis cannot show values <= 0: say how many epochs are left out rather than drop them silently
        note = [(f"log y hides {hidden} epoch{'s' if hidden > 1 else ''} ≤ 0", palette.THRESHOLD)] if hidden else []
        self.set_key(self.flatness_plot, self.key_entries + note)
        self.flatness_plot.enableAutoRange(y=True)
        self.refresh(self.state.index)

    def table(self) -> dict[str, np.ndarray]:
        flatness, series = self.data.flatness, self.series()
        if self.kind == "one_sided" or series is None:
            return {"epoch": self.data.epochs, **(flatness.summary if flatness else {})}
        return {"epoch": self.data.epochs, self.kind: series["value"],
                **{name: values for name, values in series.items() if name != "value"},
                "baseline_loss": flatness.summary["baseline_loss"]}

    def get_settings(self) -> dict:
        return {"measure": self.kind, "metric": self.key, "log_y": self.log_y.isChecked(),
                "threshold": self.state.threshold, "group": self.group_name}

    def set_settings(self, settings: dict) -> None:
        index = self.measure.findData(settings.get("measure"))
        if index >= 0 and self.measure.model().item(index).isEnabled():
            self.measure.setCurrentIndex(index)
        index = self.statistic.findData(settings.get("metric"))
        if index >= 0:
            self.statistic.setCurrentIndex(index)
        index = self.group.findData(settings.get("group"))
        if index >= 0:
            self.group.setCurrentIndex(index)
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
        threshold = settings.get("threshold")
        if isinstance(threshold, int | float) and threshold > 0:
            self.state.set_threshold(float(threshold))
