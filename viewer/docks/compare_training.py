"""Training curves of every shown run: test loss solid, train loss dashed (log y), and the accuracies the same way
when recorded — where the runs of a sweep part ways (one groks earlier) reads off at a glance."""

from __future__ import annotations

from viewer import palette
from viewer.docks.compare_base import CompareDock

STYLES = {"test": "━━", "train": "╌╌"}


class CompareTrainingDock(CompareDock):
    """Loss and accuracy of each run, as its sources recorded them."""

    NAME = "training"
    TITLE = "Training curves"
    NEEDS = "metrics"

    def build(self) -> None:
        self.log_y = self.checkbox("log loss", True, self._on_log_changed)
        recorded = {name for metrics in self.data.metrics.values() for name in metrics}
        self.loss_plot = self.plot(0, 0, x_label=None, y_label="loss (nats)")
        self.plots = [self.loss_plot]
        if any(name.endswith("accuracy") for name in recorded):
            self.accuracy_plot = self.plot(1, 0, x_label=None, y_label="accuracy")
            self.accuracy_plot.setYRange(0, 1.02, padding=0)
            self.accuracy_plot.setXLink(self.loss_plot)
            self.plots.append(self.accuracy_plot)
        self.plots[-1].setLabel("bottom", self.data.unit)
        self.run_key(self.loss_plot, [("test", palette.FOREGROUND), ("train (dashed)", palette.THRESHOLD)])
        for plot in self.plots:
            plot.getAxis("left").setWidth(58)
            self.epoch_axis(plot)
        self.lines = [self.epoch_line(plot) for plot in self.plots]
        self._on_log_changed()

    def load(self) -> None:
        for run, metrics in self.data.metrics.items():
            for name, values in metrics.items():
                kind, _, what = name.partition("_")
                if what == "loss" or (what == "accuracy" and len(self.plots) > 1):
                    plot = self.loss_plot if what == "loss" else self.accuracy_plot
                    self.run_curve(plot, run, name, values, dashed=kind == "train")
        self.fit_epochs(self.loss_plot)
        self.refresh(self.state.index)

    def refresh(self, index: int) -> None:
        for line in self.lines:
            line.setValue(self.epoch_x(self.data.x[index]))

    def _on_log_changed(self) -> None:
        self.loss_plot.setLogMode(y=self.log_y.isChecked())

    def get_settings(self) -> dict:
        return {"log_y": self.log_y.isChecked()}

    def set_settings(self, settings: dict) -> None:
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
