"""Low-level Zarr facts shared by the writer and the reader: how a store is opened and committed.

A geostore store is a Zarr v3 group whose **consolidated metadata is the commit record**: the root
`zarr.json` (written atomically) lists every array with its committed shape. Writers grow arrays and
write chunks first, then rewrite the root `zarr.json`; readers that use the consolidated metadata
(geostore, `xarray.open_zarr`) never see epochs whose arrays are not all written. An insertion in
the middle of the epoch axis first stages the rewritten tail under `_pending/` (see writer.py).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import zarr

from geostore.errors import StoreError
from geostore.store import schema
from geostore.store.location import Location

PENDING = "_pending"
ROOT_META = "zarr.json"

# No compressor: trained float32 weights shrink only ~7% under Blosc lz4 + shuffle, which halves the
# write speed of a zarr array here (615 vs 1044 MB/s) and slows whole-trajectory reads (1.2 vs 1.4 GB/s).
# A crc32c checksum per chunk (4 bytes at its end, zarr v3's `crc32c` codec): corrupt bytes are an error,
# never data. Arrays created before it have no checksum and keep working.
COMPRESSORS = (zarr.codecs.Crc32cCodec(),)

# Target bytes of the largest parameter per chunk: a few MB keeps file counts low for full reads
# while an append rewrites little.
TARGET_CHUNK_BYTES = 4 * 2**20

# The most bytes a parameter's chunk holds: a bigger model gets fewer epochs per chunk (down to one), and a
# parameter larger than this per epoch is also split along its own axes (a GPT-2 `W_E` of 154 MB into five
# chunks), so that ingest buffers little and reading one epoch reads only that epoch. Models whose largest
# parameter is at most TARGET_CHUNK_BYTES keep the layout they always had (8 or more epochs, whole arrays).
MAX_CHUNK_BYTES = 32 * 2**20


@contextmanager
def quiet_zarr():
    """Silence zarr's notes on consolidated metadata and on our non-Zarr `_pending` folder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"zarr\..*")
        yield


def chunk_epochs_for(largest_param_bytes: int, max_chunk_bytes: int | None = None) -> int:
    """Epochs per chunk: a power of two in [8, 1024] giving ~TARGET_CHUNK_BYTES for the largest array, or, where
    that many epochs of it exceed `max_chunk_bytes` (default MAX_CHUNK_BYTES), the most that fit (a power of
    two, at least 1)."""
    largest = max(1, largest_param_bytes)
    limit = MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    n = max(1, TARGET_CHUNK_BYTES // largest)
    c = min(1024, max(8, 1 << (n.bit_length() - 1)))
    if c * largest <= limit:
        return c
    fits = max(1, limit // largest)
    return 1 << (fits.bit_length() - 1)


def chunk_shape(shape: Sequence[int], epochs: int, itemsize: int, max_chunk_bytes: int | None = None
                ) -> tuple[int, ...]:
    """The chunk `(epochs, *inner)` of an array with per-epoch `shape`: whole per-epoch arrays, or, where
    `epochs` of them exceed `max_chunk_bytes` (default MAX_CHUNK_BYTES), split evenly along their leading
    axes (whole trailing axes, so a chunk is one contiguous run of each epoch's values)."""
    limit = MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    inner = [int(s) for s in shape]
    for axis, size in enumerate(inner):
        step = epochs * itemsize * math.prod(inner[axis + 1:])  # bytes of one index along this axis
        if step * size <= limit:
            break
        most = max(1, limit // step)  # indices per chunk; then as even as that many chunks allow
        inner[axis] = -(-size // -(-size // most))
        if most > 1 or step <= limit:
            break
    return (epochs, *inner)


def read_root_meta(location: Location) -> dict:
    """The root `zarr.json` of a location as a dict; StoreError when it is missing or unreadable."""
    try:
        meta = json.loads(location.read_text(ROOT_META))
    except FileNotFoundError:
        raise StoreError(f"{location}: not a geostore store (no zarr.json)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{location}: not a geostore store (unreadable zarr.json: {exc})") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{location}: not a geostore store (zarr.json is not a Zarr node)")
    return meta


def read_root_attrs(location: Location) -> dict:
    """The root group's attributes read straight from `zarr.json`; StoreError if not a geostore store."""
    meta = read_root_meta(location)
    attrs = meta.get("attributes", {})
    tag = attrs.get("geostore", {}) if isinstance(attrs, dict) else None
    if meta.get("node_type") != "group" or not isinstance(tag, dict) or tag.get("format") != schema.FORMAT_NAME:
        raise StoreError(f"{location}: not a geostore store (a Zarr node without geostore attributes)")
    version = tag.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise StoreError(f"{location}: damaged zarr.json (format version {version!r} is not an integer)")
    if version > schema.FORMAT_VERSION:
        raise StoreError(
            f"{location}: store format version {tag.get('version')} is newer than this geostore "
            f"({schema.FORMAT_VERSION}): upgrade geostore"
        )
    return attrs


def pending_state(location: Location) -> dict | None:
    """The staged insertion's attributes (`start`, `complete`, ...), or None when none is staged."""
    if not location.exists(PENDING):
        return None
    try:
        return json.loads(location.read_text(f"{PENDING}/state.json"))
    except (OSError, ValueError):
        return {"complete": False}


def incomplete_rows(analysis: str, read: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> np.ndarray:
    """Per stored epoch, whether `analysis` is not complete there: its done flag is unset, or (a store written
    before done flags) its first array's row holds a NaN. `read(array)` gives an array's committed rows."""
    done = schema.DONE_ARRAYS[analysis]
    if has(done):
        return ~np.asarray(read(done), dtype=bool)
    missing = np.isnan(np.asarray(read(schema.ANALYSES[analysis][0])))
    return missing.reshape(missing.shape[0], -1).any(axis=1)
