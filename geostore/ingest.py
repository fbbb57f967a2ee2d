"""Ingest: read a checkpoint source and write its epochs into a store, incrementally.

Only epochs the store lacks are read. Epochs after the stored ones are appended in batches aligned
to the store's chunks (each chunk written once) and committed batch by batch, so a killed ingest
keeps its finished batches; epochs that sort before stored ones are read first and inserted last.
Any failure (bad input, an interrupt, running out of memory) rolls the store back to what it held before
this ingest began. Flatness (on by
default) and any curvature analyses asked for are then computed from the store for every epoch that
lacks them, the same code path as `geostore flatness`, so values never depend on how the epochs arrived.
A sweep (`ingest_sweep`) is the same ingest once per run, into `runs/<name>` of one store.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from geostore.errors import GeostoreError, GeostoreWarning
from geostore.landscape import (
    DEFAULT_FLATNESS,
    FlatnessSettings,
    check_memory,
    check_supported,
    fill_missing,
    progress_bar,
)
from geostore.sources import Checkpoint, RunSource, open_source
from geostore.store import schema
from geostore.store.location import Location
from geostore.store.sweep import check_run_name, create_sweep, is_sweep, run_location
from geostore.store.writer import StoreWriter

if TYPE_CHECKING:
    from distributed import Client


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did: the source format, epochs added, epochs already stored, total stored,
    and the epochs whose flatness it computed."""

    kind: str
    added: int
    skipped: int
    total: int
    flatness_computed: int = 0


def ingest(
    source: str | Path,
    store: str | os.PathLike | Location,
    *,
    run: str | None = None,
    flatness: FlatnessSettings | None = DEFAULT_FLATNESS,
    recompute_flatness: bool = False,
    progress: bool = True,
    client: Client | None = None,
) -> IngestReport:
    """Write every checkpoint of `source` that `store` lacks into `store` (created when missing).

    With `flatness` settings (the default), every stored epoch ends up with its flatness and the curvature
    analyses the settings ask for; a store holding any of them with other settings is refused unless
    `recompute_flatness`. `None` skips them all. With a `dask.distributed` client, they run on its
    workers (one task per epoch). With `run`, `store` is a sweep (created when missing) and the run goes
    to its `runs/<run>`.
    """
    store = Location.of(store)
    if run is not None:
        check_run_name(run)
    elif is_sweep(store):
        raise GeostoreError(f"{store}: is a sweep: name the run to ingest into (run=NAME, --run NAME)")
    checkpoints = open_source(source)
    if flatness is not None:
        check_supported(checkpoints.config, " (ingest with --no-flatness to store the weights alone)")
        check_memory(flatness, checkpoints.config)
    if run is not None:
        create_sweep(store)
        store = run_location(store, run)
    writer = StoreWriter.open(store, config=checkpoints.config, task=checkpoints.task,
                              train_indices=checkpoints.train_indices)
    with writer:  # any exception (bad input, MemoryError, Ctrl-C, a bug) rolls back, then the lock goes back
        if flatness is not None:
            writer.enable_analyses(flatness.analyses(), recompute=recompute_flatness)
        report = _write_new_epochs(checkpoints, writer, progress)
        if flatness is not None:
            computed = fill_missing(writer, flatness, progress=progress, client=client).computed
            report = dataclasses.replace(report, flatness_computed=computed)
    return report


def sweep_run_names(sources: list[str | os.PathLike]) -> dict[str, str | os.PathLike]:
    """Run names for sources: each directory's name (a bundle file's stem); an error when two collide."""
    names: dict[str, str | os.PathLike] = {}
    for source in sources:
        path = Path(source)
        name = check_run_name(path.stem if path.is_file() else path.resolve().name)
        if name in names:
            raise GeostoreError(f"{source}: another source is also named {name!r}: rename one directory, "
                                "or ingest them one at a time with --run NAME")
        names[name] = source
    return names


