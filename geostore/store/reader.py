"""The read-only `Store` handle: lazy dask and xarray views of a geostore store.

Reads go through the consolidated metadata (the commit record), so a store being written or left
by a killed ingest shows only whole epochs. The store never imports the model builders: `model` and
`model_at` use the family lookup its opener (`geostore.open_store`) hands it, and only they import torch.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.store import integrity, layout, schema
from geostore.store.location import Location

# The `geostore flatness` options that add each analysis to a store.
ADD_OPTIONS = {"flatness": "", "antithetic": " --antithetic", "profile": " --profile-epsilons E1,E2,...",
               "hessian": " --hessian", "hessian_groups": " --hessian"}

if TYPE_CHECKING:
    import dask.array as da
    import torch
    import xarray as xr

    from geostore.family.base import Family, Model, ParameterTable


class Store:
    """A geostore store opened for reading; use `geostore.open_store(path)`.

    Parameters are dask arrays `(n_epoch, *shape)` chunked as stored; nothing is
    read until computed. Works as a context manager.
    """

    def __init__(self, path: str | os.PathLike | Location, *, storage_options: dict | None = None,
                 families: Callable[[str], Family] | None = None) -> None:
        self.location = Location.of(path, storage_options)
        self._families = families  # name -> Family, for `model`: the store itself never builds models
        self.path = str(self.location)  # the folder or URL, for messages and to reopen the store elsewhere
        if not self.location.exists():
            raise StoreError(f"{self.path}: no such store")
        self.attrs: dict = layout.read_root_attrs(self.location)
        self.table: ParameterTable = schema.table_of(self.attrs)
        self._group = integrity.open_committed(self.location)
        epochs = np.asarray(self._group[schema.EPOCH_DIM][:], dtype=np.int64)
        pending = layout.pending_state(self.location)
        # A staged insertion may have shifted stored epochs past its start: show the intact prefix.
        self._n = int(pending["start"]) if pending and pending.get("complete") else epochs.size
        self.interrupted = pending is not None
        self._epochs = epochs[: self._n]
        self._epochs.setflags(write=False)
        self._group.store.epochs = self._epochs  # damage messages name epochs
        self._params: Mapping[str, da.Array] | None = None

    # ----------------------------------------------------------------------------- basic facts
    @property
    def epochs(self) -> np.ndarray:
        """Stored epochs, strictly increasing (int64, read-only)."""
        return self._epochs

    @property
    def params(self) -> Mapping[str, da.Array]:
        """Parameter name (see `table`) -> lazy dask array `(n_epoch, *shape)`, float32.

        Dask chunks are the stored chunks (`chunk_epochs` epochs; a large parameter's also split along its own
        axes), so reading one epoch reads that epoch's chunks only.
        """
        if self._params is None:
            import dask.array as da

            self._params = MappingProxyType({
                name: da.from_zarr(self._group[name], chunks=self._group[name].chunks)[: self._n]
                for name in self.table.names
            })
        return self._params

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-epoch shape of every parameter (no dask needed)."""
        return {name: tuple(self._group[name].shape[1:]) for name in self.table.names}

    @property
    def family(self) -> str:
        """The name of the model family that wrote the store (see `geostore.family.registry`)."""
        return schema.family_of(self.attrs)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Component groups -> parameter names (`all` first: every trainable parameter); a member `W_Q[0]` is one
        layer of a layered parameter."""
        return dict(self.table.groups)

    @property
    def config(self) -> dict:
        """The model config the family records (HookedTransformerConfig fields for transformers)."""
        return dict(self.attrs["model_config"])

    @property
    def model(self) -> Model:
        """The family's `Model` of this store (needs the family installed; imports torch)."""
        if self._families is None:
            raise StoreError(f"{self.path}: opened without model families: open it with geostore.open_store to "
                             "rebuild its models")
        return self._families(self.family).model(self.config)

    def probe(self) -> np.ndarray | None:
        """The landscape probe a user gave (token ids `(batch, seq)`), or None."""
        if schema.PROBE not in self._group:
            return None
        return np.asarray(self._group[schema.PROBE][...])

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

    @property
    def index_unit(self) -> str:
        """What the epoch axis counts: "epoch", or "step" (optimiser steps, e.g. transformers runs)."""
        return str(self.attrs.get(schema.INDEX_UNIT, "epoch"))

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch training metrics (`train_loss`, ...) that the sources recorded; NaN where unknown."""
        out = {}
        for name in (*schema.METRICS, *(m for m in schema.OPTIONAL_METRICS if m in self._group)):
            values = np.asarray(self._group[name][: self._n], dtype=np.float64)
            if np.isfinite(values).any():
                out[name] = values
        return out

    def phases(self, *, train_loss_threshold: float = 1e-6, test_loss_threshold: float = 1e-6,
               descent_fraction: float = 0.8) -> dict[str, tuple[int, int]]:
        """The training phases the recorded curves reach, `{phase: (first epoch, last epoch)}` in order:
        `memorisation`, `plateau`, `second_descent`, `final` (see `geostore.analysis.phases`); {} when the sources
        recorded no train and test loss."""
        from geostore.analysis.phases import training_phases

        metrics = self.metrics()
        if "train_loss" not in metrics or "test_loss" not in metrics:
            return {}
        return training_phases(self.epochs, metrics["train_loss"], metrics["test_loss"],
                               metrics.get("train_accuracy"), train_loss_threshold=train_loss_threshold,
                               test_loss_threshold=test_loss_threshold, descent_fraction=descent_fraction)

    def train_mask(self) -> np.ndarray | None:
        """The task's train split as a boolean array (dimensions from the family), or None if not recorded."""
        if schema.SPLIT not in self._group:
            return None
        return np.asarray(self._group[schema.SPLIT][...])

    # ------------------------------------------------------------------------------ derived views
    def flatten(self, group: str | Sequence[str] = "all") -> da.Array:
        """Lazy `(n_epoch, D)` float32 matrix of a component group's flattened parameters.

        Groups: those of `groups` (`all`: every trainable parameter), or a list of parameter names.
        """
        import dask.array as da

        return da.concatenate([self.member(n).reshape(self._n, -1) for n in self.resolve(group)], axis=1)

    def resolve(self, group: str | Sequence[str]) -> tuple[str, ...]:
        """The members of a group name, a parameter name or a list of names; StoreError naming the choices."""
        try:
            return self.table.resolve(group)
        except KeyError as exc:
            raise StoreError(f"{self.path}: {exc.args[0]}") from None

    def member(self, name: str) -> da.Array:
        """A group member as a lazy `(n_epoch, ...)` array: a parameter, or `name[l]`, layer `l` of a layered one."""
        if name.endswith("]") and "[" in name:
            base, layer = name[:-1].split("[")
            return self.params[base][:, int(layer)]
        return self.params[name]

    def params_at(self, epoch: int) -> dict[str, np.ndarray]:
        """Every parameter at one stored epoch, as numpy arrays."""
        index = self.index_of(epoch)
        return {name: np.asarray(self._group[name][index]) for name in self.table.names}

    def state_dict_at(self, epoch: int) -> dict[str, np.ndarray]:
        """One stored epoch as the model's state-dict entries (parameters only; layers unstacked)."""
        return self.table.state_dict(self.params_at(epoch))

    def index_of(self, epoch: int) -> int:
        """Position of a stored epoch on the epoch axis; StoreError if it is not stored."""
        index = int(np.searchsorted(self._epochs, epoch))
        if index >= self._n or self._epochs[index] != epoch:
            raise StoreError(f"{self.path}: epoch {epoch} is not stored")
        return index

    def model_at(self, epoch: int) -> torch.nn.Module:
        """The exact torch model of a stored epoch, rebuilt by its family from the store alone (eval mode): its
        `state_dict()` equals the checkpoint's."""
        model = self.model
        return model.build(model.table.stored(self.state_dict_at(epoch), f"{self.path}@{epoch}"))

    def to_xarray(self) -> xr.Dataset:
        """The store as a lazy xarray Dataset, as `xarray.open_zarr(path)` gives it but with the rows of
        incomplete analysis epochs NaN, as `analysis(name)` gives them."""
        return self._masked(self._dataset(), self.analyses())

    def _dataset(self) -> xr.Dataset:
        """The committed epochs as xarray reads them, read through this handle's snapshot checks."""
        import xarray as xr

        with layout.quiet_zarr():  # through this handle's commit: chunks a later insertion moved raise
            ds = xr.open_zarr(self._group.store, consolidated=True)
        return ds.isel({schema.EPOCH_DIM: slice(0, self._n)})

    # ----------------------------------------------------------------------------------- analyses
    def analyses(self) -> list[str]:
        """Names of the analyses stored (see `schema.ANALYSES`), e.g. `flatness`."""
        return [name for name, arrays in schema.ANALYSES.items() if all(a in self._group for a in arrays)]

    def analysis(self, name: str) -> xr.Dataset:
        """A stored analysis (`flatness`, `antithetic`, `profile`, `hessian`, `hessian_groups`) as a lazy Dataset
        over `epoch`.

        Its variables are the analysis's arrays (`schema.ANALYSES[name]`, e.g. `baseline_loss` and
        `delta_losses` for flatness); rows of epochs where the analysis is incomplete are NaN; `attrs` are
        the settings it was computed with; a `group` dimension has the group names as its coordinate.
        StoreError, naming the command that adds it, when not stored.
        """
        self._require(name)
        dataset = self._masked(self._dataset()[list(schema.ANALYSES[name])], [name])
        dataset.attrs = self.analysis_settings(name)
        labels = {dim: list(dataset.attrs[schema.ANALYSIS_DIM_SETTINGS[dim]]) for dim in schema.LABELLED_DIMS
                  if dim in dataset.dims}
        return dataset.assign_coords(labels)

    def analysis_settings(self, name: str) -> dict:
        """How a stored analysis (`flatness`, `antithetic`, `profile`, `hessian`) was computed."""
        self._require(name)
        return dict(self.attrs[name])

    def analysis_epochs(self, name: str) -> np.ndarray:
        """Epochs whose analysis `name` is complete (read without dask)."""
        self._require(name)
        return self._epochs[~self._missing(name)]

    def _missing(self, analysis: str) -> np.ndarray:
        """Per stored epoch, whether `analysis` is incomplete there (its done flag unset: see
        `layout.incomplete_rows`). Every read of analysis rows masks through this one place."""
        return layout.incomplete_rows(analysis, lambda name: self._group[name][: self._n],
                                      lambda name: name in self._group)

    def _masked(self, dataset: xr.Dataset, analyses: Sequence[str]) -> xr.Dataset:
        """`dataset` with the rows of each analysis's arrays set to NaN where that analysis is incomplete."""
        import xarray as xr

        for analysis in analyses:
            complete = xr.DataArray(~self._missing(analysis), dims=schema.EPOCH_DIM)
            for name in schema.ANALYSES[analysis]:
                dataset[name] = dataset[name].where(complete)
        return dataset

    def _read(self, analysis: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Small arrays of an analysis read without dask, rows of incomplete epochs set to NaN."""
        self._require(analysis)
        missing = self._missing(analysis)
        out = {}
        for name in names:
            values = np.array(self._group[name][: self._n], dtype=np.float64)
            values[missing] = np.nan
            out[name] = values
        return out

    def flatness_summary(self, threshold: float = 0.1) -> dict[str, np.ndarray]:
        """Per-epoch summaries of the stored distribution (mean, median, max, std, p10, p90, flatness ratio).

        `flatness_ratio` is the fraction of directions whose loss rises by less than `threshold`
        times the baseline (see `geostore.analysis.flatness_stats.flatness_summary`).
        """
        from geostore.analysis.flatness_stats import flatness_summary

        rows = self._read("flatness", ["baseline_loss", "delta_losses"])  # small: read without dask
        return flatness_summary(rows["baseline_loss"], rows["delta_losses"], threshold)

    def curvature_summary(self, threshold: float = 0.1) -> dict[str, np.ndarray]:
        """Per-epoch summaries of the antithetic curvature, as `flatness_summary` gives for the one-sided
        deltas, with its standard error, the slope's mean and RMS, and the Hessian trace it estimates
        (`2 D / ε²` times the mean curvature, D the trainable parameter count) with that estimate's standard
        error (see `geostore.analysis.flatness_stats.curvature_summary`). Needs flatness for the baseline."""
        from geostore.analysis.flatness_stats import curvature_summary

        rows = self._read("antithetic", ["curvature", "slope"])
        baseline = (self._read("flatness", ["baseline_loss"])["baseline_loss"] if "flatness" in self.analyses()
                    else np.full(self._n, np.nan))
        epsilon = float(self.attrs["antithetic"]["epsilon"])
        return curvature_summary(baseline, rows["curvature"], rows["slope"], epsilon=epsilon,
                                 n_params=self.n_trainable, threshold=threshold)

    def curvature_profile(self) -> dict[str, np.ndarray]:
        """The multi-epsilon profile: `(n_epoch, n_epsilon)` float64 arrays, NaN rows where not computed.

        `epsilon`: the perturbation lengths used at each epoch (the settings' values, times the epoch's
        weight norm when they are relative); `mean_curvature` and `curvature_stderr`: the antithetic curvature
        averaged over the flatness directions and its standard error; `normalised_curvature` and
        `normalised_stderr`: the same times `2 / ε²`, an estimate of `Tr(H) / D` at each scale (constant
        while the loss is quadratic at that scale); `flatness_ratio`: the one-sided flatness ratio at each
        epsilon. `factors` `(n_epsilon,)` are the settings' values.
        """
        rows = self._read("profile", ["profile_curvature", "profile_curvature_stderr", "profile_flatness_ratio",
                                      "profile_epsilon"])
        epsilon = rows["profile_epsilon"]
        scale = 2.0 / np.square(epsilon)
        return {
            "epsilon": epsilon, "factors": np.asarray(self.attrs["profile"]["epsilons"], dtype=np.float64),
            "mean_curvature": rows["profile_curvature"], "curvature_stderr": rows["profile_curvature_stderr"],
            "normalised_curvature": scale * rows["profile_curvature"],
            "normalised_stderr": scale * rows["profile_curvature_stderr"],
            "flatness_ratio": rows["profile_flatness_ratio"],
        }

    @property
    def n_trainable(self) -> int:
        """Numbers in the trainable parameters (the vector flatness and curvature are measured over)."""
        return self.table.n_trainable()

    def _require(self, analysis: str) -> None:
        if analysis not in self.analyses():
            raise StoreError(f"{self.path}: no {analysis} stored (run `geostore flatness {self.path}"
                             f"{ADD_OPTIONS[analysis]}`)")

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
    ) -> xr.Dataset:
        """Exact PCA of a group's trajectory, equal to scikit-learn's `PCA` on the float64 matrix up to sign.

        Returns a Dataset: `projections` over (`epoch`, `component`), `explained_variance_ratio` and
        `explained_variance` over `component` (1 for PC1, ...), a boolean `fit` coordinate over `epoch` marking
        the fit epochs, and with `loadings=True` the unit `components` over (`component`, `weight`) as a lazy
        dask array (`weight` runs over `flatten(group)`'s columns). Centred over the fit epochs: all epochs, an
        inclusive `(start, stop)` tuple, or a sequence of stored epochs; every epoch is projected. Each
        component's sign makes its largest-magnitude fit projection positive. Computed out of core from the
        Gram matrix of the epochs (panels of at most `memory_budget` bytes per process, default 1 GiB) and
        cached in the store, so reopening is instant and new epochs cost only their own rows (see
        `geostore.store.derived`).
        """
        from geostore.store import derived

        return derived.pca(self, group, n_components, fit_epochs=fit_epochs, loadings=loadings,
                           memory_budget=memory_budget)

    def velocity(self, group: str | Sequence[str] = "all", *, per_epoch: bool = False,
                 memory_budget: int | None = None) -> xr.DataArray:
        """REQ_029's velocity of a group: `||theta[i+1] - theta[i]||` for each step between consecutive stored
        epochs, exact, from the same cached pass as `pca`.

        A DataArray over the `epoch` that ends each step (the later epoch: `epochs[1:]`), with the step's first
        epoch as the `from_epoch` coordinate. `per_epoch=True` divides each step by its epoch gap: the rate per
        epoch of training, comparable across unevenly spaced checkpoints.
        """
        from geostore.store import derived

        return derived.velocity(self, group, per_epoch=per_epoch, memory_budget=memory_budget)

    def velocities(self, *, per_epoch: bool = False, memory_budget: int | None = None) -> xr.Dataset:
        """`velocity` of `all` and of each group of the family's partition of it (`embedding`, `attention`,
        `mlp`, ...) as the variables of one Dataset, computed in one pass."""
        from geostore.store import derived

        return derived.velocities(self, per_epoch=per_epoch, memory_budget=memory_budget)

    # ------------------------------------------------------------------------------------ weights
    def histograms(self, name_or_group: str | Sequence[str] = "all", bins: int = 64) -> xr.DataArray:
        """Per-epoch histograms of a parameter's or a group's values, over `bins` equal bins fixed for the run
        (spanning the run-wide min and max), so epochs compare bin by bin.

        A DataArray `counts` over (`epoch`, `bin`): `bin` holds the bin centres, `bin_low` and `bin_high` the
        edges (all `bins + 1` in `attrs["edges"]`); row `i` equals `numpy.histogram(values_i, bins=edges)`.
        Computed out of core (one pass for the extremes, one to count) and cached in the store: new epochs
        cost their own rows while they stay inside the cached range (see `geostore.store.weights`).
        """
        from geostore.store import weights

        return weights.histograms(self, name_or_group, bins)

    def spectrum(self, name: str) -> xr.Dataset:
        """Singular values of a weight matrix at every epoch and their participation ratio `(sum s)^2 / sum s^2`
        (REQ_030's effective dimensionality: 1 at rank 1, n for n equal singular values).

        `name` is a parameter (or `name[l]`, one layer): its last two axes are the matrix, axes before them a
        batch of matrices (`layer`, `head`). A Dataset with `singular_values` over (`epoch`, *batch,
        `singular_index`) (descending, 1 the largest) and `participation_ratio` over (`epoch`, *batch).
        StoreError for a group or a parameter without two axes per layer (biases).
        """
        from geostore.store import weights

        return weights.spectrum(self, name)

    @property
    def matrices(self) -> tuple[str, ...]:
        """Parameters with a `spectrum`: two axes or more per layer (weight matrices, per-head ones included)."""
        from geostore.store import weights

        return weights.matrices(self)

    def loss_plane(self, group: str | Sequence[str] = "all") -> xr.Dataset:
        """The stored loss on the plane of a group's PC1 and PC2 through the PCA origin (`geostore plane`).

        A Dataset: `loss` over (`pc1`, `pc2`), the grid's coordinates in the units of the trajectory's PC scores
        (NaN in rows not computed yet); the trajectory in the same basis, `projections` over (`epoch`,
        `component`), and the two components' `explained_variance_ratio`; `attrs` the settings (`resolution`,
        `span`, `dtype`, `fit_epochs`, ...), `complete_rows`, and `stale`: True when epochs were added since
        the basis was fitted. StoreError, naming the command that adds it, when the store has none.
        """
        from geostore.store import plane

        return plane.loss_plane(self, group)

    def planes(self) -> list[str]:
        """The groups whose loss planes the store holds (`loss_plane`)."""
        from geostore.store import plane

        return plane.names(self.location)

    # ---------------------------------------------------------------------------------- protocol
    def changed(self) -> bool:
        """Whether the store holds a newer commit than the one this handle reads: one read of the root `zarr.json`,
        what a follower does each time before it pays for `reopen`."""
        try:
            return self.location.read_bytes(layout.ROOT_META) != self._group.store.root_bytes
        except FileNotFoundError:
            return True

    def reopen(self) -> Store:
        """A new handle on the store's latest commit; this one keeps reading the commit it opened. How a follower
        (`geoview --follow`, `geostore flatness --follow`) sees the epochs written since: one read of the root
        `zarr.json` and of the epoch axis."""
        return type(self)(self.location, families=self._families)

    def close(self) -> None:
        """Release the handle (a no-op for local stores; kept for the context-manager protocol)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> object:
        """The names `analysis(name)` replaced, kept for one release with a DeprecationWarning."""
        if name not in _DEPRECATED:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        replacement, get = _DEPRECATED[name]
        warnings.warn(f"Store.{name} is deprecated and will be removed in the next release: use {replacement}",
                      DeprecationWarning, stacklevel=2)
        return get(self)

    def __repr__(self) -> str:
        span = f"{self._epochs[0]}..{self._epochs[-1]}" if self._n else "none"
        return f"<geostore.Store {str(self.path)!r}: {self._n} epochs ({span})>"


def _deprecated_array(analysis: str, name: str) -> tuple[str, Callable[[Store], da.Array]]:
    return f"store.analysis({analysis!r})[{name!r}]", lambda store: store.analysis(analysis)[name].data


# Old name -> (what replaces it, how to get the old value from the new API).
_DEPRECATED: dict[str, tuple[str, Callable[[Store], object]]] = {
    **{name: _deprecated_array(analysis, name) for analysis, name in (
        ("flatness", "baseline_loss"), ("flatness", "delta_losses"), ("antithetic", "curvature"),
        ("antithetic", "slope"), ("hessian", "hessian_trace"), ("hessian", "hessian_trace_stderr"),
        ("hessian", "top_eigenvalue"), ("hessian", "top_eigenvalue_residual"))},
    "flatness_settings": ("store.analysis_settings('flatness')", lambda store: store.analysis_settings("flatness")),
    "flatness_epochs": ("store.analysis_epochs('flatness')",
                        lambda store: functools.partial(store.analysis_epochs, "flatness")),
}
