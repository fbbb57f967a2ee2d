"""Cyclic garbage collection in the GUI thread only, while a geoview window is open.

Python collects reference cycles in whichever thread happens to allocate. When that is one of the viewer's
worker threads and the garbage holds Qt objects (the plot items of a replaced plot or a closed window),
PySide hands their deletion to the GUI thread, which can then wait for a Qt mutex that the worker holds
while the worker waits for the GIL: a deadlock (seen in the test suite, with the GUI thread inside
`QObject::~QObject`). pyqtgraph's advice (`pyqtgraph.util.garbage_collector`) is the cure used here:
automatic collection off while windows live, and a timer collecting in the GUI thread instead.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

INTERVAL_MS = 1000
_open = 0  # windows holding automatic collection off


class GuiThreadCollector(QObject):
    """Turns automatic collection off for its window's life and collects on a GUI-thread timer instead."""

    def __init__(self, parent: QObject) -> None:
        global _open
        super().__init__(parent)
        if _open == 0:
            gc.disable()
        _open += 1
        self._released = False
        self._timer = QTimer(self, interval=INTERVAL_MS)
        self._timer.timeout.connect(self._collect)
        self._timer.start()

    def _collect(self) -> None:
        gc.collect()

    def release(self) -> None:
        """The window closes: collect here, in the GUI thread, and give collection back when no window is left."""
        global _open
        if self._released:
            return
        self._released = True
        self._timer.stop()
        _open -= 1
        gc.collect()
        if _open == 0:
            gc.enable()
