"""Low-level Zarr facts shared by the writer and the reader: how a store is opened and committed.

A geostore store is a Zarr v3 group whose **consolidated metadata is the commit record**: the root
`zarr.json` (written atomically) lists every array with its committed shape. Writers grow arrays and
write chunks first, then rewrite the root `zarr.json`; readers that use the consolidated metadata
(geostore, `xarray.open_zarr`) never see epochs whose arrays are not all written. An insertion in
the middle of the epoch axis first stages the rewritten tail under `_pending/` (see writer.py).
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import zarr

from geostore.errors import StoreError
from geostore.store import schema

PENDING = "_pending"
# Suffix of files being written before their atomic rename (zarr's LocalStore uses it too): a killed
# writer can leave them behind; the next writer removes them.
PARTIAL_SUFFIX = ".partial"
ROOT_META = "zarr.json"

# No compressor: trained float32 weights shrink only ~7% under Blosc lz4 + shuffle, which halves the
# write speed of a zarr array here (615 vs 1044 MB/s) and slows whole-trajectory reads (1.2 vs 1.4 GB/s).
COMPRESSORS = None

# Target bytes of the largest parameter per chunk: a few MB keeps file counts low for full reads
# while an append rewrites little.
TARGET_CHUNK_BYTES = 4 * 2**20


@contextmanager
def quiet_zarr():
    """Silence zarr's notes on consolidated metadata and on our non-Zarr `_pending` folder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"zarr\..*")
        yield


def chunk_epochs_for(largest_param_bytes: int) -> int:
    """Epochs per chunk: a power of two in [8, 1024] giving ~TARGET_CHUNK_BYTES for the largest array."""
    n = max(1, TARGET_CHUNK_BYTES // max(1, largest_param_bytes))
    c = 1 << (n.bit_length() - 1)
    return min(1024, max(8, c))


def read_root_attrs(path: Path) -> dict:
    """The root group's attributes read straight from `zarr.json`; StoreError if not a geostore store."""
    meta_path = path / ROOT_META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: not a geostore store (no zarr.json)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not a geostore store (unreadable zarr.json: {exc})") from None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    tag = attrs.get("geostore", {})
    if meta.get("node_type") != "group" or tag.get("format") != schema.FORMAT_NAME:
        raise StoreError(f"{path}: not a geostore store (a Zarr node without geostore attributes)")
    if int(tag.get("version", 0)) > schema.FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {tag.get('version')} is newer than this geostore "
            f"({schema.FORMAT_VERSION}): upgrade geostore"
        )
    return attrs


def open_committed(path: Path) -> zarr.Group:
    """The store as readers see it: read-only, through the consolidated metadata."""
    with quiet_zarr():
        return zarr.open_group(str(path), mode="r", use_consolidated=True)


def pending_state(path: Path) -> dict | None:
    """The staged insertion's attributes (`start`, `complete`, ...), or None when none is staged."""
    meta = path / PENDING / "state.json"
    if not (path / PENDING).exists():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return {"complete": False}
