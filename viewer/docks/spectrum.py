"""Spectrum: the effective dimensionality of a weight matrix over training, and its singular values now.

Above, the participation ratio `(Σs)² / Σs²` of each matrix of the chosen parameter (one curve per layer and
head) over epochs, the current epoch marked; below, the singular values of each at the current epoch on a
log axis, in the same colours. Both come from one `Store.spectrum` call per parameter.
"""

from __future__ import annotations

import numpy as np

from viewer import palette
from viewer.data import Spectrum
from viewer.docks.base import ViewerDock

SPECTRUM_COLOURS = (*palette.GROUPS.values(), *palette.MORE_GROUPS)
"""One colour per matrix of a parameter, cycled when it has more."""


class SpectrumDock(ViewerDock):
    """Participation ratio over epochs and singular values at the current epoch, from `Store.spectrum`."""

    NAME = "spectrum"
    TITLE = "Spectrum"

    def build(self) -> None:
        self.parameter = self.combo("matrix", {name: name for name in self.data.matrices}, self.load)
        self.parameter.blockSignals(True)  # the first choice, before anything is drawn
        self.parameter.setCurrentIndex(max(0, self.parameter.findData(self.data.default_matrix)))
        self.parameter.blockSignals(False)
        self.ratio_plot = self.plot(y_label="participation ratio")
        self.epoch_axis(self.ratio_plot)
        self.line = self.epoch_line(self.ratio_plot)
        self.values_plot = self.plot(row=1, x_label="singular value index", y_label="singular value")
        self.values_plot.setLogMode(y=True)
        self.hover(self.values_plot)
        self.ratio_curves: list = []
        self.value_curves: list = []
        if not self.data.matrices:
            self.reason = "No weight matrix in this store: every parameter has fewer than two axes per layer."

    def load(self) -> None:
        name = self.parameter.currentData()
        self.run_unless_cached(self.data.spectrum(name), lambda: self.data.load_spectrum(name), self._draw)

    def _draw(self, spectrum: Spectrum) -> None:
        """One participation-ratio curve and one spectrum curve per matrix of the parameter."""
        if spectrum.name != self.parameter.currentData():
            return  # a parameter chosen before this one finished loading
        for plot, curves in ((self.ratio_plot, self.ratio_curves), (self.values_plot, self.value_curves)):
            for curve in curves:
                plot.removeItem(curve)
        colours = [SPECTRUM_COLOURS[i % len(SPECTRUM_COLOURS)] for i in range(len(spectrum.labels))]
        self.ratio_curves = [self.ratio_plot.plot(self.data.x, spectrum.participation_ratio[:, i], name=label,
                                                  pen=palette.pen(colour, 1.6), connect="finite")
                             for i, (label, colour) in enumerate(zip(spectrum.labels, colours, strict=True))]
        self.static(*self.ratio_curves)
        self.value_curves = [self.values_plot.plot(pen=palette.pen(colour, 1.6), symbol="o", symbolSize=4,
                                                   symbolPen=None, symbolBrush=colour, name=label)
                             for label, colour in zip(spectrum.labels, colours, strict=True)]
        self.set_key(self.ratio_plot, list(zip(spectrum.labels, colours, strict=True)))
        self.fit_epochs(self.ratio_plot)

    def refresh(self, index: int) -> None:
        self.line.setValue(self.epoch_x(self.data.x[index]))
        spectrum = self.data.spectrum(self.parameter.currentData())
        if spectrum is None or len(self.value_curves) != len(spectrum.labels):
            return
        values = spectrum.singular_values[index]
        for curve, row in zip(self.value_curves, values, strict=True):
            curve.setData(np.arange(1, row.size + 1), row)

    def table(self) -> dict[str, np.ndarray]:
        spectrum = self.data.spectrum(self.parameter.currentData())
        if spectrum is None:
            return {}
        return {"epoch": self.data.epochs,
                **{f"participation_ratio_{label}": spectrum.participation_ratio[:, i]
                   for i, label in enumerate(spectrum.labels)}}

    def get_settings(self) -> dict:
        return {"matrix": self.parameter.currentData()}

    def set_settings(self, settings: dict) -> None:
        index = self.parameter.findData(settings.get("matrix"))
        if index >= 0:
            self.parameter.setCurrentIndex(index)
