"""Torch's thread count on a shared machine: fitted to the cores other processes leave free (issue 16).

Torch runs its CPU work in OpenMP parallel regions whose threads spin-wait at the end of each region. With more
runnable threads than cores, a region's threads wait for a descheduled team-mate, and geostore's evaluators run many
short regions: the fast flatness path took 20 ms/direction with 2 threads on 2 idle cores and 1,000-4,000 ms beside
two busy processes, where one thread took 40-100 ms. `OMP_WAIT_POLICY=PASSIVE` (threads sleep at once) avoids that
but cost the idle case as much as one thread does (36 ms; `GOMP_SPINCOUNT=1000` 33 ms), and it acts only if set
before torch loads. So geostore leaves the wait policy alone and fits the thread count instead: before each block of
work (`fitted()`, e.g. one call of a batched loss) it uses as many threads as cores are free right now, between one
and torch's own count, and restores torch's count after. "Free" is read from Linux's count of runnable threads
(`/proc/loadavg`) less this process's own; elsewhere the count is left as it is. A batched loss that is a pure
function of each weight set (the modular-addition fast loss) goes further (`split_sets`): its sets are shared among
Python threads with one torch thread each, which have no barrier to wait at and equal a one-thread run bit for bit.
Every entry point (the CLI, geoview's workers, Dask tasks, library calls) gets this through the evaluators; Dask
tasks already run one thread. Only work whose values do not depend on the count is fitted: loss evaluations
(flatness, antithetic, profile, plane), not derivatives (Hessian-vector products differ in their last bits between 1
and 2 threads, so a stored Hessian value would depend on the load).

Users' settings win: with `OMP_NUM_THREADS` or `MKL_NUM_THREADS` in the environment, or a torch thread count other
than torch's default (`torch.set_num_threads(n)`), nothing is changed. Results do not depend on the count chosen
where the kernels round alike for every thread count (checked by `benchmarks/flatness.py` and the tests).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

# Variables through which a user fixes torch's thread count (torch reads them when it loads).
USER_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_P = ParamSpec("_P")
_R = TypeVar("_R")
_inside = threading.local()  # torch's thread count is per thread too (OpenMP and MKL keep it per thread)


@functools.cache
def default_threads() -> int:
    """Torch's default intra-op thread count here: the physical cores (cores, not hyper-threads, as torch counts)."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def busy_elsewhere(samples: int = 3) -> int | None:
    """Runnable threads of other processes right now (Linux: `/proc/loadavg` less this process's running
    threads; the least of `samples` reads in a row, so that a task that only flickers through is not counted),
    or None where that cannot be read."""
    counts = [_busy_elsewhere() for _ in range(samples)]
    return None if None in counts else min(counts)


def _busy_elsewhere() -> int | None:
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for task in os.scandir("/proc/self/task"):
            try:
                stat = Path(task.path, "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat.rpartition(")")[2].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def fitting_threads(available: int) -> int:
    """Threads for the next block of work, at most `available`: one per core that no other process's runnable
    thread takes (at least one), or `available` where the load cannot be read."""
    others = busy_elsewhere()
    if others is None:
        return available
    return max(1, min(available, (os.cpu_count() or 1) - others))


def adjustable(current: int) -> bool:
    """Whether geostore may change torch's thread count `current`: the user has fixed it neither through the
    environment nor with `torch.set_num_threads` (a count other than torch's default)."""
    return not any(os.environ.get(name) for name in USER_THREAD_ENV) and current == default_threads()


@contextmanager
def fitted() -> Iterator[int]:
    """Torch's thread count, within, fitted to the cores free now (see the module docstring); restored after.

    Yields the count used. Nested blocks keep the outer block's count. Torch hands the last count set to threads
    that first use it later, so a thread starting its torch work during a fitted block of another keeps that count.
    """
    import torch

    current = torch.get_num_threads()
    if getattr(_inside, "active", False) or not adjustable(current):
        yield current
        return
    threads = fitting_threads(current)
    _inside.active = True
    try:
        if threads != current:
            torch.set_num_threads(threads)
        yield threads
    finally:
        _inside.active = False
        if threads != current:
            torch.set_num_threads(current)


def fitted_calls(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn` with each call run `fitted()`."""
    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with fitted():
            return fn(*args, **kwargs)

    return call


def split_sets(loss: Callable[[Mapping], object]) -> Callable[[Mapping], object]:
    """A batched loss `loss(weights) -> (B,)` of a pure function of each weight set, run on `torch`'s count of
    Python threads with one torch thread each, every thread taking the next weight set as it becomes free.

    Independent single-threaded workers have no OpenMP barrier to wait at: beside busy processes each one makes
    progress whenever it is scheduled, where one team of OpenMP threads waits for its slowest (descheduled) member
    at the end of every short parallel region; a worker that shares its core takes fewer sets. Each weight set is
    computed alone on one thread, so the values equal a one-thread run bit for bit whoever computes it. Where
    geostore may not change torch's count (the user fixed it, or a Dask task runs one thread), for one set, or
    for tensors on another device than the CPU, `loss` runs as it is, `fitted()`.
    """
    import torch

    @functools.wraps(loss)
    def call(weights: Mapping) -> object:
        current = torch.get_num_threads()
        sets = len(next(iter(weights.values())))
        on_cpu = all(w.device.type == "cpu" for w in weights.values())
        if min(current, sets) < 2 or not on_cpu or getattr(_inside, "active", False) or not adjustable(current):
            with fitted():
                return loss(weights)
        try:
            return torch.cat(_sets_on_own_threads(loss, weights, sets, min(current, sets)))
        finally:
            torch.set_num_threads(current)  # torch's global count, which the workers set to one

    return call


def _sets_on_own_threads(loss: Callable[[Mapping], object], weights: Mapping, sets: int, workers: int) -> list:
    """`[loss(set i) for i in range(sets)]`, computed by `workers` threads of one torch thread each, each taking
    the next set when free; the first error raised stops the others after their current set and is raised."""
    import torch

    results: list = [None] * sets
    errors: list[BaseException] = []
    pending = iter(range(sets))
    take = threading.Lock()

    def run() -> None:
        torch.set_num_threads(1)
        _inside.active = True  # nested fitted() blocks keep the one thread
        while not errors:
            with take:
                i = next(pending, None)
            if i is None:
                return
            try:
                results[i] = loss({name: w[i:i + 1] for name, w in weights.items()})
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run, name=f"geostore-loss-{k}") for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
