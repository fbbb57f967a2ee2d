"""The viewer's shared state, free of Qt: the current epoch, the component group (of the store's groups) and
whether epoch axes are logarithmic, and the flatness threshold (a direction is flat when its Δloss, or curvature,
stays below that multiple of the baseline loss).

Docks read it and change it only through `set_index`/`set_group`; listeners run only on a real
change (as napari's `Dims`), so a dock that echoes the state back cannot start a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Event:
    """A list of callbacks called with the new value."""

    def __init__(self) -> None:
        self._callbacks: list[Callable] = []

    def connect(self, callback: Callable) -> None:
        """Call `callback(value)` on every emission (once: connecting an equal callback again changes nothing, so a
        dock built again on grown data, `geoview --follow`, is not called twice)."""
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def emit(self, value: object) -> None:
        """Call every connected callback with `value`."""
        for callback in list(self._callbacks):
            callback(value)


class ViewerState:
    """Position on the epoch axis (an index into the stored epochs), the selected component group and the epoch
    axes' scale (log spreads the early, memorising epochs that a linear axis squeezes into its first percent)."""

    def __init__(self, n_epochs: int, groups: Sequence[str] = ("all",), *, index: int = 0,
                 group: str = "all", threshold: float = 0.1) -> None:
        self.n_epochs = n_epochs
        self.groups = tuple(groups)
        self.index = min(max(index, 0), n_epochs - 1)
        self.group = group
        self._check(group)
        self.log_epoch = False
        self.threshold = float(threshold)
        self.epoch_changed = Event()
        self.group_changed = Event()
        self.epoch_axis_changed = Event()
        self.threshold_changed = Event()

    def set_index(self, index: int) -> None:
        """Move to stored epoch number `index` (clamped to the stored range)."""
        index = min(max(int(index), 0), self.n_epochs - 1)
        if index != self.index:
            self.index = index
            self.epoch_changed.emit(index)

    def resize(self, n_epochs: int) -> None:
        """The store now holds `n_epochs` (it grew while followed): at the newest epoch before, the position moves
        to the newest one; anywhere else (the user moved it) it stays."""
        newest = self.index == self.n_epochs - 1
        self.n_epochs = n_epochs
        self.set_index(n_epochs - 1 if newest else self.index)

    def step(self, delta: int) -> None:
        """Move `delta` stored epochs forward (negative: back)."""
        self.set_index(self.index + delta)

    def set_group(self, group: str) -> None:
        """Select a component group (one of `groups`: the store's, `all` first)."""
        self._check(group)
        if group != self.group:
            self.group = group
            self.group_changed.emit(group)

    def set_log_epoch(self, log: bool) -> None:
        """Draw every epoch axis on a log scale (True) or a linear one."""
        if bool(log) != self.log_epoch:
            self.log_epoch = bool(log)
            self.epoch_axis_changed.emit(self.log_epoch)

    def set_threshold(self, threshold: float) -> None:
        """Call a direction flat when it raises the loss by less than `threshold` times the baseline (> 0)."""
        if not threshold > 0:
            raise ValueError(f"flatness threshold must be > 0, got {threshold}")
        if float(threshold) != self.threshold:
            self.threshold = float(threshold)
            self.threshold_changed.emit(self.threshold)

    def _check(self, group: str) -> None:
        if group not in self.groups:
            raise ValueError(f"unknown group {group!r}; choose from {', '.join(self.groups)}")