def ingest_sweep(
    sources: Mapping[str, str | os.PathLike],
    store: str | os.PathLike | Location,
    *,
    flatness: FlatnessSettings | Mapping[str, FlatnessSettings | None] | None = DEFAULT_FLATNESS,
    recompute_flatness: bool = False,
    progress: bool = True,
    client: Client | None = None,
) -> dict[str, IngestReport]:
    """Ingest every run `{name: source}` into `runs/<name>` of the sweep at `store` (created when missing).

    `flatness` is one setting for every run, or one per run name. Every source is opened (and checked)
    before anything is written; runs are then ingested one after another, each exactly as `ingest` does,
    under a progress bar over the whole sweep.
    """
    per_run = flatness if isinstance(flatness, Mapping) else dict.fromkeys(sources, flatness)
    for name, source in sources.items():
        check_run_name(name)
        if per_run[name] is not None:
            check_supported(open_source(source).config, " (ingest with --no-flatness to store the weights alone)")
        else:
            open_source(source)
    reports = {}
    with tqdm(total=len(sources), unit="run", desc="sweep", disable=None if progress else True,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for name, source in sources.items():
            bar.set_postfix_str(name, refresh=True)
            reports[name] = ingest(source, store, run=name, flatness=per_run[name],
                                   recompute_flatness=recompute_flatness, progress=progress, client=client)
            bar.update(1)
    return reports


def _write_new_epochs(run: RunSource, writer: StoreWriter, progress: bool) -> IngestReport:
    stored = writer.epochs
    have = set(stored.tolist())
    new = [c for c in run.checkpoints if c.epoch not in have]
    last = int(stored[-1]) if stored.size else None
    early = [c for c in new if last is not None and c.epoch < last]
    late = [c for c in new if last is None or c.epoch > last]
    writer.record_source({"kind": run.kind, "path": str(Path(run.path).resolve())})

    with progress_bar(len(new), "ingest", progress) as bar:
        notes: dict[str, list[int]] = {}
        early_batch = _load(early, run, bar, notes)  # read (and validated) before anything is written
        n = stored.size
        chunk = writer.chunk_epochs
        start = 0
        while start < len(late):
            size = chunk - (n + start) % chunk  # fill up to the next chunk boundary
            batch = late[start:start + size]
            writer.append(*_load(batch, run, bar, notes))
            start += size
        if early:
            writer.insert(*early_batch)
    _report(run, notes)
    if not new:
        writer.commit_attrs()
    return IngestReport(kind=run.kind, added=len(new), skipped=len(run.checkpoints) - len(new),
                        total=int(writer.epochs.size))


def _epochs_text(epochs: list[int]) -> str:
    shown = ", ".join(str(e) for e in epochs[:5])
    more = ", ..." if len(epochs) > 5 else ""
    return f"epoch {shown}" if len(epochs) == 1 else f"{len(epochs)} epochs ({shown}{more})"


def _report(run: RunSource, notes: Mapping[str, list[int]]) -> None:
    """One warning line per kind of note `_load` collected over a whole ingest."""
    if notes.get("rounded"):
        warnings.warn(GeostoreWarning(f"{run.path}: {_epochs_text(sorted(set(notes['rounded'])))} hold float64 "
                                      "weights, stored as float32 (relative rounding up to 6e-8 per value)"),
                      stacklevel=3)
    if notes.get("nonfinite"):
        warnings.warn(GeostoreWarning(f"{run.path}: {_epochs_text(sorted(notes['nonfinite']))} hold NaN or infinite "
                                      "weights: stored as they are; flatness and curvature skip them"), stacklevel=3)


def _load(
    checkpoints: list[Checkpoint], run: RunSource, bar: tqdm, notes: dict[str, list[int]]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Load checkpoints into stacked `(k, *shape)` arrays plus the source's metrics for them."""
    epochs = np.array([c.epoch for c in checkpoints], dtype=np.int64)
    params = {name: [] for name in schema.PARAMETERS}
    rounded, nonfinite = notes.setdefault("rounded", []), notes.setdefault("nonfinite", [])
    for checkpoint in checkpoints:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GeostoreWarning)
            loaded = checkpoint.load()
        for warning in caught:
            if issubclass(warning.category, GeostoreWarning):
                rounded.append(checkpoint.epoch)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        for name in schema.PARAMETERS:
            params[name].append(loaded[name])
        if not all(np.isfinite(loaded[name]).all() for name in schema.PARAMETERS):
            nonfinite.append(checkpoint.epoch)
        bar.update(1)

    stacked = {name: np.stack(values) if values else np.empty((0,)) for name, values in params.items()}
    metrics = {
        name: np.array([values.get(int(e), np.nan) for e in epochs], dtype=np.float64)
        for name, values in run.metrics.items()
    }
    return epochs, stacked, metrics
