"""Runs of a sweep compared: trajectories in one shared PCA basis, the distance between two runs over their common
epochs, and the distances between all runs at one epoch.

Shared basis: one exact PCA fitted on the union of the chosen runs' epochs, every run projected on it, from the
Gram matrix of all their rows (`geostore.analysis.trajectory`: the same out-of-core pass as a single run, over
the runs' arrays laid end to end). It is cached per unit (see `derived.units_of`) under the sweep's
`derived/shared/<unit>.npz`, keyed by (run, epoch) rows, beside the runs and never in any run's commit record;
when runs or epochs are added only the new rows' Gram entries are computed (one pass over the old chunks).
Written atomically; a sweep that cannot be written is computed every time. Like the single-run cache it trusts
that a committed epoch's weights never change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.store.derived import COMPONENT, DEFAULT_MEMORY_BUDGET, DERIVED, read_cache, units_of, write_cache
from geostore.store.schema import EPOCH_DIM as EPOCH

if TYPE_CHECKING:
    import xarray as xr

    from geostore.store.reader import Store
    from geostore.store.sweep import Sweep

SHARED = "shared"
RUN = "run"


def _stores(sweep: Sweep, runs: Sequence[str] | None) -> dict[str, Store]:
    """The chosen runs (default: all) as Stores; StoreError for an unknown run or runs of different models."""
    names = list(sweep.runs if runs is None else runs)
    if not names:
        raise StoreError(f"{sweep.path}: no runs to compare")
    unknown = [n for n in names if n not in sweep.runs]
    if unknown:
        raise StoreError(f"{sweep.path}: no run {unknown[0]!r} (runs: {', '.join(sweep.runs)})")
    stores = {n: sweep[n] for n in names}
    first, shapes = names[0], stores[names[0]].param_shapes()
    for name, store in stores.items():
        if store.param_shapes() != shapes:
            raise StoreError(f"{sweep.path}: runs {first!r} and {name!r} hold different models (parameter shapes "
                             "differ); compare runs of one model")
    return stores


def _key(unit: str) -> str:
    return f"{DERIVED}/{SHARED}/{unit}.npz"


def _cached(sweep: Sweep, unit: str, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A unit's cached (runs, epochs, gram) rows, or None when absent, unreadable or inconsistent."""
    cached = read_cache(sweep.location, _key(unit), ("runs", "epochs", "gram"), names)
    if cached is None:
        return None
    runs, epochs, gram = cached["runs"].astype(str), cached["epochs"].astype(np.int64), cached["gram"]
    if gram.shape != (runs.size, runs.size) or epochs.size != runs.size:
        return None
    return runs, epochs, gram


