"""`EpochAxis`: what every view of the viewer asks of an epoch axis (nearest stored epoch, the phase an epoch lies
in) and the cache of loaded results, shared by `ViewerData` (one run) and `SweepViewerData` (a sweep's runs)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from geostore import StoreError


class EpochAxis:
    """Base of the viewer's data objects: stored `epochs` (int64, ascending), `x` (their float64 copy for
    pyqtgraph), `phases` ({phase: (first, last)}) and a thread-safe cache of loaded results."""

    def __init__(self, epochs: np.ndarray, phases: dict[str, tuple[int, int]]) -> None:
        self.epochs = np.asarray(epochs, dtype=np.int64)
        self.x = self.epochs.astype(np.float64)  # float64 x for pyqtgraph (float32 x is slow with clip-to-view)
        self.phases = phases
        self._lock = threading.Lock()
        self._cache: dict[tuple, object] = {}

    @property
    def n_epochs(self) -> int:
        """Stored epochs."""
        return int(self.epochs.size)

    def nearest_index(self, epoch: float) -> int:
        """Index of the stored epoch nearest to `epoch` (any real number)."""
        right = int(np.searchsorted(self.x, epoch))
        if right <= 0:
            return 0
        if right >= self.n_epochs:
            return self.n_epochs - 1
        return right if self.x[right] - epoch < epoch - self.x[right - 1] else right - 1

    def phase_at(self, epoch: float) -> str | None:
        """The training phase `epoch` lies in (the later one at a boundary), or None."""
        found = None
        for phase, (first, last) in self.phases.items():
            if first <= epoch <= last:
                found = phase
        return found

    def index_of(self, epoch: int) -> int:
        """Index of a stored epoch; StoreError naming the nearest one if `epoch` is not stored."""
        index = self.nearest_index(epoch)
        if self.epochs[index] != epoch:
            raise StoreError(f"epoch {epoch} is not stored (nearest: {self.epochs[index]})")
        return index

    def _load(self, key: tuple, compute: Callable[[], object]) -> object:
        """The cached value of `key`, computed once (by whichever thread asks first) with `compute`."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]
