"""geostore: training runs as chunked, epoch-indexed Zarr stores, read lazily with Dask.

`open_store(path)` is the entry point for notebooks, the CLI and the viewer alike. Heavy
dependencies (dask, zarr, torch) load on first use, so importing geostore is instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from geostore.errors import GeostoreError, ModelMismatchError, SourceError, StoreError, UnsafeCheckpointError

if TYPE_CHECKING:
    from geostore.store.reader import Store
    from geostore.store.sweep import Sweep

__all__ = [
    "GeostoreError",
    "ModelMismatchError",
    "SourceError",
    "Store",
    "StoreError",
    "Sweep",
    "UnsafeCheckpointError",
    "open_store",
    "open_sweep",
]


def open_store(path, run: str | None = None, *, storage_options: dict | None = None) -> Store:
    """Open a geostore store read-only: a local folder or an fsspec URL (`s3://...`, `memory://...`);
    `run` names one run of a sweep. See `geostore.store.reader.Store`."""
    from geostore.store.reader import open_store as _open

    return _open(path, run, storage_options=storage_options)


def open_sweep(path, *, storage_options: dict | None = None) -> Sweep:
    """Open a sweep (many runs in one store) read-only: `.runs`, `sweep[name]` -> Store."""
    from geostore.store.sweep import Sweep

    return Sweep(path, storage_options=storage_options)


def __getattr__(name: str):
    if name == "Store":
        from geostore.store.reader import Store

        return Store
    if name == "Sweep":
        from geostore.store.sweep import Sweep

        return Sweep
    raise AttributeError(f"module 'geostore' has no attribute {name!r}")
