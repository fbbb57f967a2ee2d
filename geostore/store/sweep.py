"""Sweeps: many runs in one store, each a complete geostore store under `runs/<name>`.

A sweep's root is a plain Zarr group tagged `geostore_sweep`; each run below it keeps its own
consolidated metadata (its commit record) and its own writer lock, so runs are written, extended and read
independently, and each run's folder is a store of its own (`geostore info sweep.zarr/runs/<name>`,
`xarray.open_zarr("sweep.zarr/runs/<name>")`). The root never changes once created, so writers of
different runs never touch a shared file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from geostore.errors import StoreError
from geostore.store import layout, lock
from geostore.store.location import Location
from geostore.store.reader import Store

if TYPE_CHECKING:
    import xarray as xr

    from geostore.family.base import Family

SWEEP_ATTR = "geostore_sweep"
SWEEP_VERSION = 1
RUNS = "runs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_sweep(location: Location) -> bool:
    """Whether `location` holds a sweep (False for a single-run store or nothing)."""
    if not location.exists(layout.ROOT_META):
        return False
    return SWEEP_ATTR in layout.read_root_meta(location).get("attributes", {})


def check_run_name(name: str) -> str:
    """`name` if it can name a run (letters, digits, `.`, `_`, `-`); StoreError otherwise."""
    if not _NAME.match(name):
        raise StoreError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (not starting with a symbol)")
    return name


def run_location(location: Location, name: str) -> Location:
    """Where run `name` of the sweep at `location` lives."""
    return location.child(f"{RUNS}/{check_run_name(name)}")


def create_sweep(location: Location) -> None:
    """Make `location` a sweep: an empty place becomes one; an existing sweep is kept; anything else is refused.

    Created under the lock of `location` (lock.py), so two processes making one sweep at once both end with it,
    and a store written at the same path at the same moment is never overwritten (one of them is refused).
    """
    if _existing_sweep(location):
        return
    location.make_folder()
    key = lock.acquire(location)
    try:
        if _existing_sweep(location):  # again, under the lock: another process may have made it meanwhile
            return
        group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
        location.write_bytes(f"{RUNS}/{layout.ROOT_META}", json.dumps(group).encode())
        root = {**group, "attributes": {SWEEP_ATTR: {"version": SWEEP_VERSION, "runs": RUNS}}}
        location.write_atomic(layout.ROOT_META, json.dumps(root, indent=2).encode())  # last: marks it a sweep
    finally:
        lock.release(key)


def _existing_sweep(location: Location) -> bool:
    """True for a sweep, False for an empty place; StoreError for anything else."""
    if is_sweep(location):
        return True
    if not location.is_empty():
        raise StoreError(f"{location}: exists and is not a sweep (a sweep needs a new path; open a single "
                         "store with `geostore ingest CKPTS STORE`)")
    return False


class Sweep:
    """A sweep opened for reading: run names, and each run as a `Store`. Use `geostore.open_sweep(path)`."""

    def __init__(self, path: str | os.PathLike | Location, *, storage_options: dict | None = None,
                 families: Callable[[str], Family] | None = None) -> None:
        self.location = Location.of(path, storage_options)
        self._families = families  # handed to each run's Store (see `Store.model`)
        self.path = str(self.location)
        if not self.location.exists():
            raise StoreError(f"{self.path}: no such sweep")
        if not is_sweep(self.location):
            raise StoreError(f"{self.path}: not a sweep (a single-run store: use geostore.open_store)")

    @property
    def runs(self) -> list[str]:
        """Names of the runs holding at least a created store, sorted."""
        return [name for name in self.location.children(RUNS)
                if self.location.exists(f"{RUNS}/{name}/{layout.ROOT_META}")]

    def __getitem__(self, name: str) -> Store:
        if name not in self.runs:
            raise KeyError(f"{self.path}: no run {name!r} (runs: {', '.join(self.runs) or 'none'})")
        return Store(run_location(self.location, name), families=self._families)

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def items(self) -> Iterator[tuple[str, Store]]:
        """`(name, Store)` of every run."""
        for name in self.runs:
            yield name, self[name]

    def pca(self, group: str | Sequence[str] = "all", n_components: int = 3, *, runs: Sequence[str] | None = None,
            fit_runs: Sequence[str] | None = None, fit_epochs: tuple[int, int] | Sequence[int] | None = None,
            memory_budget: int | None = None) -> xr.Dataset:
        """The runs' trajectories in one PCA basis fitted on all their epochs: `projections` over (`run`, `epoch`,
        `component`), NaN where a run lacks an epoch (see `geostore.store.comparison.shared_pca`)."""
        from geostore.store.comparison import shared_pca

        return shared_pca(self, group, n_components, runs=runs, fit_runs=fit_runs, fit_epochs=fit_epochs,
                          memory_budget=memory_budget)

    def divergence(self, run_a: str, run_b: str, group: str | Sequence[str] = "all", *,
                   per_parameter: bool = False) -> xr.Dataset:
        """How far two runs are apart at each epoch both hold, absolute and relative to run_a's norm (see
        `geostore.store.comparison.divergence`)."""
        from geostore.store.comparison import divergence

        return divergence(self, run_a, run_b, group, per_parameter=per_parameter)

    def distances(self, epoch: int, group: str | Sequence[str] = "all", *,
                  runs: Sequence[str] | None = None) -> xr.DataArray:
        """The distance between every two runs at `epoch` (see `geostore.store.comparison.distances`)."""
        from geostore.store.comparison import distances

        return distances(self, epoch, group, runs=runs)

    def describe(self) -> str:
        """One line per run: epochs and flatness."""
        lines = [f"sweep       {self.path}  ({len(self)} runs)"]
        for name, store in self.items():
            span = f"epochs {store.epochs[0]}..{store.epochs[-1]}" if store.epochs.size else "no epochs"
            flat = (f", flatness {store.analysis_epochs('flatness').size}/{store.epochs.size}"
                    if "flatness" in store.analyses() else "")
            lines.append(f"  {name:<20} {store.epochs.size:>5} epochs ({span}){flat}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<geostore.Sweep {self.path!r}: {len(self)} runs>"


def open_store(path: str | os.PathLike | Location, run: str | None = None, *,
               storage_options: dict | None = None, families: Callable[[str], Family] | None = None) -> Store:
    """Open a geostore store read-only: the store at `path`, or run `run` of the sweep there; one-line errors
    for a missing or ambiguous run.

    `path` is a local folder or any fsspec URL (`s3://bucket/run.zarr`, `memory://...`, `file://...`);
    credentials and endpoints come from the environment and fsspec config, or `storage_options`. `families`
    (name -> Family) lets the Store rebuild its models.
    """
    location = Location.of(path, storage_options)
    if is_sweep(location):
        if run is None:
            names = Sweep(location).runs
            raise StoreError(f"{location}: a sweep of {len(names)} runs ({', '.join(names[:5])}"
                             f"{', ...' if len(names) > 5 else ''}): name one with `run`")
        try:
            return Sweep(location, families=families)[run]
        except KeyError as exc:
            raise StoreError(exc.args[0]) from None
    if run is not None:
        raise StoreError(f"{location}: not a sweep, so it has no run {run!r}")
    return Store(location, families=families)
