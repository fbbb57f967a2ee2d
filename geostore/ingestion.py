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
from collections.abc import Callable, Mapping
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
    fill_missing,
    needs_probe,
    probe_missing_message,
    progress_bar,
)
from geostore.sources import Checkpoint, RunSource, open_source
from geostore.sources.probe import load_probe
from geostore.store.location import Location
from geostore.store.sweep import check_run_name, create_sweep, is_sweep, run_location
from geostore.store.writer import StoreWriter

if TYPE_CHECKING:
    from distributed import Client

    from geostore.family.base import Model


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did: the source format, epochs added, epochs already stored, total stored,
    the epochs whose landscape analyses it computed and those analyses, a note for the user, and what the
    store's index counts (`epoch`, or `step` for transformers runs)."""

    kind: str
    added: int
    skipped: int
    total: int
    flatness_computed: int = 0
    note: str | None = None
    analyses: tuple[str, ...] = ()
    unit: str = "epoch"


def ingest(
    source: str | Path,
    store: str | os.PathLike | Location,
    *,
    run: str | None = None,
    family: str | None = None,
    probe: np.ndarray | str | os.PathLike | None = None,
    flatness: FlatnessSettings | None = DEFAULT_FLATNESS,
    recompute_flatness: bool = False,
    progress: bool = True,
    client: Client | None = None,
) -> IngestReport:
    """Write every checkpoint of `source` that `store` lacks into `store` (created when missing).

    The run's model family is the first that recognises it, or `family` when named. With `flatness`
    settings (the default), every stored epoch ends up with its flatness and the curvature analyses the
    settings ask for; a store holding any of them with other settings is refused unless `recompute_flatness`.
    `None` skips them all, and so does a model whose loss needs a probe when neither `probe` (token ids, or a
    `.npy`/`.pt` file of them; recorded in the store) nor the store has one: the report's `note` says so.
    With a `dask.distributed` client, the analyses run on its workers (one task per epoch). With `run`,
    `store` is a sweep (created when missing) and the run goes to its `runs/<run>`.
    """
    store = Location.of(store)
    if run is not None:
        check_run_name(run)
    elif is_sweep(store):
        raise GeostoreError(f"{store}: is a sweep: name the run to ingest into with `run`")
    checkpoints = open_source(source, family)
    if probe is not None:
        probe = load_probe(probe) if isinstance(probe, str | os.PathLike) else np.asarray(probe)
        checkpoints.model.probe(probe)  # checks the token ids against the model before anything is written
    if flatness is not None:
        check_memory(flatness, checkpoints.model)
    if run is not None:
        create_sweep(store)
        store = run_location(store, run)
    writer = StoreWriter.open(store, model=checkpoints.model, task=checkpoints.task, split=checkpoints.split(),
                              probe=probe, metrics=tuple(checkpoints.metrics), index_unit=checkpoints.index_unit)
    with writer:  # any exception (bad input, MemoryError, Ctrl-C, a bug) rolls back, then the lock goes back
        note = None
        if flatness is not None and needs_probe(checkpoints.model, probe if probe is not None else writer.probe()):
            flatness, note = None, probe_missing_message(source) + "; the weights are stored"
        if flatness is not None:
            writer.enable_analyses(flatness.analyses(writer.table), recompute=recompute_flatness)
        report = dataclasses.replace(_write_new_epochs(checkpoints, writer, progress), note=note,
                                     unit=checkpoints.index_unit)
        if flatness is not None:
            filled = fill_missing(writer, flatness, progress=progress, client=client)
            report = dataclasses.replace(report, flatness_computed=filled.computed, analyses=filled.analyses)
    return report


def sweep_run_names(sources: list[str | os.PathLike]) -> dict[str, str | os.PathLike]:
    """Run names for sources: each directory's name (a bundle file's stem); an error when two collide."""
    names: dict[str, str | os.PathLike] = {}
    for source in sources:
        path = Path(source)
        name = check_run_name(path.stem if path.is_file() else path.resolve().name)
        if name in names:
            raise GeostoreError(f"{source}: another source is also named {name!r}: rename one directory, "
                                "or ingest them one at a time, each with its `run`")
        names[name] = source
    return names


def ingest_sweep(
    sources: Mapping[str, str | os.PathLike],
    store: str | os.PathLike | Location,
    *,
    family: str | None = None,
    probe: np.ndarray | str | os.PathLike | None = None,
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
        open_source(source, family)
    reports = {}
    with tqdm(total=len(sources), unit="run", desc="sweep", disable=None if progress else True,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for name, source in sources.items():
            bar.set_postfix_str(name, refresh=True)
            reports[name] = ingest(source, store, run=name, family=family, probe=probe, flatness=per_run[name],
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
        buffers = buffer_test(run.model) if new else _never
        early_batch = _load(early, run, writer, bar, notes, buffers)  # read and checked before anything is written
        n = stored.size
        chunk = writer.chunk_epochs
        start = 0
        while start < len(late):
            size = chunk - (n + start) % chunk  # fill up to the next chunk boundary
            batch = late[start:start + size]
            writer.append(*_load(batch, run, writer, bar, notes, buffers))
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
                                      "weights: stored as they are; their landscape values are NaN"), stacklevel=3)


def _load(
    checkpoints: list[Checkpoint], run: RunSource, writer: StoreWriter, bar: tqdm, notes: dict[str, list[int]],
    buffers: Callable[[str], bool],
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Load checkpoints into stacked `(k, *shape)` arrays (the store's layout) plus the source's metrics."""
    epochs = np.array([c.epoch for c in checkpoints], dtype=np.int64)
    params = {name: [] for name in writer.table.names}
    rounded, nonfinite = notes.setdefault("rounded", []), notes.setdefault("nonfinite", [])
    for checkpoint in checkpoints:
        loaded = _stored(checkpoint, writer, buffers, rounded)
        for name in writer.table.names:
            params[name].append(loaded[name])
        if not all(np.isfinite(loaded[name]).all() for name in writer.table.names):
            nonfinite.append(checkpoint.epoch)
        bar.update(1)

    # one checkpoint (a large model's chunk holds one epoch) goes on as a view: stacking would copy it
    stacked = {name: np.stack(values) if len(values) > 1 else values[0][np.newaxis] if values else np.empty((0,))
               for name, values in params.items()}
    metrics = {
        name: np.array([values.get(int(e), np.nan) for e in epochs], dtype=np.float64)
        for name, values in run.metrics.items()
    }
    return epochs, stacked, metrics


def _stored(checkpoint: Checkpoint, writer: StoreWriter, buffers: Callable[[str], bool], rounded: list[int]
            ) -> dict[str, np.ndarray]:
    """One checkpoint in the store's layout; its state dict is freed on return (only the stored arrays stay)."""
    state = dict(checkpoint.load())
    if any(np.asarray(value).dtype.itemsize > 4 and np.issubdtype(np.asarray(value).dtype, np.floating)
           for key, value in state.items() if not buffers(key)):
        rounded.append(checkpoint.epoch)
    return writer.table.stored(state, checkpoint.origin, ignore=buffers, consume=True)


def buffer_test(model: Model) -> Callable[[str], bool]:
    """Whether a state-dict key names one of the model's buffers (attention masks, ...: in checkpoints, never
    stored): the model's own `is_buffer` where it has one (no model built, no TransformerLens import), else
    the keys of a built model's buffers."""
    own = getattr(model, "is_buffer", None)
    if own is not None:
        return own
    return frozenset(key for key, _ in model.build().named_buffers()).__contains__


def _never(key: str) -> bool:
    return False
