"""Divergence: how far the runs are from a reference run at each epoch both hold (`Sweep.divergence` over all
weights), absolute `‖θ_run − θ_ref‖₂` or relative to the reference's norm; every other shown run in its colour, or
one chosen pair. Seeds that agree stay near zero; a run that takes another path rises away.
"""

from __future__ import annotations

import numpy as np

from viewer.docks.compare_base import CompareDock

MEASURES = {"distance": "‖θ − θ_ref‖₂", "relative": "‖θ − θ_ref‖₂ / ‖θ_ref‖₂"}
EVERY = ""
"""The "to" choice meaning every shown run but the reference."""


class DivergenceDock(CompareDock):
    """Distance over epochs of the shown runs (or one) from the reference run."""

    NAME = "divergence"
    TITLE = "Divergence"

    def build(self) -> None:
        runs = {run: run for run in self.state.runs}
        self.reference = self.combo("from", runs, lambda: self.state.set_reference(self.reference.currentData()))
        self.other = self.combo("to", {EVERY: "every shown run", **runs}, self.load)
        self.measure = self.combo("measure", {key: key for key in MEASURES}, self._draw)
        self.log_y = self.checkbox("log y", False, self._on_log_changed)
        self.divergence_plot = self.plot(y_label=MEASURES["distance"])
        self.epoch_axis(self.divergence_plot)
        self.line = self.epoch_line(self.divergence_plot)
        self.state.reference_changed.connect(self._on_reference_changed)

    def others(self) -> list[str]:
        """The runs compared with the reference: the chosen one, or every shown run but the reference."""
        chosen = self.other.currentData()
        others = [chosen] if chosen != EVERY else list(self.state.selected)
        return [run for run in others if run != self.state.reference]

    def _on_reference_changed(self, run: str) -> None:
        self.reference.blockSignals(True)
        self.reference.setCurrentIndex(self.reference.findData(run))
        self.reference.blockSignals(False)
        self.load()

    def selection_changed(self) -> None:
        if self.reason is None:
            self.load()

    def load(self) -> None:
        reference = self.state.reference
        missing = [run for run in self.others() if self.data.divergence(reference, run) is None]
        if missing:
            self.run(lambda: [self.data.load_divergence(reference, run) for run in missing], lambda _d: self._draw())
        else:
            self._draw()

    def _draw(self) -> None:
        reference, measure = self.state.reference, self.measure.currentData()
        self.clear_curves(self.divergence_plot)
        for run in self.others():
            found = self.data.divergence(reference, run)
            if found is not None:
                self.run_curve(self.divergence_plot, run, f"{measure}_from_{reference}", found[measure])
        self.divergence_plot.setLabel("left", MEASURES[measure].replace("ref", reference))
        if self.others():
            self.set_key(self.divergence_plot, [(run, self.colour_of(run)) for run in self.others()])
        else:
            self.divergence_plot.setTitle(f"choose a run other than {reference}", size="9pt")
        self.fit_epochs(self.divergence_plot)
        self.divergence_plot.enableAutoRange(y=True)

    def curve_values(self, run: str) -> np.ndarray:
        """The drawn divergence of `run` from the reference on the shared axis (NaN where not both hold an epoch)."""
        return self.drawn[(run, f"{self.measure.currentData()}_from_{self.state.reference}")]

    def refresh(self, index: int) -> None:
        self.line.setValue(self.epoch_x(self.data.x[index]))

    def _on_log_changed(self) -> None:
        self.divergence_plot.setLogMode(y=self.log_y.isChecked())

    def get_settings(self) -> dict:
        return {"measure": self.measure.currentData(), "log_y": self.log_y.isChecked()}

    def set_settings(self, settings: dict) -> None:
        index = self.measure.findData(settings.get("measure"))
        if index >= 0:
            self.measure.setCurrentIndex(index)
        self.log_y.setChecked(bool(settings.get("log_y", self.log_y.isChecked())))
