"""geostore: training runs as chunked, epoch-indexed Zarr stores, read lazily with Dask.

`open_store(path)` is the entry point for notebooks, the CLI and the viewer alike; `ingest(sources, store)` and
`compute(store, analyses)` do what `geostore ingest` and `geostore flatness` do, `loss_plane(store, group)` what
`geostore plane` does. Heavy dependencies (dask, zarr,
torch) load on first use, so importing geostore is instant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from geostore.api import compute, ingest, loss_plane
from geostore.errors import GeostoreError, ModelMismatchError, SourceError, StoreError, UnsafeCheckpointError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from geostore.recorder import Recorder
    from geostore.store.reader import Store
    from geostore.store.sweep import Sweep

__all__ = [
    "GeostoreError",
    "ModelMismatchError",
    "Recorder",
    "SourceError",
    "Store",
    "StoreError",
    "Sweep",
    "UnsafeCheckpointError",
    "compute",
    "compute_landscape_flatness",
    "ingest",
    "loss_plane",
    "open_store",
    "open_sweep",
]


def open_store(path, run: str | None = None, *, storage_options: dict | None = None) -> Store:
    """Open a geostore store read-only: a local folder or an fsspec URL (`s3://...`, `memory://...`);
    `run` names one run of a sweep. See `geostore.store.reader.Store`."""
    from geostore.family.registry import get
    from geostore.store.sweep import open_store as _open

    return _open(path, run, storage_options=storage_options, families=get)


def open_sweep(path, *, storage_options: dict | None = None) -> Sweep:
    """Open a sweep (many runs in one store) read-only: `.runs`, `sweep[name]` -> Store."""
    from geostore.family.registry import get
    from geostore.store.sweep import Sweep

    return Sweep(path, storage_options=storage_options, families=get)


def compute_landscape_flatness(
    model: torch.nn.Module,
    probe: object,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    n_directions: int = 50,
    epsilon: float = 0.1,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """REQ_031's flatness of one model: the loss change `loss_fn(model, probe)` along `n_directions` seeded random
    unit directions over its trainable parameters, moved by `epsilon`; the weights are restored afterwards.

    Returns `baseline_loss` and `epsilon` (0-d float64 arrays) and `delta_losses` `(n_directions,)` float64.
    See `geostore.analysis.flatness.compute_landscape_flatness` (which also takes the trainable keys).
    """
    from geostore.analysis.flatness import compute_landscape_flatness as _flatness

    return _flatness(model, probe, loss_fn, n_directions, epsilon, seed)


def __getattr__(name: str):
    if name == "Store":
        from geostore.store.reader import Store

        return Store
    if name == "Recorder":
        from geostore.recorder import Recorder

        return Recorder
    if name == "Sweep":
        from geostore.store.sweep import Sweep

        return Sweep
    raise AttributeError(f"module 'geostore' has no attribute {name!r}")
