"""Keep a store's landscape analyses complete while epochs arrive: `geostore flatness STORE --follow`.

A follower polls the store's commit record (`Store.changed`: one read of the root `zarr.json`, no lock) and
runs one `geostore.compute` pass whenever the epochs changed. Each pass is an ordinary writer session: it holds
the store's lock only while it computes and writes the new epochs, so a `Recorder` training into the store waits
for one pass at most, and every pass that finished stays in the store when the follower is stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import GeostoreError

if TYPE_CHECKING:
    from geostore.landscape import FlatnessReport

POLL_SECONDS = 1.0
"""How often a follower looks for new epochs."""


def follow_compute(
    store: str | os.PathLike,
    analyses: Collection[str] = (),
    *,
    run: str | None = None,
    until_idle: float | None = None,
    poll: float = POLL_SECONDS,
    storage_options: dict | None = None,
    **options: object,
) -> Iterator[FlatnessReport]:
    """`geostore.compute(store, analyses, **options)` now and again whenever the store's epochs change, yielding
    each pass's report; it ends once no epoch arrived for `until_idle` seconds (None: never; stop it with Ctrl-C,
    every finished pass is kept). `run` names one run of a sweep. `probe` and `recompute` apply to the first pass
    only (later passes extend what it set up)."""
    from geostore import open_store
    from geostore.api import compute

    if until_idle is not None and until_idle < 0:
        raise GeostoreError(f"`until_idle` {until_idle}: want a number of seconds >= 0")
    if poll <= 0:
        raise GeostoreError(f"`poll` {poll}: want a number of seconds > 0")
    handle = open_store(store, run, storage_options=storage_options)  # one store: a whole sweep is refused
    seen: np.ndarray | None = None
    changed_at = time.monotonic()
    while True:
        if seen is None or not np.array_equal(handle.epochs, seen):
            seen = handle.epochs
            yield compute(handle.location, analyses, **options)
            options = {**options, "probe": None, "recompute": False}
            changed_at = time.monotonic()
        elif until_idle is not None and time.monotonic() - changed_at >= until_idle:
            return
        else:
            left = None if until_idle is None else until_idle - (time.monotonic() - changed_at)
            time.sleep(poll if left is None else min(poll, max(left, 0.0)))
        if handle.changed():
            handle = handle.reopen()
