"""Velocity: how fast the weights move, globally and per component group, with the current epoch marked.

Checkpoints are unevenly spaced (dense early), so the default is the rate per epoch of training;
per checkpoint shows the raw step between stored epochs. Step `i -> i+1` is drawn at epoch `i+1`.
"""

from __future__ import annotations

import numpy as np

from viewer import palette
from viewer.data import group_label
from viewer.docks.base import ViewerDock

MODES = {"per_epoch": "per epoch", "per_checkpoint": "per checkpoint"}


class VelocityDock(ViewerDock):
    """`‖θ(i+1) − θ(i)‖` of every group, from `Store.velocities`."""

    NAME = "velocity"
    TITLE = "Velocity"

    def build(self) -> None:
        self.mode = self.combo("rate", MODES, self.load)
        self.log_y = self.checkbox("log y", True, self._on_log_changed)
        self.velocity_plot = self.plot(y_label=f"‖Δθ‖₂ per {self.data.unit}")
        groups = self.data.velocity_groups
        colours = {g: palette.group_colour(g, i) for i, g in enumerate(groups)}
        self.set_key(self.velocity_plot, [(group_label(g), colours[g]) for g in groups])
        self.curves = {group: self.velocity_plot.plot(pen=palette.pen(colours[group], 2.2 if group == "all" else 1.5),
                                                      connect="finite", name=group_label(group))
                       for group in groups}
        self.static(*self.curves.values())
        self.epoch_axis(self.velocity_plot)
        self.line = self.epoch_line(self.velocity_plot)
        self._on_log_changed()

    @property
    def per_epoch(self) -> bool:
        """Whether the rate per epoch of training is shown (else the step per checkpoint)."""
        return self.mode.currentData() == "per_epoch"

    def load(self) -> None:
        per_epoch = self.per_epoch
        self.velocity_plot.setLabel("left", f"‖Δθ‖₂ per {self.data.unit}" if per_epoch else "‖Δθ‖₂ per checkpoint")
        cached = self.data.velocities(per_epoch)
        if cached is not None:
            self._draw(cached)
        else:
            self.run(lambda: self.data.load_velocities(per_epoch), self._draw)

    def _draw(self, velocities: dict[str, np.ndarray]) -> None:
        for group, curve in self.curves.items():
            curve.setData(self.data.x[1:], velocities[group])
        self.fit_epochs(self.velocity_plot)

    def refresh(self, index: int) -> None:
        self.line.setValue(self.epoch_x(self.data.x[index]))

    def _on_log_changed(self) -> None:
        self.velocity_plot.setLogMode(y=self.log_y.isChecked())

    def table(self) -> dict[str, np.ndarray]:
        velocities = self.data.velocities(self.per_epoch) or {}
        unit = "per_epoch" if self.per_epoch else "per_checkpoint"
        return {"epoch_from": self.data.epochs[:-1], "epoch_to": self.data.epochs[1:],
                **{f"velocity_{g}_{unit}": v for g, v in velocities.items()}}

    def get_settings(self) -> dict:
        return {"mode": self.mode.currentData(), "log_y": self.log_y.isChecked()}

    def set_settings(self, settings: dict) -> None:
        index = self.mode.findData(settings.get("mode"))
        if index >= 0:
            self.mode.setCurrentIndex(index)
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
