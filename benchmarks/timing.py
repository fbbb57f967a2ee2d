"""Timing helpers the benchmark scripts share (imported as `timing`: a script's folder is first on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `fn` (after one warm-up call)."""
    fn()
    return min(timed(fn) for _ in range(repeats))
