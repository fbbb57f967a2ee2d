"""Heavy work off the UI thread: a one-thread `QThreadPool` whose results come back on the UI thread.

One thread, so store reads never compete with each other for the two cores and the store's own
caches (PCA) are never written by two jobs at once. `busy_changed` drives the busy indicators.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from PySide6.QtCore import QCoreApplication, QElapsedTimer, QObject, QRunnable, QThreadPool, Signal, Slot


class _Relay(QObject):
    """Lives on the UI thread; the worker emits through it so results arrive there, queued."""

    finished = Signal(int, bool, object)


class _Job(QRunnable):
    def __init__(self, key: int, fn: Callable[[], object], relay: _Relay) -> None:
        super().__init__()
        self.key, self.fn, self.relay = key, fn, relay

    def run(self) -> None:
        try:
            result, ok = self.fn(), True
        except Exception as exc:  # reported to the dock that asked, as one line
            result, ok = str(exc) or type(exc).__name__, False
        self.relay.finished.emit(self.key, ok, result)


class Jobs(QObject):
    """Runs callables on a worker thread; `on_done(result)` or `on_failed(message)` run on the UI thread."""

    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._relay = _Relay(self)
        self._relay.finished.connect(self._on_finished)
        self._keys = itertools.count()
        self._pending: dict[int, tuple[Callable, Callable | None]] = {}
        self._quiet: set[int] = set()  # pending jobs that do not count as busy (`submit(quiet=True)`)
        self._closed = False
        self.failures: list[str] = []  # every job's one-line failure, in order (a damaged store, ...)

    @property
    def busy(self) -> bool:
        """Whether any job but the quiet ones is queued or running."""
        return len(self._pending) > len(self._quiet)

    def submit(self, fn: Callable[[], object], on_done: Callable[[object], None],
               on_failed: Callable[[str], None] | None = None, *, quiet: bool = False) -> None:
        """Run `fn()` on the worker thread, then `on_done(result)` (or `on_failed(message)`) here. A `quiet` job
        (a follower's poll, every second) neither shows as busy nor counts among the `failures`."""
        if self._closed:
            return
        was_busy = self.busy
        key = next(self._keys)
        self._pending[key] = (on_done, on_failed)
        if quiet:
            self._quiet.add(key)
        if self.busy and not was_busy:
            self.busy_changed.emit(True)
        self._pool.start(_Job(key, fn, self._relay))

    @Slot(int, bool, object)
    def _on_finished(self, key: int, ok: bool, result: object) -> None:
        was_busy = self.busy
        on_done, on_failed = self._pending.pop(key, (None, None))
        quiet = key in self._quiet
        self._quiet.discard(key)
        if self._closed:
            return
        if ok and on_done is not None:
            on_done(result)
        elif not ok:
            if not quiet:
                self.failures.append(str(result))
            if on_failed is not None:
                on_failed(result)
        if was_busy and not self.busy:
            self.busy_changed.emit(False)

    def wait(self, timeout_ms: int = 120_000) -> bool:
        """Process events until every job, and any job their callbacks start, is done; False on timeout."""
        clock = QElapsedTimer()
        clock.start()
        while self._pending and clock.elapsed() < timeout_ms:
            self._pool.waitForDone(20)
            QCoreApplication.processEvents()
        return not self._pending

    def close(self) -> None:
        """Drop queued jobs, wait for the running one, and deliver no more results."""
        self._closed = True
        self._pool.clear()
        self._pool.waitForDone()
