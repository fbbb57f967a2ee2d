"""Flatness of every shown run that holds it: a per-epoch statistic of its one-sided Δloss (`Store.flatness_summary`;
mean by default), one curve per run. Runs without flatness are named in the key."""

from __future__ import annotations

from viewer import palette
from viewer.data import METRIC_LABELS
from viewer.docks.compare_base import CompareDock


class CompareFlatnessDock(CompareDock):
    """A flatness statistic over training, one curve per run holding flatness."""

    NAME = "flatness"
    TITLE = "Flatness"
    NEEDS = "flatness"

    def build(self) -> None:
        self.statistic = self.combo("statistic", METRIC_LABELS, self._draw)
        self.log_y = self.checkbox("log y", False, self._on_log_changed)
        self.flatness_plot = self.plot(y_label="mean Δloss (nats)")
        lacking = [run for run in self.state.runs if run not in self.data.flatness_runs()]
        self.run_key(self.flatness_plot, [(f"no flatness: {', '.join(lacking)}", palette.THRESHOLD)] if lacking
                     else None)
        self.epoch_axis(self.flatness_plot)
        self.line = self.epoch_line(self.flatness_plot)

    @property
    def key(self) -> str:
        """The statistic shown (a key of `Store.flatness_summary`)."""
        return self.statistic.currentData()

    def load(self) -> None:
        self.run(self.data.load_flatness, lambda _summaries: self._draw())

    def _draw(self) -> None:
        summaries = self.data.flatness
        if summaries is None:
            return
        self.clear_curves(self.flatness_plot)
        for run, summary in summaries.items():
            self.run_curve(self.flatness_plot, run, self.key, summary[self.key])
        ratio = self.key == "flatness_ratio"
        self.flatness_plot.setLabel("left", METRIC_LABELS[self.key] + ("" if ratio else " (nats)"))
        self._on_log_changed()
        self.fit_epochs(self.flatness_plot)

    def _on_log_changed(self) -> None:
        self.flatness_plot.setLogMode(y=self.log_y.isChecked())
        self.flatness_plot.enableAutoRange(y=True)

    def refresh(self, index: int) -> None:
        self.line.setValue(self.epoch_x(self.data.x[index]))

    def get_settings(self) -> dict:
        return {"metric": self.key, "log_y": self.log_y.isChecked()}

    def set_settings(self, settings: dict) -> None:
        index = self.statistic.findData(settings.get("metric"))
        if index >= 0:
            self.statistic.setCurrentIndex(index)
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
