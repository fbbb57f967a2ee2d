"""Runs: the sweep's runs as a checkable list, each in its colour; checking one shows it in every dock, unchecking
hides it. Writes only through `SweepState.set_shown` and follows `selection_changed`, like the docks."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPixmap
from PySide6.QtWidgets import QDockWidget, QListWidget, QListWidgetItem, QWidget

from viewer import palette
from viewer.sweep_data import SweepViewerData
from viewer.sweep_state import SweepState

SWATCH_PX = 12


class RunsDock(QDockWidget):
    """The checkable list of runs; the tooltip of each says its epochs."""

    NAME = "runs"
    TITLE = "Runs"

    def __init__(self, data: SweepViewerData, state: SweepState, parent: QWidget | None = None) -> None:
        super().__init__(self.TITLE, parent)
        self.setObjectName(self.NAME)
        self.state = state
        self.list = QListWidget()
        for position, run in enumerate(state.runs):
            swatch = QPixmap(SWATCH_PX, SWATCH_PX)
            swatch.fill(QColor(palette.run_colour(position)))
            item = QListWidgetItem(swatch, run)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            epochs = data.run_epochs[run]
            item.setToolTip(f"{run}: {epochs.size} {data.unit}s ({epochs[0]}–{epochs[-1]})")
            self.list.addItem(item)
        self._on_selection_changed(state.selected)
        self.list.itemChanged.connect(self._on_item_changed)
        state.selection_changed.connect(self._on_selection_changed)
        self.setWidget(self.list)

    def item(self, run: str) -> QListWidgetItem:
        """The list item of `run`."""
        return self.list.item(self.state.runs.index(run))

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        self.state.set_shown(item.text(), item.checkState() == Qt.CheckState.Checked)

    def _on_selection_changed(self, selected: tuple[str, ...]) -> None:
        self.list.blockSignals(True)
        for run in self.state.runs:
            self.item(run).setCheckState(Qt.CheckState.Checked if run in selected else Qt.CheckState.Unchecked)
        self.list.blockSignals(False)
