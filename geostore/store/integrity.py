"""Snapshot reads and damage detection: what readers see is the commit they opened, or a clear error.

Readers open a store through `CommittedStore`, a zarr store wrapper that knows the commit record it was
opened with (the root `zarr.json`). After every chunk it returns, it checks that the store still holds
that commit's data at the same positions: the commit's `generation` (root attribute `geostore.generation`,
raised by every commit that moves or removes committed values: an insertion, a recompute, a rollback that
dropped committed epochs) is unchanged, no staged insertion (`_pending/state.json`) has appeared or gone,
and the epoch axis has not shrunk. A writer stages an insertion before it rewrites any committed chunk, so
a chunk read that may hold another epoch's values is always followed by a failed check:
`StoreChangedError`, one line, never mislabelled data. Appends never change committed values, so readers
keep reading while a writer appends.

The same wrapper turns damage into errors: a chunk of a committed epoch that is missing, has the wrong
length (a truncated write), or fails its `crc32c` checksum raises `StoreDamagedError` naming the array and
the epochs. Arrays created by this version carry a `crc32c` codec and are written with every chunk stored,
fill values included, so a missing chunk there is damage; analysis arrays are exempt (a chunk never written
means "not computed yet"), and so are arrays of older stores, which skipped chunks equal to the fill value.

`check(location)` verifies a whole store (what `geostore check` runs): the root and every array's metadata,
the epoch axis, the presence and length of every chunk, and with `deep=True` every chunk's checksum and
decoding. Writers run the shallow check before they touch a store, so a damaged store is never extended.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.storage import WrapperStore

from geostore.errors import StoreError
from geostore.store import schema
from geostore.store.layout import quiet_zarr, read_root_attrs, read_root_meta
from geostore.store.location import Location

ROOT_META = "zarr.json"
STATE = "_pending/state.json"
# Keys under the store that are not zarr arrays' chunks.
_NOT_ARRAYS = {"_pending", "derived"}


class StoreChangedError(StoreError):
    """A writer moved or removed committed values after this handle opened the store: reopen it."""


class StoreDamagedError(StoreError):
    """A committed chunk or metadata document is missing, truncated or corrupt."""


def generation(root: dict) -> int:
    """The commit's generation (0 for stores written before generations existed)."""
    tag = root.get("attributes", {}).get("geostore", {})
    value = tag.get("generation", 0) if isinstance(tag, dict) else 0
    return value if isinstance(value, int) else 0


def _committed_epochs(root: dict) -> int:
    meta = root.get("consolidated_metadata", {}).get("metadata", {}).get(schema.EPOCH_DIM, {})
    shape = meta.get("shape") or [0]
    return int(shape[0])


