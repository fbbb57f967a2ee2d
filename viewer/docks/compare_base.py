"""`CompareDock`: what the comparison docks share on top of `ViewerDock` — one colour per run, per-run items that
hide with their run when it is deselected, per-run curves drawn at each run's own epochs, a key of the shown runs
and CSV export of what is drawn.

Curves are drawn at the epochs the run holds (not on the union axis with NaN holes), so a run checkpointed on
other epochs than its neighbours still draws one connected line.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

from viewer import palette
from viewer.docks.base import ViewerDock
from viewer.sweep_data import SweepViewerData
from viewer.sweep_state import SweepState
from viewer.worker import Jobs


class CompareDock(ViewerDock):
    """Base of the comparison docks: `data` is a `SweepViewerData`, `state` a `SweepState`."""

    data: SweepViewerData
    state: SweepState

    def __init__(self, data: SweepViewerData, state: SweepState, jobs: Jobs, parent: QWidget | None = None) -> None:
        self.run_items: dict[str, list[pg.GraphicsObject]] = {run: [] for run in state.runs}
        self.curves: dict[tuple[pg.PlotItem, str, str], pg.PlotDataItem] = {}
        self.drawn: dict[tuple[str, str], np.ndarray] = {}  # (run, column) -> values on the shared axis, for CSV
        self.keys: dict[pg.PlotItem, list[tuple[str, str]]] = {}  # plot -> entries after the runs
        super().__init__(data, state, jobs, parent)
        state.selection_changed.connect(self._on_selection_changed)

    def colour_of(self, run: str) -> str:
        """The run's colour (the same in every dock)."""
        return palette.run_colour(self.state.runs.index(run))

    def for_run(self, run: str, item: pg.GraphicsObject) -> pg.GraphicsObject:
        """Register `item` as `run`'s: shown only while the run is selected."""
        self.run_items[run].append(item)
        item.setVisible(run in self.state.selected)
        return item

    def run_curve(self, plot: pg.PlotItem, run: str, column: str, values: np.ndarray, *, dashed: bool = False,
                  width: float = 1.8) -> pg.PlotDataItem:
        """Draw `values` (on the shared axis) as `run`'s curve `column` in `plot`, at the epochs the run holds;
        created in the run's colour on first use."""
        key = (plot, run, column)
        if key not in self.curves:
            style = pg.QtCore.Qt.PenStyle.DashLine if dashed else None
            curve = plot.plot(pen=palette.pen(self.colour_of(run), width, style), connect="finite",
                              name=f"{run} {column.replace('_', ' ')}")
            self.static(curve)
            self.curves[key] = self.for_run(run, curve)
        held = self.data.present[run]
        self.curves[key].setData(self.data.x[held], np.asarray(values, dtype=np.float64)[held])
        self.drawn[(run, column)] = np.asarray(values, dtype=np.float64)
        return self.curves[key]

    def clear_curves(self, plot: pg.PlotItem) -> None:
        """Empty `plot`'s run curves (a run no longer drawn there keeps no stale line)."""
        for (where, run, column), curve in self.curves.items():
            if where is plot:
                curve.setData([], [])
                self.drawn.pop((run, column), None)

    def run_key(self, plot: pg.PlotItem, extra: list[tuple[str, str]] | None = None) -> None:
        """Key of `plot`: the shown runs in their colours, then `extra`; kept up to date with the selection."""
        self.keys[plot] = extra or []
        self.set_key(plot, [(run, self.colour_of(run)) for run in self.state.selected] + (extra or []))

    def _on_selection_changed(self, selected: tuple[str, ...]) -> None:
        for run, items in self.run_items.items():
            for item in items:
                item.setVisible(run in selected)
        for plot, extra in list(self.keys.items()):
            self.run_key(plot, extra)
        self.selection_changed()
        if self.reason is None:
            self.refresh(self.state.index)

    def selection_changed(self) -> None:
        """Subclass hook: redo what depends on the shown runs beyond hiding their items."""

    def table(self) -> dict[str, np.ndarray]:
        """The drawn per-run columns of the shown runs on the shared epoch axis (NaN where a run lacks an epoch)."""
        return {self.data.unit: self.data.epochs,
                **{f"{run}_{column}": values for (run, column), values in self.drawn.items()
                   if run in self.state.selected}}
