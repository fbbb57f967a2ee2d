"""The shared epoch control: slider over the stored epochs, epoch spin box, play/pause with speed, keys.

It writes only through `ViewerState.set_index` and follows `epoch_changed`, like every dock.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSlider, QSpinBox, QStyle, QToolButton, QWidget

from viewer.data import ViewerData
from viewer.state import ViewerState

SPEEDS = (5, 10, 25, 50, 100)
"""Animation speeds offered, in checkpoints per second."""


class EpochSpinBox(QSpinBox):
    """Shows the epoch number; arrows step to the neighbouring stored epoch, typed numbers snap to the nearest."""

    def __init__(self, data: ViewerData, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._data = data
        self.setKeyboardTracking(False)
        self.setPrefix(f"{data.unit} ")
        self.setAccelerated(True)

    def stepBy(self, steps: int) -> None:
        index = min(max(self._data.nearest_index(self.value()) + steps, 0), self._data.n_epochs - 1)
        self.setValue(int(self._data.epochs[index]))


class EpochControl(QWidget):
    """Slider, spin box and player bound to a `ViewerState`; its `actions()` carry the keyboard shortcuts."""

    def __init__(self, data: ViewerData, state: ViewerState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._data, self._state = data, state
        self.timer = QTimer(self)
        self._icons = {key: self.style().standardIcon(getattr(QStyle.StandardPixmap, f"SP_Media{key}"))
                       for key in ("Play", "Pause", "SkipBackward", "SeekBackward", "SeekForward", "SkipForward")}
        self.play_button = QToolButton(icon=self._icons["Play"], toolTip="Play / pause (Space)")
        self.play_button.setCheckable(True)
        self.speed = QComboBox(toolTip="Animation speed")
        for speed in SPEEDS:
            self.speed.addItem(f"{speed} ckpt/s", speed)
        self.speed.setCurrentIndex(SPEEDS.index(25))
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.spin = EpochSpinBox(data)
        self.position = QLabel()
        self.position.setMinimumWidth(110)
        self._set_ranges()

        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 2, 6, 2)
        for button in self._step_buttons():
            layout.addWidget(button)
        layout.insertWidget(2, self.play_button)
        layout.addWidget(self.speed)
        layout.addWidget(self.slider, stretch=1)
        layout.addWidget(self.spin)
        layout.addWidget(self.position)

        self.play_button.toggled.connect(self._on_play_toggled)
        self.speed.currentIndexChanged.connect(self._on_speed_changed)
        self.timer.timeout.connect(self._on_tick)
        self.slider.valueChanged.connect(state.set_index)
        self.spin.valueChanged.connect(self._on_spin_changed)
        state.epoch_changed.connect(self._on_epoch_changed)
        self._on_speed_changed()
        self._on_epoch_changed(state.index)

    def set_data(self, data: ViewerData) -> None:
        """Cover the epochs of `data`, the store's newer commit (`geoview --follow`), and resize the state to them:
        at the newest epoch it follows to the new newest, anywhere else it stays (`ViewerState.resize`)."""
        self._data = self.spin._data = data
        self._set_ranges()
        self._state.resize(data.n_epochs)
        self._on_epoch_changed(self._state.index)

    def _set_ranges(self) -> None:
        data = self._data
        for widget, (low, high) in ((self.slider, (0, data.n_epochs - 1)),
                                    (self.spin, (int(data.epochs[0]), int(data.epochs[-1])))):
            widget.blockSignals(True)  # a range that clamps the value must not move the state
            widget.setRange(low, high)
            widget.blockSignals(False)
        self.slider.setPageStep(max(1, data.n_epochs // 20))

    def _step_buttons(self) -> list[QToolButton]:
        """First/previous/next/last buttons; their actions and the keys-only ones are added to this widget."""
        state = self._state
        buttons = []
        for icon, tip, key, slot in (("SkipBackward", "First epoch", "Home", lambda: state.set_index(0)),
                                     ("SeekBackward", "Previous epoch", "Left", lambda: state.step(-1)),
                                     ("SeekForward", "Next epoch", "Right", lambda: state.step(1)),
                                     ("SkipForward", "Last epoch", "End", lambda: state.set_index(state.n_epochs - 1))):
            action = self._add_action(tip, key, slot)
            action.setIcon(self._icons[icon])
            action.setToolTip(f"{tip} ({key})")
            button = QToolButton()
            button.setDefaultAction(action)
            buttons.append(button)
        self._add_action("Back 10 epochs", "PgUp", lambda: state.step(-10))
        self._add_action("Forward 10 epochs", "PgDown", lambda: state.step(10))
        self._add_action("Play / pause", "Space", self.play_button.toggle)
        return buttons

    def _add_action(self, text: str, key: str, slot) -> QAction:
        action = QAction(text, self)
        action.setShortcut(QKeySequence(key))
        action.triggered.connect(lambda _checked=False: slot())
        self.addAction(action)
        return action

    def _on_epoch_changed(self, index: int) -> None:
        for widget, value in ((self.slider, index), (self.spin, int(self._data.epochs[index]))):
            widget.blockSignals(True)
            widget.setValue(value)
            widget.blockSignals(False)
        phase = self._data.phase_at(self._data.epochs[index])
        self.position.setText(f"checkpoint {index + 1} / {self._data.n_epochs}"
                              + (f" · {phase.replace('_', ' ')}" if phase else ""))

    def _on_spin_changed(self, epoch: int) -> None:
        index = self._data.nearest_index(epoch)
        self._state.set_index(index)
        if self._data.epochs[index] != epoch:  # snapped: show the stored epoch
            self._on_epoch_changed(self._state.index)

    def _on_play_toggled(self, playing: bool) -> None:
        self.play_button.setIcon(self._icons["Pause" if playing else "Play"])
        if playing:
            if self._state.index == self._data.n_epochs - 1:
                self._state.set_index(0)
            self.timer.start()
        else:
            self.timer.stop()

    def _on_speed_changed(self) -> None:
        self.timer.setInterval(round(1000 / self.speed.currentData()))

    def _on_tick(self) -> None:
        if self._state.index >= self._data.n_epochs - 1:
            self.play_button.setChecked(False)
        else:
            self._state.step(1)