@dataclass
class ArrayLayout:
    """What a committed array's chunks must look like (from its metadata)."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    chunk_bytes: int | None  # expected length of a stored chunk, None when compressed (unknown)
    checksum: bool
    separator: str | None  # chunk key separator, None for encodings we do not enumerate
    analysis: bool
    ndim: int = field(init=False)

    def __post_init__(self) -> None:
        self.ndim = len(self.shape)

    @property
    def every_chunk(self) -> bool:
        """Whether every chunk of the committed rows must be stored: arrays with a checksum were written by a
        geostore that stores every chunk, fill values included; analysis arrays hold unwritten (not computed)
        rows; older arrays skipped chunks equal to the fill value (all-zero biases)."""
        return self.checksum and not self.analysis

    @classmethod
    def of(cls, name: str, meta: dict) -> ArrayLayout:
        try:
            shape = tuple(int(s) for s in meta["shape"])
            chunks = tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])
            itemsize = np.dtype(_numpy_dtype(meta["data_type"])).itemsize
            codecs = [c["name"] if isinstance(c, dict) else str(c) for c in meta.get("codecs", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreDamagedError(f"array {name}: unreadable metadata ({exc})") from None
        checksum = "crc32c" in codecs
        plain = all(c in ("bytes", "crc32c") for c in codecs)
        size = math.prod(chunks) * itemsize + (4 if checksum else 0) if plain else None
        encoding = meta.get("chunk_key_encoding", {})
        separator = None
        if encoding.get("name") == "default":
            separator = (encoding.get("configuration") or {}).get("separator", "/")
        return cls(name, shape, chunks, size, checksum, separator, name in schema.ANALYSIS_ARRAYS)

    def chunk_index(self, key: str) -> tuple[int, ...] | None:
        """Grid index of a chunk key of this array (`name/c/0/1`), or None."""
        if self.separator is None:
            return None
        prefix = f"{self.name}/c{self.separator}" if self.ndim else f"{self.name}/c"
        if not key.startswith(prefix):
            return None
        try:
            index = tuple(int(p) for p in key[len(prefix):].split(self.separator))
        except ValueError:
            return None
        return index if len(index) == self.ndim else None

    def chunk_keys(self, rows: int | None = None) -> list[str]:
        """Keys of every chunk covering the first `rows` rows (all committed rows by default)."""
        if self.separator is None or self.ndim == 0:
            return []
        shape = (self.shape[0] if rows is None else rows, *self.shape[1:])
        if any(s == 0 for s in shape):
            return []
        grid = [range(math.ceil(s / c)) for s, c in zip(shape, self.chunks, strict=True)]
        keys = [()]
        for axis in grid:
            keys = [(*k, i) for k in keys for i in axis]
        return [f"{self.name}/c{self.separator}" + self.separator.join(str(i) for i in k) for k in keys]

    def rows_of(self, index: tuple[int, ...]) -> tuple[int, int]:
        start = index[0] * self.chunks[0]
        return start, min(start + self.chunks[0], self.shape[0])


def _numpy_dtype(data_type: object) -> str:
    if isinstance(data_type, dict):
        data_type = data_type.get("name")
    return {"bool": "bool"}.get(str(data_type), str(data_type))


def layouts(root: dict) -> dict[str, ArrayLayout]:
    """The committed arrays of a root `zarr.json` (its consolidated metadata), by name."""
    metadata = root.get("consolidated_metadata", {})
    metadata = metadata.get("metadata", {}) if isinstance(metadata, dict) else {}
    return {name: ArrayLayout.of(name, meta) for name, meta in metadata.items()
            if isinstance(meta, dict) and meta.get("node_type") == "array"}


def describe_rows(layout: ArrayLayout, index: tuple[int, ...], epochs: np.ndarray | None) -> str:
    start, stop = layout.rows_of(index)
    if layout.name == schema.SPLIT or not layout.ndim:
        return ""
    if epochs is not None and stop <= epochs.size and stop > start:
        return f" (epochs {int(epochs[start])}..{int(epochs[stop - 1])})"
    return f" (epoch positions {start}..{stop - 1})"


def chunk_problem(layout: ArrayLayout, index: tuple[int, ...], data: bytes | None) -> str | None:
    """What is wrong with a committed chunk's bytes (None: nothing we can see)."""
    if data is None:
        return "is missing" if layout.every_chunk else None
    if layout.chunk_bytes is not None and len(data) != layout.chunk_bytes:
        return f"has {len(data)} bytes, not {layout.chunk_bytes} (truncated or overwritten)"
    if layout.checksum and len(data) >= 4:
        import google_crc32c

        if np.uint32(google_crc32c.value(bytes(data[:-4]))).tobytes() != bytes(data[-4:]):
            return "fails its crc32c checksum (corrupt)"
    return None


