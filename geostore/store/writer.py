"""Crash-safe, incremental writes into a geostore store.

The commit protocol (see layout.py): arrays are grown and their chunks written first; the root
`zarr.json`, whose consolidated metadata lists every array with its committed shape, is then
replaced atomically. Until that rename, readers see the previous epochs only, with unchanged data:
appended chunks lie beyond the committed shape, and a rewritten edge chunk holds the same values
for the committed epochs. An epoch inserted before stored ones shifts the stored tail, so the
rewritten tail is first staged under `_pending/` with a `state.json` written last; a writer that
finds a complete stage replays it (redo), an incomplete one is discarded. A killed ingest therefore
leaves a store that opens with whole epochs only, and re-running it completes the same store.

One writer at a time: a writer holds the store's lock (lock.py) from `open` until `close`, so recovery
only ever meets a dead writer's leftovers, a store is created by exactly one process, and every commit
starts from the committed state it read under the lock (checked again before each commit). A commit that
moves or removes committed values (an insertion, a recompute) raises the root's `geostore.generation`,
and the stage of an insertion is written before any committed chunk is rewritten, which is what lets
readers detect that their snapshot went away (integrity.py). Writers refuse a damaged store.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from geostore.errors import ModelMismatchError, StoreError
from geostore.family.base import Model, ParameterTable
from geostore.store import integrity, layout, lock, schema
from geostore.store.location import LOCK_KEY, PARTIAL_SUFFIX, Location

# Where a recompute keeps the values it replaces until its writer closes (a rollback puts them back).
REPLACED = "_replaced"

# Arrays written at once: zarr's per-call overhead (metadata, event-loop round trips) overlaps.
WRITE_THREADS = 8
# Bytes of values being encoded and written at once (zarr holds copies of each chunk in flight): where arrays are
# large, fewer are written at once and each with fewer concurrent chunks (a GPT-2-sized checkpoint: one array at a
# time, two of its 30 MB chunks), which the disk, not zarr's overhead, paces anyway.
WRITE_BUFFER_BYTES = 64 * 2**20


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=True).encode()


class StoreWriter:
    """The one writer of a store: create or open, add epochs, commit each batch atomically.

    Use `StoreWriter.open(path, model=..., task=...)`; it refuses a path that is not a geostore
    store and a store of another model before writing anything, and finishes or discards the work
    of a writer that was killed. `path` is a local folder or an fsspec URL (see location.py). Epochs
    are written in the store's own layout (`table`: format-1 stores keep theirs).
    """

    def __init__(self, location: Location, attrs: dict, *, created: bool, lock_key: str | None = None) -> None:
        self.location = location
        self.path = str(location)  # for messages: the folder or URL as given
        self.attrs = attrs
        self.created = created
        self.table: ParameterTable = schema.table_of(attrs)
        self._arrays: dict[str, zarr.Array] = {}
        self._done: dict[str, bool] = {}
        self._replaced: list[str] = []  # arrays a recompute set aside, under REPLACED
        self._discard = False
        # the lock goes back when the writer is closed, collected or the interpreter exits
        self._release = weakref.finalize(self, lock.release, lock_key) if lock_key else None
        with layout.quiet_zarr():
            self._group = zarr.open_group(location.zarr_store(read_only=False), mode="r+", use_consolidated=False)
        committed = integrity.open_committed(location)
        self._root_bytes = committed.store.root_bytes
        self._n = int(committed["epoch"].shape[0])
        self._epochs = np.asarray(committed["epoch"][:], dtype=np.int64)
        self._metrics = [*schema.METRICS, *(name for name in schema.OPTIONAL_METRICS if name in committed)]
        self._shifted = False
        self._added_probe = False
        self._mark_rollback_point()

    def close(self) -> None:
        """Release the store's lock (a writer of a store this writer created and rolled back removes it)."""
        if self._release is None or not self._release.alive:
            return
        self.location.remove(REPLACED)  # what a finished recompute replaced
        self._replaced.clear()
        if self._discard:  # unlinked while still held, so no waiting writer can lock the dead file
            self.location.remove(LOCK_KEY)
            if self.location.is_local:
                with contextlib.suppress(OSError):
                    self.location.local.rmdir()
        self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                try:
                    self.rollback()
                except Exception as err:  # the original error matters more; the store keeps whole commits
                    exc.add_note(f"rolling back failed too: {err}")
        finally:
            self.close()

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | Location,
        *,
        model: Model,
        task: Mapping[str, object],
        split: tuple[np.ndarray, Sequence[str]] | None = None,
        probe: np.ndarray | None = None,
        chunk_epochs: int | None = None,
        max_chunk_bytes: int | None = None,
        storage_options: dict | None = None,
        lock_timeout: float | None = None,
        metrics: Sequence[str] = (),
        index_unit: str = "epoch",
    ) -> StoreWriter:
        """Open `path` for writing, creating the store when the path is missing or an empty folder.

        `model` gives the family, config and parameter table of a new store (an existing one must hold the
        same model); `split` the task's train split (a boolean array and its dimension names), `probe` the
        landscape probe a user gave (recorded once; an existing store must hold the same one). A new store gets
        arrays for the `metrics` among `schema.OPTIONAL_METRICS` and records `index_unit` ("step" or "epoch": what
        the epoch axis counts; an existing store must count the same). A new store's chunks hold `chunk_epochs`
        epochs (default: from the largest parameter, `layout.chunk_epochs_for`) and at most `max_chunk_bytes`
        (default `layout.MAX_CHUNK_BYTES`; larger parameters are split along their own axes); an existing
        store keeps its chunks.

        Waits for the store's lock while another process writes it (saying so on stderr), at most
        `lock_timeout` seconds (default: `GEOSTORE_LOCK_TIMEOUT`, else as long as it takes). Refuses a
        damaged store. Close the writer (or use it as a context manager) to let the next writer in.
        """
        location = Location.of(path, storage_options)
        if location.is_file():
            raise StoreError(f"{location}: exists and is not a geostore store (a file)")
        if location.is_empty():
            location.make_folder()
        elif location.exists(layout.ROOT_META) or not location.exists(LOCK_KEY):
            # refuse a non-store before the lock file is made in it; a store without its root zarr.json yet but
            # with a lock is being created by another writer: wait for the lock, then look again
            _check_same_run(location, layout.read_root_attrs(location), model, task, split, index_unit)
        key = lock.acquire(location, timeout=lock_timeout)
        try:
            if location.is_empty():  # nobody created it while this process waited
                _create(location, model, task, split, probe, chunk_epochs, metrics, index_unit, max_chunk_bytes)
                return cls(location, layout.read_root_attrs(location), created=True, lock_key=key)
            attrs = layout.read_root_attrs(location)  # again, under the lock
            _check_same_run(location, attrs, model, task, split, index_unit)
            integrity.verify(location)
            writer = cls(location, attrs, created=False, lock_key=key)
            writer._recover()
            if probe is not None:
                writer.record_probe(probe)
            return writer
        except BaseException:
            lock.release(key)
            raise

    @property
    def epochs(self) -> np.ndarray:
        """Epochs committed so far (strictly increasing)."""
        return self._epochs.copy()

    @property
    def chunk_epochs(self) -> int:
        """Epochs per chunk: batches aligned to it write every chunk once."""
        return int(self.attrs["geostore"]["chunk_epochs"])

    def _epoch_arrays(self) -> list[str]:
        return [schema.EPOCH_DIM, *self.table.names, *self._metrics, *self._analysis_arrays()]

    def _analysis_arrays(self) -> list[str]:
        """Arrays of the analyses the committed attributes enable (an analysis is listed by its settings), with
        their done flags where the store records them."""
        return [name for analysis, names in schema.ANALYSES.items() if analysis in self.attrs
                for name in (*(n for n in schema.ANALYSIS_ARRAYS if n in names),
                             *((schema.DONE_ARRAYS[analysis],) if self._has_done(analysis) else ()))]

    def _has_done(self, analysis: str) -> bool:
        """Whether the store records the completion of `analysis` in done flags (not in stores made before them)."""
        if analysis not in self._done:
            self._done[analysis] = self.location.exists(f"{schema.DONE_ARRAYS[analysis]}/{layout.ROOT_META}")
        return self._done[analysis]

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:  # opening an array reads its metadata: keep the handles
            # every chunk stored, fill values too (zarr keeps this setting per handle, not in the metadata), so
            # that a missing chunk of a checksummed array is damage, never "all fill value"
            self._arrays[name] = self._group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    # ------------------------------------------------------------------------------------ writing
    def append(
        self,
        epochs: Sequence[int],
        params: Mapping[str, np.ndarray],
        metrics: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add epochs after every stored one and commit them: `params[name]` is `(k, *shape)`.

        Their rows of the analysis arrays are NaN (not computed) until written.
        """
        epochs = np.asarray(epochs, dtype=np.int64)
        if epochs.size == 0:
            return
        if np.any(np.diff(epochs) <= 0) or (self._n and epochs[0] <= self._epochs[-1]):
            raise StoreError(f"{self.path}: append needs new epochs after {self._epochs[-1:]}, got {epochs}")
        columns = self._columns(epochs, params, metrics)
        self._write_region(self._n, columns)
        self._commit(np.concatenate([self._epochs, epochs]))

    def insert(
        self,
        epochs: Sequence[int],
        params: Mapping[str, np.ndarray],
        metrics: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add epochs anywhere on the axis (new ones only), keeping it sorted; staged, then committed."""
        epochs = np.asarray(epochs, dtype=np.int64)
        if epochs.size == 0:
            return
        if np.intersect1d(epochs, self._epochs).size or np.unique(epochs).size != epochs.size:
            raise StoreError(f"{self.path}: insert needs new, distinct epochs")
        start = int(np.searchsorted(self._epochs, epochs.min()))
        if start == self._n:
            order = np.argsort(epochs)

            def sort(rows):
                return None if rows is None else {k: np.asarray(v)[order] for k, v in rows.items()}

            self.append(epochs[order], sort(params), sort(metrics))
            return
        new = self._columns(epochs, params, metrics)
        old = {name: self._array(name)[start:self._n] for name in self._epoch_arrays()}
        merged_epochs = np.concatenate([old[schema.EPOCH_DIM], epochs])
        order = np.argsort(merged_epochs, kind="stable")
        tail = {name: np.concatenate([old[name], new[name]])[order] for name in self._epoch_arrays()}
        self._stage(start, tail)
        self._shifted = True
        self._replay()

    # ----------------------------------------------------------------------------------- analyses
    def analysis_settings(self, name: str) -> dict | None:
        """The settings an analysis of `schema.ANALYSES` was computed with, or None when it is not enabled."""
        settings = self.attrs.get(name)
        return None if settings is None else dict(settings)

    @property
    def flatness_settings(self) -> dict | None:
        """The flatness settings the store was computed with (epsilon, n_directions, seed, ...), or None."""
        return self.analysis_settings("flatness")

    def enable_analyses(self, analyses: Mapping[str, Mapping[str, object]], *, recompute: bool = False) -> None:
        """Make the store hold each analysis computed with its settings (committed; no epoch is computed yet).

        `analyses` maps names of `schema.ANALYSES` to settings naming at least the keys of
        `schema.ANALYSIS_SETTINGS`. An analysis stored with other settings is refused unless `recompute`,
        which un-lists its stored values and sets them aside (under `_replaced/`) until the writer closes: a
        failure before then puts them back. Every analysis is checked before anything is written.
        """
        asked = {name: dict(settings) for name, settings in analyses.items()}
        stale = []
        for name, settings in asked.items():
            if name not in schema.ANALYSES:
                raise StoreError(f"{self.path}: unknown analysis {name!r}")
            stored = self.analysis_settings(name)
            if stored is None or _same_settings(name, stored, settings):
                continue
            if not recompute:
                raise StoreError(f"{self.path}: holds {name} with {_describe(name, stored)}, asked for "
                                 f"{_describe(name, settings)}: recompute to replace it")
            stale.append(name)
        new = [name for name in asked if name in stale or self.analysis_settings(name) is None]
        if not new:
            return
        if stale:  # un-list the old arrays first, so a crash never shows them with new settings
            self._set_aside(stale)
        with layout.quiet_zarr():
            for name in new:
                for array in schema.ANALYSES[name]:
                    dims = schema.ANALYSIS_ARRAYS[array]
                    shape = (self._n, *(_dim_size(asked[name], dim) for dim in dims[1:]))
                    self._group.create_array(
                        array, shape=shape, chunks=(self.chunk_epochs, *shape[1:]), dtype="float64",
                        fill_value=float("nan"), dimension_names=dims, compressors=layout.COMPRESSORS,
                        config={"write_empty_chunks": True}, overwrite=True,
                    )
                done = self._group.create_array(
                    schema.DONE_ARRAYS[name], shape=(self._n,), chunks=(self.chunk_epochs,), dtype="bool",
                    fill_value=False, dimension_names=(schema.EPOCH_DIM,), compressors=layout.COMPRESSORS,
                    config={"write_empty_chunks": True}, overwrite=True,
                )
                done[...] = False  # every chunk stored: a missing one is damage, not "not computed"
                self._done[name] = True
                self.attrs[name] = asked[name]
        self._commit(self._epochs)

    def _set_aside(self, analyses: Sequence[str]) -> None:
        """Un-list `analyses` (committed, the generation rises) and move their arrays under `_replaced/`."""
        arrays = [a for a in self._analysis_arrays()
                  if any(a in (*schema.ANALYSES[n], schema.DONE_ARRAYS[n]) for n in analyses)]
        for name in analyses:
            self.attrs.pop(name)
        self._commit(self._epochs, moved=True)
        for array in arrays:
            if f"{REPLACED}/{array}" not in self._replaced:  # a second recompute keeps the store's own values
                self.location.move(array, f"{REPLACED}/{array}")
                self._replaced.append(f"{REPLACED}/{array}")
            else:
                self.location.remove(array)
            self._arrays.pop(array, None)
        for name in analyses:
            self._done.pop(name, None)

    def _restore_replaced(self) -> None:
        """Put the arrays a recompute set aside back in place (before the root that lists them is restored)."""
        aside = {key.removeprefix(f"{REPLACED}/") for key in self._replaced}
        current = [name for name in schema.ANALYSES if name in self.attrs and aside & set(schema.ANALYSES[name])]
        if current:  # first un-list what replaced them, so no reader meets their metadata with the old chunks
            for name in current:
                self.attrs.pop(name)
            self._commit(self._epochs, moved=True)
        for key in self._replaced:
            array = key.removeprefix(f"{REPLACED}/")
            self.location.remove(array)
            self.location.move(key, array)
        self._replaced.clear()
        self.location.remove(REPLACED)

    def enable_flatness(self, settings: Mapping[str, object], *, recompute: bool = False) -> None:
        """`enable_analyses({"flatness": settings}, recompute=recompute)`."""
        self.enable_analyses({"flatness": settings}, recompute=recompute)

    def missing(self, name: str) -> np.ndarray:
        """Stored epochs whose analysis `name` is not complete (all of them when it is not enabled)."""
        if self.analysis_settings(name) is None:
            return self.epochs
        return self._epochs[layout.incomplete_rows(name, lambda array: self._array(array)[: self._n],
                                                   lambda array: array in self._analysis_arrays())]

    def flatness_missing(self) -> np.ndarray:
        """Stored epochs whose flatness is not complete (all of them when flatness is not enabled)."""
        return self.missing("flatness")

    def write_analysis(self, name: str, epochs: Sequence[int], rows: Mapping[str, np.ndarray]) -> None:
        """Write rows of analysis `name` for stored epochs: `rows[array]` is `(k, *row shape)` for every array.

        The epochs' done flags (in stores made before them: the analysis's first array) are written last and
        each chunk write is atomic, so a killed writer leaves whole epochs. NaN values are results like others.
        """
        if self.analysis_settings(name) is None:
            raise StoreError(f"{self.path}: {name} is not enabled in this store")
        epochs = np.asarray(epochs, dtype=np.int64)
        index = np.searchsorted(self._epochs, epochs)
        if np.any(index >= self._n) or np.any(self._epochs[np.minimum(index, self._n - 1)] != epochs):
            missing = sorted(set(epochs.tolist()) - set(self._epochs.tolist()))
            raise StoreError(f"{self.path}: {name} for epochs that are not stored: {missing}")
        values = {}
        for array in schema.ANALYSES[name]:
            value, shape = np.asarray(rows[array], dtype=np.float64), (epochs.size, *self._array(array).shape[1:])
            if value.shape != shape and not (len(shape) == 1 and value.size == shape[0]):
                raise StoreError(f"{self.path}: {array} rows of shape {value.shape}, the store holds {shape[1:]} "
                                 f"per epoch for {epochs.size} epochs")
            values[array] = value.reshape(shape)
        if epochs.size == 0:
            return
        for array in (*schema.ANALYSES[name][1:], schema.ANALYSES[name][0]):
            self._array(array).oindex[(index, *(slice(None),) * (values[array].ndim - 1))] = values[array]
        if self._has_done(name):
            self._array(schema.DONE_ARRAYS[name]).oindex[index] = True

    def nan_row(self, name: str) -> dict[str, np.ndarray]:
        """One epoch's row of analysis `name` with every value NaN (the landscape at NaN weights)."""
        return {array: np.full(self._array(array).shape[1:], np.nan) for array in schema.ANALYSES[name]}

    def write_flatness(
        self,
        epochs: Sequence[int],
        baseline_loss: np.ndarray,
        delta_losses: np.ndarray,
        *,
        epsilon: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Write the flatness of stored epochs: `delta_losses` `(k, n_directions)` first, then the baseline.

        With `epsilon` and `seed`, flatness is enabled with those settings first (refused if the store
        holds other settings).
        """
        delta_losses = np.asarray(delta_losses, dtype=np.float64)
        if epsilon is not None or seed is not None:
            self.enable_flatness({"epsilon": float(epsilon), "n_directions": int(delta_losses.shape[1]),
                                  "seed": seed})
        stored = self.flatness_settings
        n_dir = None if stored is None else int(stored["n_directions"])
        if stored is not None and delta_losses.shape[1:] != (n_dir,):
            raise StoreError(f"{self.path}: flatness rows of shape {delta_losses.shape}, store holds "
                             f"{n_dir} directions")
        self.write_analysis("flatness", epochs, {"baseline_loss": baseline_loss, "delta_losses": delta_losses})

    def probe(self) -> np.ndarray | None:
        """The landscape probe the store records, or None."""
        if not self.location.exists(f"{schema.PROBE}/{layout.ROOT_META}"):
            return None
        return integrity.open_committed(self.location)[schema.PROBE][...]

    def record_probe(self, probe: np.ndarray) -> None:
        """Record the landscape probe (committed): once; a store holding another probe refuses it."""
        tokens = np.asarray(probe, dtype=np.int64)
        stored = self.probe()
        if stored is not None:
            if stored.shape != tokens.shape or not np.array_equal(stored, tokens):
                raise StoreError(f"{self.path}: holds another probe ({stored.shape[0]} x {stored.shape[1]} tokens): "
                                 "its analyses were measured on that one")
            return
        with layout.quiet_zarr():
            _write_probe(self._group, tokens, {"compressors": layout.COMPRESSORS,
                                               "config": {"write_empty_chunks": True}})
        self._commit(self._epochs)
        self._added_probe = True

    def record_source(self, record: Mapping[str, object]) -> None:
        """Remember where epochs came from (kept in the root attributes at the next commit)."""
        sources = list(self.attrs.get("sources", []))
        if dict(record) not in sources:
            sources.append(dict(record))
        self.attrs["sources"] = sources

    def commit_attrs(self) -> None:
        """Commit attribute changes alone (e.g. a recorded source with no new epochs)."""
        self._commit(self._epochs)

    def rollback(self) -> None:
        """Undo everything this writer appended or enabled: back to the store as it was opened.

        Appends, newly enabled analyses and recomputed ones (their old values come back) are undone; after an
        insertion shifted stored epochs, the store stays as committed. Rows computed for stored epochs stay.
        """
        if self.created and not self._shifted:
            self._discard_created()
            return
        if self._shifted:
            return
        if self._replaced:
            self._restore_replaced()
        self._n = self._start_n
        self._epochs = self._epochs[: self._start_n]
        root = self._start_files.get(layout.ROOT_META)
        if root is not None:  # the commit record first: readers of the dropped epochs learn before chunks go
            self.location.write_atomic(layout.ROOT_META, root)
            self._root_bytes = root
        self._shrink_to(self._n)
        added = set(self._analysis_arrays()) - self._start_arrays
        for key, content in self._start_files.items():
            if key != layout.ROOT_META:
                self.location.write_bytes(key, content)
        self.attrs = copy.deepcopy(self._start_attrs)
        for name in added:
            self.location.remove(name)
        if self._added_probe:
            self.location.remove(schema.PROBE)
            self._added_probe = False
        self._arrays.clear()  # the handles' metadata predates the restored files
        self._done.clear()

    def _discard_created(self) -> None:
        """Remove the store this writer created, all but the lock (removed, still held, by `close`)."""
        for key in self.location.files():
            if key != LOCK_KEY:
                self.location.remove(key)
        if self.location.is_local:  # empty folders left by the files above
            for folder in sorted((p for p in self.location.local.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._arrays.clear()
        self._discard = True
        self._n, self._epochs = 0, self._epochs[:0]

    def _mark_rollback_point(self) -> None:
        """Remember the committed state that `rollback` returns to."""
        self._start_n = self._n
        self._start_files = self._rollback_files()
        self._start_arrays = set(self._analysis_arrays())
        self._start_attrs = copy.deepcopy(self.attrs)

    def _rollback_files(self) -> dict[str, bytes]:
        """Bytes of every file an append may rewrite: metadata and the chunk holding the last epoch."""
        files = [layout.ROOT_META]
        edge = self._n // self.chunk_epochs if self._n % self.chunk_epochs else None
        for name in self._epoch_arrays():
            files.append(f"{name}/{layout.ROOT_META}")
            if edge is not None:  # the chunk key is a file for 1-d arrays, a folder of files otherwise
                files.extend(self.location.files(f"{name}/c/{edge}") or [f"{name}/c/{edge}"])
        contents = {}
        for key in files:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                contents[key] = self.location.read_bytes(key)
        return contents

    # ---------------------------------------------------------------------------------- internals
    def _columns(self, epochs, params, metrics) -> dict[str, np.ndarray]:
        k = epochs.size
        columns = {schema.EPOCH_DIM: epochs}
        for parameter in self.table.parameters:
            name = parameter.name
            if name not in params:
                raise StoreError(f"{self.path}: no values for parameter {name}")
            value = np.asarray(params[name], dtype=np.float32)
            expected = (k, *parameter.shape)
            if value.shape != expected:
                raise StoreError(f"{self.path}: {name} has shape {value.shape[1:]}, store holds {expected[1:]}")
            columns[name] = value
        for name in self._metrics:
            given = None if metrics is None else metrics.get(name)
            columns[name] = np.full(k, np.nan) if given is None else np.asarray(given, dtype=np.float64)
        for name in self._analysis_arrays():
            array = self._array(name)
            columns[name] = np.full((k, *array.shape[1:]), array.fill_value, dtype=array.dtype)
        return columns

    def _write_region(self, start: int, columns: Mapping[str, np.ndarray]) -> None:
        """Grow every array to cover the rows and write them; arrays are written concurrently."""
        stop = start + len(columns[schema.EPOCH_DIM])

        def write(name: str) -> None:
            array = self._array(name)
            if array.shape[0] != stop:
                array.resize((stop, *array.shape[1:]))
            array[start:stop] = columns[name]

        arrays = sorted(columns, key=lambda name: -columns[name].nbytes)
        for name in arrays:
            self._array(name)  # open the handles in this thread
        threads = max(1, min(WRITE_THREADS, WRITE_BUFFER_BYTES // max(1, columns[arrays[0]].nbytes)))
        chunk = max(math.prod(self._array(name).chunks) * self._array(name).dtype.itemsize for name in arrays)
        concurrency = zarr.config.get("async.concurrency")
        if threads * concurrency * chunk > WRITE_BUFFER_BYTES:
            concurrency = max(1, WRITE_BUFFER_BYTES // (threads * chunk))
        with zarr.config.set({"async.concurrency": concurrency}), ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(write, arrays))

    def _commit(self, epochs: np.ndarray, *, moved: bool = False) -> None:
        """Atomically replace the root metadata: the epochs in it become the store's epochs.

        `moved`: committed values moved or went away (an insertion, a recompute): the generation rises,
        so readers of the previous commits stop instead of reading shifted chunks.
        """
        if self._discard:
            raise StoreError(f"{self.path}: this writer rolled back the store it created")
        try:
            current = self.location.read_bytes(layout.ROOT_META)
        except FileNotFoundError:
            current = None
        if current != self._root_bytes:
            raise StoreError(f"{self.path}: the store was changed by another writer while this one held it "
                             "(two writers of one store in one process?): nothing committed")
        if moved:
            tag = self.attrs["geostore"]
            tag["generation"] = int(tag.get("generation", 0)) + 1
        n = int(epochs.size)
        consolidated = {}
        for name in self._epoch_arrays():
            meta = json.loads(self.location.read_text(f"{name}/{layout.ROOT_META}"))
            consolidated[name] = {**meta, "shape": [n, *meta["shape"][1:]]}
        for name in (schema.SPLIT, schema.PROBE):
            if self.location.exists(f"{name}/{layout.ROOT_META}"):
                consolidated[name] = json.loads(self.location.read_text(f"{name}/{layout.ROOT_META}"))
        root = layout.read_root_meta(self.location)
        root["attributes"] = self.attrs
        root["consolidated_metadata"] = {
            "kind": "inline", "must_understand": False, "metadata": dict(sorted(consolidated.items())),
        }
        data = _json_bytes(root)
        self.location.write_atomic(layout.ROOT_META, data)
        self._root_bytes = data
        self._n = n
        self._epochs = np.asarray(epochs, dtype=np.int64)

    def _stage(self, start: int, tail: Mapping[str, np.ndarray]) -> None:
        self.location.remove(layout.PENDING)
        for name, value in tail.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            self.location.write_bytes(f"{layout.PENDING}/{name}.npy", buffer.getvalue())
        self.location.write_atomic(f"{layout.PENDING}/state.json",
                                   _json_bytes({"start": start, "length": len(tail["epoch"]), "complete": True}))

    def _replay(self) -> None:
        """Apply a complete staged tail, commit it, then drop the stage (idempotent)."""
        state = layout.pending_state(self.location)
        start = int(state["start"])
        tail = {name: np.load(io.BytesIO(self.location.read_bytes(f"{layout.PENDING}/{name}.npy")))
                for name in self._epoch_arrays()}
        self._write_region(start, tail)
        self._commit(np.concatenate([self._epochs[:start], tail[schema.EPOCH_DIM]]), moved=True)
        self.location.remove(layout.PENDING)

    def _recover(self) -> None:
        """Finish a killed writer's staged insertion, or discard its uncommitted appends and temp files."""
        for key in self.location.files():
            if key.endswith(PARTIAL_SUFFIX):
                self.location.remove(key)
        self.location.remove(REPLACED)  # a killed recompute's old values: its new settings are committed
        state = layout.pending_state(self.location)
        if state is not None and state.get("complete"):
            self._replay()
        elif state is not None:
            self.location.remove(layout.PENDING)
        self._shrink_to(self._n)

    def _shrink_to(self, n: int) -> None:
        """Drop uncommitted epochs beyond `n` (and their chunks) from every array's own metadata."""
        for name in self._epoch_arrays():
            array = self._array(name)
            if array.shape[0] != n:
                array.resize((n, *array.shape[1:]))


def _same_settings(name: str, stored: Mapping, asked: Mapping) -> bool:
    return all(stored.get(k) == asked.get(k) for k in schema.ANALYSIS_SETTINGS[name])


def _describe(name: str, settings: Mapping) -> str:
    return ", ".join(f"{k}={settings.get(k)!r}" for k in schema.ANALYSIS_SETTINGS[name])


def _dim_size(settings: Mapping, dim: str) -> int:
    """Size of an analysis dimension from the settings (a count, or the length of a list)."""
    value = settings[schema.ANALYSIS_DIM_SETTINGS[dim]]
    return len(value) if isinstance(value, list | tuple) else int(value)


def _create(location: Location, model: Model, task, split, probe, chunk_epochs, metrics: Sequence[str] = (),
            index_unit: str = "epoch", max_chunk_bytes: int | None = None) -> None:
    """Write an empty store (no epochs) for `model`, committed."""
    table = model.table
    largest = max(p.size for p in table.parameters) * 4
    chunks = chunk_epochs or layout.chunk_epochs_for(largest, max_chunk_bytes)
    location.make_folder()
    attrs = {
        "geostore": {"format": schema.FORMAT_NAME, "version": schema.FORMAT_VERSION, "chunk_epochs": chunks},
        "family": model.family,
        "model_config": dict(model.config),
        "parameters": table.to_json(),
        "task": dict(task),
        "sources": [],
        **({schema.INDEX_UNIT: index_unit} if index_unit != "epoch" else {}),
    }
    with layout.quiet_zarr():
        store = location.zarr_store(read_only=False)
        group = zarr.create_group(store, attributes=attrs)  # never over another's store (and under the lock)
        opts = {"compressors": layout.COMPRESSORS, "config": {"write_empty_chunks": True}}
        group.create_array(schema.EPOCH_DIM, shape=(0,), chunks=(chunks,), dtype="int64",
                           fill_value=-1, dimension_names=(schema.EPOCH_DIM,), **opts)
        for parameter in table.parameters:
            group.create_array(parameter.name, shape=(0, *parameter.shape),
                               chunks=layout.chunk_shape(parameter.shape, chunks, 4, max_chunk_bytes),
                               dtype="float32", fill_value=0.0, dimension_names=(schema.EPOCH_DIM, *parameter.dims),
                               **opts)
        for name in (*schema.METRICS, *(m for m in schema.OPTIONAL_METRICS if m in metrics)):
            group.create_array(name, shape=(0,), chunks=(chunks,), dtype="float64",
                               fill_value=float("nan"), dimension_names=(schema.EPOCH_DIM,), **opts)
        if split is not None:
            mask, dims = np.asarray(split[0], dtype=bool), tuple(split[1])
            array = group.create_array(schema.SPLIT, shape=mask.shape, chunks=mask.shape, dtype="bool",
                                       fill_value=False, dimension_names=dims, **opts)
            array[...] = mask
        if probe is not None:
            _write_probe(group, probe, opts)
        zarr.consolidate_metadata(store)


def _write_probe(group: zarr.Group, probe: np.ndarray, opts: Mapping) -> None:
    tokens = np.asarray(probe, dtype=np.int64)
    array = group.create_array(schema.PROBE, shape=tokens.shape, chunks=tokens.shape, dtype="int64",
                               fill_value=0, dimension_names=schema.PROBE_DIMS, **opts)
    array[...] = tokens


def _check_same_run(path: Location, attrs: Mapping, model: Model, task, split, index_unit: str = "epoch") -> None:
    """Refuse a source whose model (or recorded run) differs from the store's.

    The same model: the same family, the same state-dict entries with the same shapes, and no config field
    that both record with different values (a format-1 store records fewer fields).
    """
    family = schema.family_of(attrs)
    if family != model.family:
        raise ModelMismatchError(f"{path}: store holds a {family} model, the source a {model.family} model")
    stored_keys = {key: p.key_shape for p in schema.table_of(attrs).parameters for key in p.keys}
    keys = {key: p.key_shape for p in model.table.parameters for key in p.keys}
    for key in sorted(set(stored_keys) | set(keys)):
        if stored_keys.get(key) != keys.get(key):
            raise ModelMismatchError(f"{path}: store holds another model ({key}: {stored_keys.get(key)}, "
                                     f"source has {keys.get(key)})")
    stored = attrs.get("model_config", {})
    for key in sorted(set(stored) & set(model.config)):
        if stored[key] != model.config[key]:
            raise ModelMismatchError(
                f"{path}: store holds another model ({key}={stored[key]!r}, source has {model.config[key]!r})"
            )
    stored_unit = attrs.get(schema.INDEX_UNIT, "epoch")
    if stored_unit != index_unit:
        raise ModelMismatchError(f"{path}: store is indexed by {stored_unit}, the source by {index_unit}")
    stored_task = attrs.get("task", {})
    for key in ("family", "train_fraction", "data_seed", "model_seed", "seed"):
        if key in stored_task and key in task and stored_task[key] != task[key]:
            raise ModelMismatchError(
                f"{path}: store holds another run ({key}={stored_task[key]!r}, source has {task[key]!r})"
            )
    if split is not None and path.exists(schema.SPLIT):
        stored_mask = integrity.open_committed(path)[schema.SPLIT][...]
        if not np.array_equal(np.asarray(split[0], dtype=bool), stored_mask):
            raise ModelMismatchError(f"{path}: store holds another run (the train/test split differs)")
