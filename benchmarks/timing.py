"""Timing helpers the benchmark scripts share (imported as `timing`: a script's folder is first on sys.path)."""

from __future__ import annotations

import multiprocessing
import resource
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


def in_child(target: Callable[..., object], *args: object) -> tuple[float, float, object]:
    """`(seconds, peak RSS MB, result)` of `target(*args)` run in a fresh (spawned) process: its peak RSS is its
    own, not the benchmark's."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (target, *args))


def _measured(target: Callable[..., object], *args: object) -> tuple[float, float, object]:
    start = time.perf_counter()
    result = target(*args)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, result
