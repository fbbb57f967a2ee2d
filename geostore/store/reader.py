"""The read-only `Store` handle: lazy dask and xarray views of a geostore store.

Reads go through the consolidated metadata (the commit record), so a store being written or left
by a killed ingest shows only whole epochs. Torch and TransformerLens are imported only by
`model_at`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.store import layout, schema
from geostore.store.location import Location

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr
    from transformer_lens import HookedTransformer


class Store:
    """A geostore store opened for reading; use `geostore.open_store(path)`.

    Parameters are dask arrays `(n_epoch, *shape)` chunked as stored along epoch; nothing is
    read until computed. Works as a context manager.
    """

    def __init__(self, path: str | os.PathLike | Location, *, storage_options: dict | None = None) -> None:
        self.location = Location.of(path, storage_options)
        self.path = str(self.location)  # the folder or URL, for messages and to reopen the store elsewhere
        if not self.location.exists():
            raise StoreError(f"{self.path}: no such store")
        self.attrs: dict = layout.read_root_attrs(self.location)
        self._group = layout.open_committed(self.location)
        epochs = np.asarray(self._group[schema.EPOCH_DIM][:], dtype=np.int64)
        pending = layout.pending_state(self.location)
        # A staged insertion may have shifted stored epochs past its start: show the intact prefix.
        self._n = int(pending["start"]) if pending and pending.get("complete") else epochs.size
        self.interrupted = pending is not None
        self._epochs = epochs[: self._n]
        self._epochs.setflags(write=False)
        self._params: Mapping[str, da.Array] | None = None

    # ----------------------------------------------------------------------------- basic facts
    @property
    def epochs(self) -> np.ndarray:
        """Stored epochs, strictly increasing (int64, read-only)."""
        return self._epochs

    @property
    def params(self) -> Mapping[str, da.Array]:
        """Parameter name (`W_E`, ..., `b_U`) -> lazy dask array `(n_epoch, *shape)`, float32.

        Dask chunks follow the stored chunks (`chunk_epochs` epochs), not zarr's one-task-per-chunk
        default of `da.from_zarr` with small inner chunks.
        """
        if self._params is None:
            import dask.array as da

            self._params = MappingProxyType({
                name: da.from_zarr(self._group[name], chunks=(self.chunk_epochs, *self._group[name].shape[1:]))[
                    : self._n
                ]
                for name in schema.PARAMETERS
            })
        return self._params

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-epoch shape of every parameter (no dask needed)."""
        return {name: tuple(self._group[name].shape[1:]) for name in schema.PARAMETERS}

    @property
    def config(self) -> dict:
        """The model config (HookedTransformerConfig fields)."""
        return dict(self.attrs["model_config"])

    @property
    def task(self) -> dict:
        """What the sources recorded of the task (family, p, seeds, training hyperparameters)."""
        return dict(self.attrs.get("task", {}))

    @property
    def sources(self) -> list[dict]:
        """Where the stored epochs came from (kind and path of each ingested source)."""
        return list(self.attrs.get("sources", []))

    @property
    def chunk_epochs(self) -> int:
        """Epochs per stored chunk."""
        return int(self.attrs["geostore"]["chunk_epochs"])

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch training metrics (`train_loss`, ...) that the sources recorded; NaN where unknown."""
        out = {}
        for name in schema.METRICS:
            values = np.asarray(self._group[name][: self._n], dtype=np.float64)
            if np.isfinite(values).any():
                out[name] = values
        return out

    def train_mask(self) -> np.ndarray | None:
        """The task's train split as a `(p, p)` bool grid (`[a, b]`), or None if not recorded."""
        if schema.SPLIT not in self._group:
            return None
        return np.asarray(self._group[schema.SPLIT][:])

    # ------------------------------------------------------------------------------ derived views
    def flatten(self, group: str | Sequence[str] = "all") -> da.Array:
        """Lazy `(n_epoch, D)` float32 matrix of a component group's flattened parameters.

        Groups: `all` (the 9 weight matrices), `embedding`, `attention`, `mlp`, or a list of names.
        """
        try:
            names = schema.resolve_group(group)
        except KeyError as exc:
            raise StoreError(str(exc.args[0])) from None
        import dask.array as da

        return da.concatenate([self.params[n].reshape(self._n, -1) for n in names], axis=1)

    def params_at(self, epoch: int) -> dict[str, np.ndarray]:
        """Every parameter at one stored epoch, as numpy arrays."""
        index = self.index_of(epoch)
        return {name: np.asarray(self._group[name][index]) for name in schema.PARAMETERS}

    def index_of(self, epoch: int) -> int:
        """Position of a stored epoch on the epoch axis; StoreError if it is not stored."""
        index = int(np.searchsorted(self._epochs, epoch))
        if index >= self._n or self._epochs[index] != epoch:
            raise StoreError(f"{self.path}: epoch {epoch} is not stored")
        return index

    def model_at(self, epoch: int) -> HookedTransformer:
        """The exact HookedTransformer of a stored epoch, rebuilt from the store alone."""
        from geostore.model import build_model, load_parameters

        model = build_model(self.config)
        load_parameters(model, self.params_at(epoch))
        return model

    def to_xarray(self) -> xr.Dataset:
        """The store as an xarray Dataset (lazy), as `xarray.open_zarr(path)` gives it."""
        import xarray as xr

        with layout.quiet_zarr():
            ds = xr.open_zarr(self.location.zarr_store(read_only=True), consolidated=True)
        return ds.isel({schema.EPOCH_DIM: slice(0, self._n)})

    # ----------------------------------------------------------------------------------- flatness
    @property
    def flatness_settings(self) -> dict:
        """How the stored flatness was computed: `epsilon`, `n_directions`, `seed`, the loss, ..."""
        self._require("flatness")
        return dict(self.attrs["flatness"])

    @property
    def baseline_loss(self) -> da.Array:
        """Lazy `(n_epoch,)` float64 loss at each epoch's weights; NaN where flatness is not computed."""
        self._require("flatness")
        import dask.array as da

        return da.from_zarr(self._group["baseline_loss"])[: self._n]

    @property
    def delta_losses(self) -> da.Array:
        """Lazy `(n_epoch, n_directions)` float64 `L(theta + eps d) - L(theta)`; NaN rows where not computed.

        An epoch's row counts only once its baseline is written (the writer writes it last).
        """
        self._require("flatness")
        import dask.array as da

        deltas = da.from_zarr(self._group["delta_losses"])[: self._n]
        return da.where(da.isnan(self.baseline_loss)[:, None], np.nan, deltas)

    def flatness_epochs(self) -> np.ndarray:
        """Epochs whose flatness is complete (read without dask)."""
        self._require("flatness")
        baseline = np.asarray(self._group["baseline_loss"][: self._n])
        return self._epochs[np.isfinite(baseline)]

    def flatness_summary(self, threshold: float = 0.1) -> dict[str, np.ndarray]:
        """Per-epoch summaries of the stored distribution (mean, median, max, std, p10, p90, flatness ratio).

        `flatness_ratio` is the fraction of directions whose loss rises by less than `threshold`
        times the baseline (see `geostore.analysis.flatness_stats.flatness_summary`).
        """
        from geostore.analysis.flatness_stats import flatness_summary

        self._require("flatness")
        baseline = np.asarray(self._group["baseline_loss"][: self._n])  # small: read without dask
        deltas = np.asarray(self._group["delta_losses"][: self._n])
        deltas[np.isnan(baseline)] = np.nan
        return flatness_summary(baseline, deltas, threshold)

    def _require(self, analysis: str) -> None:
        if analysis not in self.analyses():
            raise StoreError(f"{self.path}: no {analysis} stored (run `geostore {analysis} {self.path}`)")

    def analyses(self) -> list[str]:
        """Names of the analyses stored (see `schema.ANALYSES`), e.g. `flatness`."""
        return [name for name, arrays in schema.ANALYSES.items() if all(a in self._group for a in arrays)]

    def describe(self) -> str:
        """A human-readable summary: epochs, model, shapes, size, sources, analyses."""
        from geostore.store.summary import describe

        return describe(self)

    @property
    def name(self) -> str:
        """The store's folder (or last URL segment) name."""
        return self.location.name

    def nbytes_on_disk(self) -> int:
        """Bytes the store's files take in storage."""
        return self.location.nbytes()

    # --------------------------------------------------------------------------------- trajectory
    def pca(
        self,
        group: str | Sequence[str] = "all",
        n_components: int = 3,
        *,
        fit_epochs: tuple[int, int] | Sequence[int] | None = None,
        loadings: bool = False,
        memory_budget: int | None = None,
    ) -> dict:
        """Exact PCA of a group's trajectory, equal to scikit-learn's `PCA` on the float64 matrix up to sign.

        Returns `projections` `(n_epoch, k)`, `explained_variance_ratio` and `explained_variance` `(k,)`,
        `epochs`, and with `loadings=True` the unit `components` as a lazy dask array `(k, D)`. Centred
        over the fit epochs: all epochs, an inclusive `(start, stop)` tuple, or a sequence of stored epochs;
        every epoch is projected. Each component's sign makes its largest-magnitude fit projection positive.
        Computed out of core from the Gram matrix of the epochs (panels of at most `memory_budget` bytes
        per process, default 1 GiB) and cached in the store, so reopening is instant and new epochs cost
        only their own rows (see `geostore.store.derived`).
        """
        from geostore.store import derived

        return derived.pca(self, group, n_components, fit_epochs=fit_epochs, loadings=loadings,
                           memory_budget=memory_budget)

    def velocity(self, group: str | Sequence[str] = "all", *, per_epoch: bool = True,
                 memory_budget: int | None = None) -> np.ndarray:
        """`(n_epoch - 1,)` step lengths `||theta[i+1] - theta[i]||` of a group, divided by the epoch gap
        when `per_epoch` (checkpoints are unevenly spaced); exact, from the same cached pass as `pca`."""
        from geostore.store import derived

        return derived.velocity(self, group, per_epoch=per_epoch, memory_budget=memory_budget)

    def velocities(self, per_epoch: bool = True, *, memory_budget: int | None = None) -> dict[str, np.ndarray]:
        """`velocity` of `all`, `embedding`, `attention` and `mlp`, computed in one pass."""
        from geostore.store import derived

        return derived.velocities(self, per_epoch=per_epoch, memory_budget=memory_budget)

    # ---------------------------------------------------------------------------------- protocol
    def close(self) -> None:
        """Release the handle (a no-op for local stores; kept for the context-manager protocol)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        span = f"{self._epochs[0]}..{self._epochs[-1]}" if self._n else "none"
        return f"<geostore.Store {str(self.path)!r}: {self._n} epochs ({span})>"


def open_store(path: str | os.PathLike | Location, run: str | None = None, *,
               storage_options: dict | None = None) -> Store:
    """Open a geostore store read-only: `.epochs`, `.params` (dask), `.flatten(group)`, `.to_xarray()`.

    `path` is a local folder or any fsspec URL (`s3://bucket/run.zarr`, `memory://...`, `file://...`);
    credentials and endpoints come from the environment and fsspec config, or `storage_options`. For a
    sweep (see `geostore.store.sweep`), `run` names the run to open.
    """
    from geostore.store.sweep import open_target

    return open_target(path, run, storage_options=storage_options)
