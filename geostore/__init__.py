"""geostore: training runs as chunked, epoch-indexed Zarr stores, read lazily with Dask.

`open_store(path)` is the entry point for notebooks, the CLI and the viewer alike. Heavy
dependencies (dask, zarr, torch) load on first use, so importing geostore is instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from geostore.errors import GeostoreError, ModelMismatchError, SourceError, StoreError, UnsafeCheckpointError

if TYPE_CHECKING:
    from geostore.store.reader import Store

__all__ = [
    "GeostoreError",
    "ModelMismatchError",
    "SourceError",
    "Store",
    "StoreError",
    "UnsafeCheckpointError",
    "open_store",
]


def open_store(path, *, storage_options: dict | None = None) -> Store:
    """Open a geostore store read-only: a local folder or an fsspec URL (`s3://...`, `memory://...`);
    see `geostore.store.reader.Store`."""
    from geostore.store.reader import open_store as _open

    return _open(path, storage_options=storage_options)


def __getattr__(name: str):
    if name == "Store":
        from geostore.store.reader import Store

        return Store
    raise AttributeError(f"module 'geostore' has no attribute {name!r}")
