"""Curvature profile: at the current epoch, curvature against the perturbation length ε (log axis).

The default quantity, `2c̄/ε²`, estimates `Tr(H)/D` at each scale: a flat line where the loss is quadratic
over that scale, rising or falling where higher-order terms (or ReLU kinks) take over, and noisy at the
small-ε end, where the curvature nears float32's resolution of the loss. Hutchinson's `Tr(H)/D` is drawn
across when the store holds the Hessian. The y range is fixed for the whole run by default, so scrubbing
shows the profile move against a still frame.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

from viewer import palette
from viewer.docks.base import ViewerDock

QUANTITIES = {"normalised": "2c̄/ε² (≈ Tr H / D)", "mean": "mean curvature c̄", "flatness_ratio": "flatness ratio"}
RANGES = {"run": "same for every epoch", "epoch": "fitted to this epoch"}


class ProfileDock(ViewerDock):
    """`Store.curvature_profile()` at the current epoch, with ±2 standard errors."""

    NAME = "profile"
    TITLE = "Curvature profile"
    NEEDS = "profile"

    def build(self) -> None:
        self.quantity = self.combo("show", QUANTITIES, self._on_quantity_changed)
        self.y_range = self.combo("y range", RANGES, self._on_quantity_changed)
        self.profile_plot = self.plot(x_label="ε (perturbation length)", y_label=QUANTITIES["normalised"])
        self.hover(self.profile_plot)
        self.profile_plot.setLogMode(x=True)
        self.errors = pg.ErrorBarItem(pen=palette.pen(palette.BAND, 1.5), beam=0)
        self.profile_plot.addItem(self.errors)
        self.curve = self.profile_plot.plot(pen=palette.pen(palette.METRIC, 2), symbol="o", symbolSize=7,
                                            symbolBrush=palette.METRIC, symbolPen=None)
        self.hutchinson = pg.InfiniteLine(angle=0, pen=palette.pen(palette.MEDIAN, 1.6, Qt.PenStyle.DashLine))
        self.profile_plot.addItem(self.hutchinson, ignoreBounds=True)
        self.caption = pg.LabelItem(justify="right", size="10pt", color=palette.FOREGROUND)
        self.caption.setParentItem(self.profile_plot.vb)
        self.caption.anchor(itemPos=(1, 0), parentPos=(1, 0), offset=(-8, 4))

    def load(self) -> None:
        self.run(self.data.load_curvature, lambda _curvature: self._on_quantity_changed())

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float | None]:
        """`(epsilon, value, error, hutchinson)` of the chosen quantity, all epochs: `(n_epoch, n_eps)` arrays
        (`error` ±2 standard errors, None for the ratio) and the Hutchinson `Tr(H)/D` per epoch or None."""
        curvature = self.data.curvature
        profile, key = curvature.profile, self.quantity.currentData()
        if key == "flatness_ratio":
            return profile["epsilon"], profile["flatness_ratio"], None, None
        value = profile["normalised_curvature" if key == "normalised" else "mean_curvature"]
        error = 2 * profile["normalised_stderr" if key == "normalised" else "curvature_stderr"]
        hessian = curvature.hessian
        trace = None if hessian is None or key != "normalised" else hessian["hessian_trace"] / curvature.n_params
        return profile["epsilon"], value, error, trace

    def _on_quantity_changed(self) -> None:
        if self.data.curvature is None:
            return
        epsilon, value, error, trace = self.rows()
        key = self.quantity.currentData()
        self.profile_plot.setLabel("left", QUANTITIES[key])
        relative = self.data.curvature.settings["profile"]["relative"]
        self.profile_plot.setLabel("bottom", "ε (factor × ‖θ‖, in weight units)" if relative else "ε")
        entries = [(QUANTITIES[key], palette.METRIC)] + ([("±2 s.e.", palette.BAND)] if error is not None else [])
        self.set_key(self.profile_plot, entries + ([("Hutchinson Tr(H)/D", palette.MEDIAN)] if trace is not None
                                                   else []))
        if self.y_range.currentData() == "run":
            spread = [value] if error is None else [value - error, value + error]
            finite = np.concatenate([v[np.isfinite(v)] for v in spread] + ([trace[np.isfinite(trace)]]
                                                                             if trace is not None else []))
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            self.profile_plot.enableAutoRange(y=False)
            self.profile_plot.setYRange(low, high if high > low else low + 1.0, padding=0.06)
        finite_eps = epsilon[np.isfinite(epsilon)]
        if finite_eps.size:
            self.profile_plot.setXRange(np.log10(finite_eps.min()), np.log10(finite_eps.max()), padding=0.08)
        self.refresh(self.state.index)

    def refresh(self, index: int) -> None:
        if self.data.curvature is None:
            return
        epsilon, value, error, trace = self.rows()
        epoch = int(self.data.epochs[index])
        present = bool(np.isfinite(value[index]).all())
        self.curve.setData(epsilon[index] if present else [], value[index] if present else [])
        if present:  # label the epsilons themselves: a log axis over one or two decades crowds its minor labels
            self.profile_plot.getAxis("bottom").setTicks([[(np.log10(e), f"{e:.3g}") for e in epsilon[index]], []])
        self.errors.setVisible(present and error is not None)
        if present and error is not None:
            self.errors.setData(x=np.log10(epsilon[index]), y=value[index], height=2 * error[index])
        self.hutchinson.setVisible(trace is not None and bool(np.isfinite(trace[index])))
        if self.hutchinson.isVisible():
            self.hutchinson.setValue(trace[index])
        if self.y_range.currentData() == "epoch":
            self.profile_plot.enableAutoRange(y=True)
        self.caption.setText(f"{self.data.unit} {epoch}" + ("" if present else " · no profile computed")
                             + (f" · Hutchinson Tr(H)/D = {trace[index]:.3g}" if self.hutchinson.isVisible() else ""))

    def table(self) -> dict[str, np.ndarray]:
        if self.data.curvature is None:
            return {}
        epsilon, value, error, _ = self.rows()
        index = self.state.index
        out = {"epoch": np.full(epsilon.shape[1], self.data.epochs[index]), "epsilon": epsilon[index],
               self.quantity.currentData(): value[index]}
        if error is not None:
            out["two_stderr"] = error[index]
        return out

    def get_settings(self) -> dict:
        return {"quantity": self.quantity.currentData(), "y_range": self.y_range.currentData()}

    def set_settings(self, settings: dict) -> None:
        for box, key in ((self.quantity, "quantity"), (self.y_range, "y_range")):
            index = box.findData(settings.get(key))
            if index >= 0:
                box.setCurrentIndex(index)
