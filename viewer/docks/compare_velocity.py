"""Velocity of every shown run: how fast all its weights move (`Store.velocity` of `all`), per epoch of training
or per checkpoint step, each step drawn at its later epoch."""

from __future__ import annotations

import numpy as np

from viewer.docks.compare_base import CompareDock
from viewer.docks.velocity import MODES, VelocityDock


class CompareVelocityDock(CompareDock, VelocityDock):
    """`‖θ(i+1) − θ(i)‖` of all weights, one curve per run; loading, the rate and log-y choices and settings are
    `VelocityDock`'s, as are its name and title."""

    def build(self) -> None:
        self.mode = self.combo("rate", MODES, self.load)
        self.log_y = self.checkbox("log y", True, self._on_log_changed)
        self.velocity_plot = self.plot(y_label=f"‖Δθ‖₂ per {self.data.unit}")
        self.run_key(self.velocity_plot)
        self.epoch_axis(self.velocity_plot)
        self.line = self.epoch_line(self.velocity_plot)
        self._on_log_changed()

    def _draw(self, velocities: dict[str, np.ndarray]) -> None:
        self.clear_curves(self.velocity_plot)
        for run, values in velocities.items():
            self.run_curve(self.velocity_plot, run, f"velocity_{self.mode.currentData()}", values)
        self.fit_epochs(self.velocity_plot)
