"""Record a training run into a store while it trains: one `Recorder.record(epoch, model, metrics)` call per
checkpoint, from a training loop of your own or `geostore train --store` (the demo family's trainer records
through it).

Each `record` is one writer session of the ingest's writer (store/writer.py): it takes the store's lock, appends
the epoch with its metrics, commits (the root `zarr.json` is replaced once per recorded epoch) and lets the lock
go. So:

- a recorded epoch is visible to every reader (`open_store`, `geoview --follow`) when `record` returns, and
  readers never see part of one (the commit record lists it only once all its arrays are written);
- a crash at any moment (an exception in the training loop, Ctrl-C, a SIGKILL) leaves exactly the epochs
  recorded before it: a `record` that fails rolls back only itself, and leaving the `with` block on an exception
  keeps the committed epochs (unlike `ingest`, which undoes the whole command);
- between records the lock is free, so `geostore flatness STORE --follow` adds analyses while training runs (a
  `record` waits for a flatness pass in progress, one pass at most) and readers, which never take the lock, never
  wait at all.

The store is created (or checked to hold the same model and run) when the `Recorder` is made, before the first
epoch is trained.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import GeostoreError
from geostore.ingestion import buffer_test
from geostore.sources.state_dict import arrays, in_model_layout, unwrap
from geostore.store.location import Location
from geostore.store.schema import METRICS, OPTIONAL_METRICS
from geostore.store.writer import StoreWriter

if TYPE_CHECKING:
    import torch

    from geostore.family.base import Model
    from geostore.sources.base import RunSource


class Recorder:
    """Writes each recorded checkpoint of a training run into `store` (created when missing) as it trains.

    `family` (a registry name, see `geostore families`) and `config` (that family's model config) give the model;
    `task` what to record of the task (seeds, hyperparameters: JSON-able), `train_indices` the training examples
    (recorded as the family's train split), `metrics` the optional metrics (`schema.OPTIONAL_METRICS`, e.g.
    `learning_rate`) a new store keeps besides the train/test loss and accuracy. `source` is what `Store.sources`
    lists for these epochs (default: the running script). Usable as a context manager; see the module docstring
    for what is visible when, and what a crash leaves.
    """

    def __init__(
        self,
        store: str | os.PathLike | Location,
        *,
        family: str,
        config: Mapping[str, object],
        task: Mapping[str, object] | None = None,
        train_indices: Sequence[int] | np.ndarray | None = None,
        metrics: Sequence[str] = (),
        source: Mapping[str, str] | None = None,
        storage_options: dict | None = None,
        lock_timeout: float | None = None,
    ) -> None:
        from geostore.family.registry import get

        unknown = sorted(set(metrics) - set(OPTIONAL_METRICS))
        if unknown:
            raise GeostoreError(f"`metrics` {', '.join(map(repr, unknown))}: choose from {', '.join(OPTIONAL_METRICS)}"
                                f" (the store always keeps {', '.join(METRICS)})")
        chosen = get(family)
        model = chosen.model(dict(config))
        split = None if train_indices is None else chosen.split(model, np.asarray(train_indices, dtype=np.int64))
        self._open(store, model, {"family": family, **(task or {})}, split, metrics,
                   dict(source) if source is not None else {"kind": "recorder",
                                                            "path": str(Path(sys.argv[0] or "python").resolve())},
                   storage_options=storage_options, lock_timeout=lock_timeout)

    @classmethod
    def of_run(cls, run: RunSource, store: str | os.PathLike | Location, *, storage_options: dict | None = None,
               lock_timeout: float | None = None) -> Recorder:
        """A recorder of the epochs of `run` (a checkpoint source as `geostore.sources.open_source` reads it): the
        model, task, split, metrics and source record are those an ingest of `run` writes."""
        recorder = cls.__new__(cls)
        recorder._open(store, run.model, run.task, run.split(), tuple(run.metrics),
                       {"kind": run.kind, "path": str(Path(run.path).resolve())}, index_unit=run.index_unit,
                       storage_options=storage_options, lock_timeout=lock_timeout)
        return recorder

    def _open(self, store: str | os.PathLike | Location, model: Model, task: Mapping[str, object],
              split: tuple[np.ndarray, Sequence[str]] | None, metrics: Sequence[str], source: Mapping[str, str], *,
              index_unit: str = "epoch", storage_options: dict | None, lock_timeout: float | None) -> None:
        """Create the store, or check that it holds the same model and run, before anything is trained."""
        self.model = model
        self.location = Location.of(store, storage_options)
        self._task, self._split, self._source = dict(task), split, dict(source)
        self._metrics = tuple(name for name in metrics if name in OPTIONAL_METRICS)
        self._index_unit = index_unit
        self._lock_timeout = lock_timeout
        self._buffers = buffer_test(model)
        with self._writer() as writer:
            writer.record_source(self._source)
            writer.commit_attrs()
            self._epochs = writer.epochs

    @property
    def epochs(self) -> np.ndarray:
        """The epochs the store holds (those recorded, and any it held before)."""
        return self._epochs.copy()

    def record(self, epoch: int, model: torch.nn.Module | Mapping[str, object],
               metrics: Mapping[str, float] | None = None) -> None:
        """Append `epoch` (after every stored one) with the weights of `model` (a torch module of the store's family,
        or its state dict) and its `metrics` (`train_loss`, `test_accuracy`, ...; those left out are NaN), and
        commit it: visible to readers when this returns. A failure leaves the store as it was before the call."""
        origin = f"{self.location}@{epoch}"
        given = model.state_dict() if hasattr(model, "state_dict") else model
        state = in_model_layout(lambda: arrays(unwrap(given, origin), origin), self.model, origin)()
        params = self.model.table.stored(state, origin, ignore=self._buffers)
        unknown = sorted(set(metrics or {}) - {*METRICS, *self._metrics})
        if unknown:
            raise GeostoreError(f"`metrics` {', '.join(map(repr, unknown))}: this store keeps "
                                f"{', '.join((*METRICS, *self._metrics))}")
        rows = {name: np.array([value], dtype=np.float64) for name, value in (metrics or {}).items()}
        with self._writer() as writer:
            writer.append([int(epoch)], {name: value[None] for name, value in params.items()}, rows)
            self._epochs = writer.epochs

    def _writer(self) -> StoreWriter:
        return StoreWriter.open(self.location, model=self.model, task=self._task, split=self._split,
                                metrics=self._metrics, index_unit=self._index_unit, lock_timeout=self._lock_timeout)

    def close(self) -> None:
        """Nothing to release: the lock is held only inside `record`. Kept for the context-manager protocol."""

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # an exception in the training loop keeps every committed epoch
