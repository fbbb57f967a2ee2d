"""Training curves: train and test loss (log y) and accuracy over epochs, the learning rate where the source
recorded it (transformers runs), the checkpoint rug, the current epoch.

The grokking curve is what a researcher orients by: test accuracy jumping long after train accuracy.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg

from viewer import palette
from viewer.docks.base import ViewerDock

CURVES = {"train_loss": palette.TRAIN, "test_loss": palette.TEST,
          "train_accuracy": palette.TRAIN, "test_accuracy": palette.TEST}


class TrainingDock(ViewerDock):
    """Loss and accuracy as recorded by the store's sources."""

    NAME = "training"
    TITLE = "Training curves"
    NEEDS = "metrics"

    def build(self) -> None:
        self.log_y = self.checkbox("log loss", True, self._on_log_changed)
        has_accuracy = any(name.endswith("accuracy") for name in self.data.metrics)
        self.loss_plot = self.plot(0, 0, x_label=None, y_label="loss (nats)")
        self.set_key(self.loss_plot, [("train", palette.TRAIN), ("test", palette.TEST),
                                      ("checkpoints (rug)", palette.RUG)])
        self.plots = [self.loss_plot]
        if has_accuracy:
            self.canvas.nextRow()
            self.accuracy_plot = self.plot(1, 0, x_label=None, y_label="accuracy")
            self.accuracy_plot.setYRange(0, 1.02, padding=0)
            self.plots.append(self.accuracy_plot)
        if "learning_rate" in self.data.metrics:
            self.rate_plot = self.plot(len(self.plots), 0, x_label=None, y_label="learning rate")
            self.plots.append(self.rate_plot)
        self.rug = self.plot(len(self.plots), 0, x_label="epoch")
        self.rug.getAxis("left").setTicks([[]])
        self.rug.getAxis("left").setStyle(showValues=False)
        self.rug.setFixedHeight(52)
        self.rug.setYRange(0, 1, padding=0)
        self.rug.showGrid(x=False, y=False)
        self.rug.setMouseEnabled(x=True, y=False)
        self.plots.append(self.rug)
        for plot in self.plots:
            if plot is not self.rug:  # one epoch axis, under the rug
                plot.getAxis("bottom").setStyle(showValues=False)
                plot.getAxis("bottom").setHeight(4)
            plot.setXLink(self.loss_plot)
            plot.getAxis("left").setWidth(58)
            self.epoch_axis(plot)
        self.lines = [self.epoch_line(plot) for plot in self.plots]

    def load(self) -> None:
        x = self.data.x
        for name, values in self.data.metrics.items():
            if name == "learning_rate":
                self.static(self.rate_plot.plot(x, values, pen=palette.pen(palette.TRAIN, 1.8), connect="finite",
                                                name="learning rate"))
            elif name in CURVES:  # the fractional training epoch of a step-indexed run is in the table only
                target = self.loss_plot if name.endswith("loss") else self.accuracy_plot
                self.static(target.plot(x, values, pen=palette.pen(CURVES[name], 1.8), connect="finite",
                                        name=name.replace("_", " ")))
        self.rug_marks = pg.ScatterPlotItem(symbol="|", size=16, pen=None, brush=palette.RUG)
        self.static(self.rug_marks)
        self.rug.addItem(self.rug_marks)
        self.epoch_axis_changed(self.state.log_epoch)
        self._on_log_changed()
        self.fit_epochs(self.loss_plot)
        self.refresh(self.state.index)

    def refresh(self, index: int) -> None:
        epoch = self.epoch_x(self.data.x[index])
        for line in self.lines:
            line.setValue(epoch)

    def epoch_axis_changed(self, log: bool) -> None:
        if hasattr(self, "rug_marks"):  # a scatter item: the plot's log mode does not move it
            self.rug_marks.setData(self.epoch_x(self.data.x), np.full(self.data.n_epochs, 0.5))

    def _on_log_changed(self) -> None:
        self.loss_plot.setLogMode(y=self.log_y.isChecked())

    def table(self) -> dict[str, np.ndarray]:
        return {self.data.unit: self.data.epochs, **self.data.metrics}

    def get_settings(self) -> dict:
        return {"log_y": self.log_y.isChecked()}

    def set_settings(self, settings: dict) -> None:
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
