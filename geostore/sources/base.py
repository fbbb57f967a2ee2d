"""What every checkpoint source yields: a run's model config, task, metrics and lazy checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run; `load()` reads it and returns HookedTransformer-layout parameters.

    `load()` returns float32 numpy arrays keyed by short name (`W_E`, ..., `b_U`: every name in
    `geostore.store.schema.PARAMETERS`), buffers dropped. It raises `SourceError` naming `origin`
    when the file is missing, truncated, corrupt, unsafe, or holds other names or shapes.
    """

    epoch: int
    origin: str
    load: Callable[[], dict[str, np.ndarray]]


@dataclass
class RunSource:
    """A training run found at `path`, in one of the formats geostore reads.

    - `kind`: `geostore-run`, `state-dict-dir`, `arena-bundle` or `miscope`.
    - `config`: the model config, keys `geostore.store.schema.CONFIG_FIELDS`.
    - `task`: what the source records of the task: `family`, `p`, and where known `train_fraction`,
      `seed`, `data_seed`, ... (JSON-serialisable; no large arrays).
    - `checkpoints`: sorted by strictly increasing epoch.
    - `metrics`: metric name (`schema.METRICS`) -> {epoch: value}, only what the source records.
    - `train_indices`: flat grid indices `a*p + b` of the training set, when recorded.
    """

    kind: str
    path: Path
    config: dict[str, object]
    task: dict[str, object]
    checkpoints: list[Checkpoint]
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    train_indices: np.ndarray | None = None
