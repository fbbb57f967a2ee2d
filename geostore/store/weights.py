"""Weights over time: per-epoch histograms of a group's values (cached in the store) and matrix spectra.

Histograms are cached in `<store>/derived/histograms/<bins>-<digest>.npz` (the digest names the group's
members; the file lists them), beside the trajectory cache of `geostore.store.derived` and under the
same rules: never listed by the commit record, written under a temporary name and renamed, keyed by
epoch values, silently not written when the store is read-only. A file holds each epoch's min and max
and its counts over the bins of the cached run-wide range. After epochs are added only their extremes
are read; when they stay inside that range only their rows are counted, otherwise the bins move and
every epoch is counted again: either way the result equals a fresh computation.

Spectra are computed on every call (one read of one parameter, SVDs of small matrices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.store.derived import DERIVED, read_cache, write_cache
from geostore.store.schema import EPOCH_DIM as EPOCH

if TYPE_CHECKING:
    import xarray as xr

    from geostore.family.base import Parameter
    from geostore.store.reader import Store

HISTOGRAMS = "histograms"
BIN = "bin"
SINGULAR_INDEX = "singular_index"  # 1 for the largest singular value, ...
# Leading (batch) axes of a matrix parameter as the spectrum names them; other axes keep the table's name.
BATCH_DIMS = {"n_heads": "head"}


def _key(names: tuple[str, ...], bins: int) -> str:
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
    return f"{DERIVED}/{HISTOGRAMS}/{bins}-{digest}.npz"


def _load(store: Store, names: tuple[str, ...], bins: int) -> dict[str, np.ndarray] | None:
    """The cached `epochs`, `extremes` `(n, 2)`, `span` `(2,)` and `counts` `(n, bins)`, or None when absent,
    unreadable or inconsistent."""
    cached = read_cache(store.location, _key(names, bins), ("epochs", "extremes", "span", "counts"), names)
    if cached is None:
        return None
    n = cached["epochs"].size
    if (cached["extremes"].shape != (n, 2) or cached["counts"].shape != (n, bins)
            or cached["span"].shape != (2,) or np.any(np.diff(cached["epochs"]) <= 0)):
        return None
    return cached


def _save(store: Store, names: tuple[str, ...], bins: int, **arrays: np.ndarray) -> None:
    """Write the cache (see `derived.write_cache`)."""
    write_cache(store.location, _key(names, bins), names, **arrays)


def histograms(store: Store, group: str | Sequence[str], bins: int = 64) -> xr.DataArray:
    """Counts of a group's values per epoch over bins fixed for the run (see `Store.histograms`)."""
    import xarray as xr

    from geostore.analysis.weights import bin_edges, extremes, histogram_rows

    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise StoreError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    names = store.resolve(group)
    epochs = store.epochs
    n = epochs.size
    if n == 0:
        raise StoreError(f"{store.path}: no epochs stored")
    arrays = [store.member(name) for name in names]
    cached = _load(store, names, bins)
    known = np.zeros(n, dtype=bool)
    extreme = np.full((n, 2), np.nan)
    counts = np.zeros((n, bins), dtype=np.int64)
    if cached is not None and np.isin(cached["epochs"], epochs).all():
        old = np.searchsorted(epochs, cached["epochs"])
        known[old] = True
        extreme[old] = cached["extremes"]
        counts[old] = cached["counts"]
    new = np.flatnonzero(~known)
    if new.size:
        extreme[new] = np.column_stack(extremes(arrays, new))
    span = np.array([extreme[:, 0].min(), extreme[:, 1].max()])
    if not np.isfinite(span).all():
        raise StoreError(f"{store.path}: {group!r} holds values that are not finite: no histogram")
    edges = bin_edges(span[0], span[1], bins)
    recount = new if cached is not None and np.array_equal(span, cached["span"]) else np.arange(n)
    if recount.size:
        counts[recount] = histogram_rows(arrays, recount, edges)
        _save(store, names, bins, epochs=epochs, extremes=extreme, span=span, counts=counts)
    return xr.DataArray(
        counts, dims=(EPOCH, BIN), name="counts",
        coords={EPOCH: epochs.copy(), BIN: (edges[:-1] + edges[1:]) / 2,
                "bin_low": (BIN, edges[:-1]), "bin_high": (BIN, edges[1:])},
        attrs={"group": group if isinstance(group, str) else list(group), "members": list(names),
               "bins": bins, "edges": edges})


def matrix_dims(store: Store, name: str) -> tuple[str, ...]:
    """The batch dims before the matrix of `name` (a parameter or `name[l]`): the table's dims, `n_heads` as
    `head`; StoreError when a layer of it has fewer than two axes (no matrix, no spectrum)."""
    base, _, layer = name.partition("[")
    if base not in store.table.names:
        store.resolve(name)  # the error naming the choices
        raise StoreError(f"{store.path}: {name!r} is a group; a spectrum needs one parameter")
    parameter = store.table[base]
    if not _has_matrix(parameter):
        raise StoreError(f"{store.path}: {name} has shape {parameter.shape}: a spectrum needs a matrix "
                         "(two axes per layer)")
    dims = parameter.dims[1:] if layer else parameter.dims
    return tuple(BATCH_DIMS.get(d, d) for d in dims[:-2])


def _has_matrix(parameter: Parameter) -> bool:
    """Whether a parameter has two axes or more per layer: a matrix, or a batch of them."""
    return len(parameter.shape) - (1 if parameter.layered else 0) >= 2


def matrices(store: Store) -> tuple[str, ...]:
    """The parameters that have a spectrum, in the table's order (see `Store.matrices`)."""
    return tuple(name for name in store.table.names if _has_matrix(store.table[name]))


def spectrum(store: Store, name: str) -> xr.Dataset:
    """Singular values and participation ratio of a weight matrix at every epoch (see `Store.spectrum`)."""
    import xarray as xr

    from geostore.analysis.weights import participation_ratio, spectrum

    batch = matrix_dims(store, name)
    values = spectrum(store.member(name))
    coords = {EPOCH: store.epochs.copy(), SINGULAR_INDEX: np.arange(1, values.shape[-1] + 1),
              **{dim: np.arange(size) for dim, size in zip(batch, values.shape[1:-1], strict=True)}}
    return xr.Dataset(
        {"singular_values": ((EPOCH, *batch, SINGULAR_INDEX), values),
         "participation_ratio": ((EPOCH, *batch), participation_ratio(values))},
        coords=coords, attrs={"parameter": name, "matrix_shape": list(store.member(name).shape[-2:])})
