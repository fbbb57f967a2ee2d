"""Where parallel work runs: a `dask.distributed` client for `--workers N`, `--scheduler ADDRESS` or
`DASK_SCHEDULER_ADDRESS`, or none (serial, in this process)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from geostore.errors import GeostoreError

if TYPE_CHECKING:
    from distributed import Client

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
# Variables LocalCluster sets to 1 in this process's environment too (see ECOSYSTEM.md): restored after.
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, so glibc hands every freed block back to the system
# and the next multi-MB tensor is page-faulted in again: flatness ran ~1.5x slower per direction in such a
# process. Local workers keep up to this many freed bytes instead (dask's own memory limits still apply).
WORKER_MALLOC_TRIM_THRESHOLD = 64 * 2**20


@contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Client | None]:
    """A client of an existing scheduler (argument, then environment), of a local cluster of `workers`
    single-threaded processes, or None when neither is asked for."""
    if workers is not None and workers < 1:
        raise GeostoreError(f"`workers` must be at least 1, got {workers}")
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if not address and not workers:
        yield None
        return
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout="3s")
        except OSError as exc:
            raise GeostoreError(f"`scheduler` {address}: cannot connect ({exc})") from None
        with client:
            yield client
        return
    import dask

    saved = {name: os.environ.get(name) for name in _THREAD_ENV}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_":
                              WORKER_MALLOC_TRIM_THRESHOLD}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        _restore(saved)
        with cluster, Client(cluster) as client:
            yield client
    finally:  # a worker restarted meanwhile (one died) set them again
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    """Put this process's environment variables `saved` back as they were (None: unset)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