def shared_gram(sweep: Sweep, stores: dict[str, Store], names: Sequence[str],
                memory_budget: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(runs, epochs, gram)`: one row per (run, epoch) of `stores` (run-major, epochs ascending) and the float64
    Gram matrix of their flattened parameters `names`, cache first."""
    from geostore.analysis.trajectory import trajectory_pass

    runs = np.concatenate([np.full(s.epochs.size, r, dtype=object) for r, s in stores.items()]).astype(str)
    epochs = np.concatenate([s.epochs for s in stores.values()]).astype(np.int64)
    n = runs.size
    total = np.zeros((n, n))
    first = next(iter(stores.values()))
    for unit, unit_names in units_of(first, names).items():
        gram, known = np.zeros((n, n)), np.zeros(n, dtype=bool)
        cached = _cached(sweep, unit, unit_names)
        if cached is not None:
            where = {(r, e): i for i, (r, e) in enumerate(zip(*cached[:2], strict=True))}
            old = np.array([where.get((r, e), -1) for r, e in zip(runs, epochs, strict=True)])
            known = old >= 0
            rows = np.flatnonzero(known)
            gram[np.ix_(rows, rows)] = cached[2][np.ix_(old[known], old[known])]
        if not known.all():
            import dask.array as da

            arrays = [da.concatenate([s.member(p) for s in stores.values()], axis=0) for p in unit_names]
            new = trajectory_pass({unit: arrays}, np.flatnonzero(~known), np.array([], dtype=np.int64),
                                  memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
            rows = np.flatnonzero(~known)
            gram[rows] = new[unit].gram[rows]
            gram[:, rows] = new[unit].gram[:, rows]
            write_cache(sweep.location, _key(unit), unit_names, runs=runs.astype(str), epochs=epochs, gram=gram)
        total += gram
    return runs, epochs, total


def shared_pca(sweep: Sweep, group: str | Sequence[str] = "all", n_components: int = 3, *,
               runs: Sequence[str] | None = None, fit_runs: Sequence[str] | None = None,
               fit_epochs: tuple[int, int] | Sequence[int] | None = None,
               memory_budget: int | None = None) -> xr.Dataset:
    """One PCA fitted on the union of the fit runs' (default: the chosen runs') fit epochs (an inclusive
    `(start, stop)` range or a list; default all), every chosen run projected on it: a Dataset with `projections`
    over (`run`, `epoch`, `component`) (NaN where a run lacks an epoch) and `explained_variance(_ratio)` over
    `component`. Exact (scikit-learn's PCA on the concatenated float64 rows, up to sign), out of core, cached."""
    import xarray as xr

    from geostore.analysis.trajectory import pca_from_gram

    stores = _stores(sweep, runs)
    fitting = list(stores) if fit_runs is None else list(fit_runs)
    outside = [r for r in fitting if r not in stores]
    if outside:
        raise StoreError(f"fit_runs: {outside[0]!r} is not among the runs compared ({', '.join(stores)})")
    names = next(iter(stores.values())).resolve(group)
    row_runs, row_epochs, gram = shared_gram(sweep, stores, names, memory_budget)
    fit = np.isin(row_runs, fitting)
    if fit_epochs is not None:
        if isinstance(fit_epochs, tuple) and len(fit_epochs) == 2:
            fit &= (row_epochs >= fit_epochs[0]) & (row_epochs <= fit_epochs[1])
        else:
            fit &= np.isin(row_epochs, np.asarray(fit_epochs, dtype=np.int64))
    m = int(fit.sum())
    if m < 2:
        raise StoreError(f"{sweep.path}: a shared PCA needs at least 2 fit epochs, got {m}")
    width = sum(int(np.prod(next(iter(stores.values())).member(p).shape[1:])) for p in names)
    if not 1 <= n_components <= min(m, width):
        raise StoreError(f"n_components must be between 1 and {min(m, width)} here, got {n_components}")
    result = pca_from_gram(gram, n_components, np.flatnonzero(fit))
    all_epochs = np.unique(row_epochs)
    projections = np.full((len(stores), all_epochs.size, n_components), np.nan)
    run_index = {r: i for i, r in enumerate(stores)}
    for row, (r, e) in enumerate(zip(row_runs, row_epochs, strict=True)):
        projections[run_index[r], np.searchsorted(all_epochs, e)] = result.projections[row]
    fitted = np.zeros((len(stores), all_epochs.size), dtype=bool)
    for row in np.flatnonzero(fit):
        fitted[run_index[row_runs[row]], np.searchsorted(all_epochs, row_epochs[row])] = True
    return xr.Dataset(
        {"projections": ((RUN, EPOCH, COMPONENT), projections),
         "explained_variance_ratio": (COMPONENT, result.explained_variance_ratio),
         "explained_variance": (COMPONENT, result.explained_variance)},
        coords={RUN: list(stores), EPOCH: all_epochs, COMPONENT: np.arange(1, n_components + 1),
                "fit": ((RUN, EPOCH), fitted)},
        attrs={"group": group if isinstance(group, str) else list(group), "members": list(names),
               "fit_runs": fitting})


def divergence(sweep: Sweep, run_a: str, run_b: str, group: str | Sequence[str] = "all", *,
               per_parameter: bool = False) -> xr.Dataset:
    """`||theta_a(e) - theta_b(e)||` over the epochs both runs hold (`distance`), and relative to run_a's norm
    (`relative`); with `per_parameter`, also both per parameter (`distance_per_parameter`, `relative_per_parameter`
    over (`epoch`, `parameter`)). One pass over the two runs' chunks of those epochs, float64."""
    import dask
    import xarray as xr

    stores = _stores(sweep, [run_a, run_b])
    a, b = stores[run_a], stores[run_b]
    epochs = np.intersect1d(a.epochs, b.epochs)
    if not epochs.size:
        raise StoreError(f"{sweep.path}: runs {run_a!r} and {run_b!r} share no epoch")
    ia, ib = np.searchsorted(a.epochs, epochs), np.searchsorted(b.epochs, epochs)
    names = a.resolve(group)
    sums = []
    for name in names:
        x, y = a.member(name)[ia].astype(np.float64), b.member(name)[ib].astype(np.float64)
        axes = tuple(range(1, x.ndim))
        sums.append((((x - y) ** 2).sum(axis=axes), (x**2).sum(axis=axes)))
    (computed,) = dask.compute(sums)
    squared = np.array([c[0] for c in computed])  # (parameter, epoch)
    norms = np.array([c[1] for c in computed])
    distance, norm = np.sqrt(squared.sum(axis=0)), np.sqrt(norms.sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        data = {"distance": (EPOCH, distance), "relative": (EPOCH, distance / norm)}
        if per_parameter:
            data["distance_per_parameter"] = ((EPOCH, "parameter"), np.sqrt(squared).T)
            data["relative_per_parameter"] = ((EPOCH, "parameter"), np.sqrt(squared / norms).T)
    coords = {EPOCH: epochs, **({"parameter": list(names)} if per_parameter else {})}
    return xr.Dataset(data, coords=coords, attrs={"run_a": run_a, "run_b": run_b,
                                                  "group": group if isinstance(group, str) else list(group)})


def distances(sweep: Sweep, epoch: int, group: str | Sequence[str] = "all", *,
              runs: Sequence[str] | None = None) -> xr.DataArray:
    """Pairwise `||theta_r(epoch) - theta_s(epoch)||` of the runs holding `epoch` (default: all runs), a (`run`,
    `other`) DataArray. Exact differences (not through norms, which would cancel for nearby runs), one parameter
    at a time in float64, so memory is the runs times the largest parameter."""
    import xarray as xr

    stores = {r: s for r, s in _stores(sweep, runs).items() if epoch in s.epochs}
    if len(stores) < 2:
        raise StoreError(f"{sweep.path}: fewer than two runs hold epoch {epoch}")
    squared = np.zeros((len(stores), len(stores)))
    for name in next(iter(stores.values())).resolve(group):
        block = np.stack([np.asarray(s.member(name)[s.index_of(epoch)], dtype=np.float64).ravel()
                          for s in stores.values()])
        for i in range(len(block)):
            squared[i] += ((block - block[i]) ** 2).sum(axis=1)
    return xr.DataArray(np.sqrt(squared), dims=(RUN, "other"), name="distance",
                        coords={RUN: list(stores), "other": list(stores)},
                        attrs={"epoch": int(epoch), "group": group if isinstance(group, str) else list(group)})