class CommittedStore(WrapperStore):
    """A read-only zarr store that serves one commit's chunks or raises (see the module docstring)."""

    def __init__(self, store, *, location: str = "", root_bytes: bytes = b"{}") -> None:
        super().__init__(store)
        self.location = location
        self.root_bytes = root_bytes
        self.root = json.loads(root_bytes)
        self.generation = generation(self.root)
        self.n_epochs = _committed_epochs(self.root)
        self.pending: bool | None = None  # whether a staged insertion existed at open (set by `open`)
        self.arrays = layouts(self.root)
        self.epochs: np.ndarray | None = None  # epoch labels, for messages (set by the reader)

    def _with_store(self, store):
        other = type(self)(store, location=self.location, root_bytes=self.root_bytes)
        other.pending, other.epochs = self.pending, self.epochs
        return other

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    async def _unchanged(self) -> str | None:
        """None while the store still holds this handle's commit at the same positions, else what changed."""
        pending = await self._store.exists(STATE)
        if self.pending is not None and pending != self.pending:
            return "an insertion of earlier epochs began or finished"
        from zarr.core.buffer import default_buffer_prototype

        raw = await self._store.get(ROOT_META, default_buffer_prototype())
        if raw is None:
            return "the store was deleted"
        try:
            root = json.loads(raw.to_bytes())
        except ValueError:
            return "its commit record became unreadable"
        if generation(root) != self.generation:
            return "epochs were inserted or analyses replaced"
        if _committed_epochs(root) < self.n_epochs:
            return "committed epochs were removed"
        return None

    def _parse(self, key: str) -> tuple[ArrayLayout, tuple[int, ...]] | None:
        name = key.split("/", 1)[0]
        layout = self.arrays.get(name)
        if layout is None:
            return None
        index = layout.chunk_index(key)
        return None if index is None else (layout, index)

    async def get(self, key, prototype, byte_range=None):
        if key == ROOT_META and byte_range is None:  # the commit this handle opened, whatever came since
            return prototype.buffer.from_bytes(self.root_bytes)
        value = await self._store.get(key, prototype, byte_range)
        parsed = self._parse(key)
        if parsed is None:
            return value
        changed = await self._unchanged()
        if changed is not None:
            raise StoreChangedError(f"{self.location}: changed while this handle read it ({changed}): "
                                    "open the store again")
        layout, index = parsed
        if byte_range is None:
            problem = chunk_problem(layout, index, None if value is None else value.to_bytes())
            if problem is not None:
                raise StoreDamagedError(f"{self.location}: damaged: {layout.name} chunk {key} {problem}"
                                        f"{describe_rows(layout, index, self.epochs)}; `geostore check` lists all")
        return value

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests: Iterable) -> AsyncGenerator:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def read_root(location: Location) -> dict:
    """The root `zarr.json` parsed; StoreError when missing or unreadable."""

    return read_root_meta(location)


@dataclass
class Report:
    """What `check` found: problems (one line each) and what it looked at."""

    location: str
    problems: list[str]
    arrays: int = 0
    chunks: int = 0
    epochs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check(location: Location, *, deep: bool = False, root: dict | None = None) -> Report:
    """Verify a store: metadata of every committed array against its own `zarr.json`, the epoch axis, and
    every committed chunk's presence and length; with `deep`, every chunk's checksum and decoding too."""

    read_root_attrs(location)  # not a store, an unknown format or a bad version: StoreError
    root = read_root(location) if root is None else root
    report = Report(str(location), [])
    try:
        arrays = layouts(root)
    except StoreDamagedError as exc:
        report.problems.append(f"{location}: damaged: {exc}")
        return report
    if schema.EPOCH_DIM not in arrays:
        report.problems.append(f"{location}: damaged: the commit record lists no epoch array")
        return report
    n = arrays[schema.EPOCH_DIM].shape[0]
    report.arrays, report.epochs = len(arrays), n
    for name, layout in sorted(arrays.items()):
        problem = _array_meta_problem(location, name, layout, n)
        if problem:
            report.problems.append(f"{location}: damaged: {name}/zarr.json {problem}")
    sizes = location.file_sizes()
    epochs = None
    for name, layout in sorted(arrays.items(), key=lambda item: item[0] != schema.EPOCH_DIM):  # the axis first
        for key in layout.chunk_keys():
            report.chunks += 1
            index = layout.chunk_index(key)
            size = sizes.get(key)
            if size is None:
                if layout.every_chunk:
                    report.problems.append(f"{location}: damaged: {name} chunk {key} is missing"
                                           f"{describe_rows(layout, index, epochs)}")
                continue
            if layout.chunk_bytes is not None and size != layout.chunk_bytes:
                report.problems.append(f"{location}: damaged: {name} chunk {key} has {size} bytes, not "
                                       f"{layout.chunk_bytes} (truncated or overwritten)"
                                       f"{describe_rows(layout, index, epochs)}")
                continue
            if deep:
                problem = chunk_problem(layout, index, location.read_bytes(key))
                if problem:
                    report.problems.append(f"{location}: damaged: {name} chunk {key} {problem}"
                                           f"{describe_rows(layout, index, epochs)}")
        if name == schema.EPOCH_DIM and not report.problems:
            epochs = _epoch_axis(location, report)
    if deep and not report.problems:
        _decode_all(location, report)
    return report


