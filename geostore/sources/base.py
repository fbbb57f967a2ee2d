"""What every checkpoint source yields: a run's model (from its family), task, metrics and lazy checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geostore.family.base import Family, Model


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run; `load()` reads it and returns its state dict (key -> numpy array).

    The family's parameter table turns a state dict into stored arrays (`ParameterTable.stored`).
    `load()` raises `SourceError` naming `origin` when the file is missing, truncated, corrupt or unsafe.
    """

    epoch: int
    origin: str
    load: Callable[[], dict[str, np.ndarray]]


@dataclass
class RunSource:
    """A training run found at `path`, in one of the formats geostore reads.

    - `kind`: `geostore-run`, `state-dict-dir`, `arena-bundle` or `miscope`.
    - `family`, `model`: the model family that recognised the run and its architecture (`Model`).
    - `task`: what the source records of the task: `family` and, where known, `p`, `train_fraction`,
      `seed`, `data_seed`, ... (JSON-serialisable; no large arrays).
    - `checkpoints`: sorted by strictly increasing epoch.
    - `metrics`: metric name (`schema.METRICS`) -> {epoch: value}, only what the source records.
    - `train_indices`: indices of the training examples (modular addition: flat grid indices), when recorded.
    - `index_unit`: what a checkpoint's index counts: `epoch`, or `step` (optimiser steps: transformers runs).
    """

    kind: str
    path: Path
    family: Family
    model: Model
    task: dict[str, Any]
    checkpoints: list[Checkpoint]
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    train_indices: np.ndarray | None = None
    index_unit: str = "epoch"

    @property
    def config(self) -> dict[str, Any]:
        """The model config the family records."""
        return self.model.config

    def split(self) -> tuple[np.ndarray, tuple[str, ...]] | None:
        """The train split as the family stores it (a boolean array and its dimension names), or None."""
        if self.train_indices is None:
            return None
        return self.family.split(self.model, self.train_indices)