def _array_meta_problem(location: Location, name: str, layout: ArrayLayout, n: int) -> str | None:
    """Whether an array's own `zarr.json` (what writers use) agrees with its committed entry."""
    try:
        meta = json.loads(location.read_text(f"{name}/{ROOT_META}"))
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as exc:
        return f"is unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return "is not an array's metadata"
    try:
        own = ArrayLayout.of(name, meta)
    except StoreDamagedError:
        return "is unreadable (fields missing)"
    if own.chunks != layout.chunks or own.chunk_bytes != layout.chunk_bytes or own.shape[1:] != layout.shape[1:]:
        return "disagrees with the commit record (chunks, dtype, codecs or shape)"
    if own.ndim and layout.ndim and layout.name != schema.SPLIT and own.shape[0] < layout.shape[0]:
        return f"holds {own.shape[0]} epochs, fewer than the {layout.shape[0]} committed"
    return None


def _epoch_axis(location: Location, report: Report) -> np.ndarray | None:
    try:
        epochs = np.asarray(open_committed(location)[schema.EPOCH_DIM][:], dtype=np.int64)
    except StoreError as exc:
        report.problems.append(str(exc))
        return None
    if epochs.size and np.any(np.diff(epochs) <= 0):
        report.problems.append(f"{location}: damaged: the epoch axis is not strictly increasing")
    return epochs


def _decode_all(location: Location, report: Report) -> None:
    """Read every committed array whole through the checked store (decodes every chunk)."""
    group = open_committed(location)
    for name in sorted(layouts(read_root(location))):
        try:
            array = group[name]
            step = max(1, array.chunks[0]) if array.ndim else 1
            for start in range(0, array.shape[0] if array.ndim else 1, step):
                array[start:start + step] if array.ndim else array[...]
        except StoreError as exc:
            report.problems.append(str(exc))
        except (ValueError, OSError) as exc:
            report.problems.append(f"{location}: damaged: {name} cannot be decoded ({exc})")


def verify(location: Location, *, deep: bool = False) -> Report:
    """`check`, raising StoreDamagedError (the first problem, and how many more) when anything is wrong."""
    report = check(location, deep=deep)
    if not report.ok:
        more = len(report.problems) - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''}: run `geostore check {location}`)" if more else ""
        raise StoreDamagedError(f"{report.problems[0]}{extra}")
    return report


def open_committed(location: Location) -> zarr.Group:
    """The store as readers see it: read-only, through the consolidated metadata of one commit.

    The group's store is an `CommittedStore` (`group.store`): it serves the commit read here
    whatever is committed later, and raises instead of returning chunks that a later insertion moved, or
    that are missing or truncated.
    """
    try:
        raw = location.read_bytes(ROOT_META)
        json.loads(raw)
    except FileNotFoundError:
        raise StoreError(f"{location}: not a geostore store (no zarr.json)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{location}: not a geostore store (unreadable zarr.json: {exc})") from None
    store = CommittedStore(location.zarr_store(read_only=True), location=str(location), root_bytes=raw)
    store.pending = location.exists(STATE)
    try:
        with quiet_zarr():
            return zarr.open_group(store, mode="r", use_consolidated=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"{location}: damaged commit record (zarr.json: {exc})") from None
