"""Trajectory PCA and velocity of a store, with their Gram matrices and steps cached inside the store.

The cache lives in `<store>/derived/trajectory/<unit>.npz`, which the root `zarr.json` (the commit
record) never lists and the writer never touches, so `xarray.open_zarr` and later ingests ignore it. A
unit is a set of parameters: the standard groups `embedding`, `attention` and `mlp` (whose union is
`all`, so one pass serves all four) or the rest of a custom list. A unit's file holds its epochs, its
float64 Gram matrix and its squared steps; it is written under a temporary name and renamed, so a file
that exists is whole and a half-written one is a `.partial` leftover that is never read (the writer's
recovery removes it). Keyed by epoch values, not positions: after epochs are appended or inserted the
update computes only the Gram rows of the new epochs (one pass over the old chunks) and the steps next
to them, and equals a full recomputation. Any component count and fit window derive from the cached Gram
matrix in milliseconds. A store that cannot be written is computed every time, silently.

The cache trusts that a committed epoch's weights never change (the writer only adds epochs); a store
rebuilt under the same path starts from an empty folder, which drops the cache with it.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.store.schema import EPOCH_DIM as EPOCH

if TYPE_CHECKING:
    import xarray as xr

    from geostore.analysis.trajectory import TrajectoryPass
    from geostore.store.location import Location
    from geostore.store.reader import Store

DERIVED = "derived"
TRAJECTORY = "trajectory"
# Bytes of panels a trajectory pass may hold per process: a paper-size run (400 x 226,048) is read once.
DEFAULT_MEMORY_BUDGET = 2**30
COMPONENT = "component"  # the dimension of principal components in PCA results (1 for PC1, ...)


def units_of(store: Store, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Split group members into cache units: whole groups of the store's partition of `all` (embedding,
    attention, mlp, ...), then the rest as one unit."""
    rest = list(names)
    units = {}
    for group, members in store.table.partition().items():
        if set(members) <= set(rest):
            units[group] = members
            rest = [n for n in rest if n not in members]
    if rest:
        units["+".join(sorted(rest))] = tuple(sorted(rest))
    return units


def read_cache(location: Location, key: str, fields: Sequence[str], names: tuple[str, ...]
               ) -> dict[str, np.ndarray] | None:
    """The arrays `fields` of the cache file `key` (npz) written for parameters `names`, or None when it is absent,
    unreadable, lacks a field or was written for other parameters. Caches of derived results (the trajectory's,
    a sweep's shared basis, the weight histograms) share this; each checks its own shapes."""
    try:
        with np.load(io.BytesIO(location.read_bytes(key)), allow_pickle=False) as data:
            arrays = {field: data[field] for field in fields}
            cached_names = tuple(str(n) for n in data["names"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return arrays if cached_names == names else None


def write_cache(location: Location, key: str, names: tuple[str, ...], **arrays: np.ndarray) -> None:
    """Write a cache file (npz of `arrays` and the parameter `names`) atomically: readers see the old file or the
    new one. Skipped silently where the location cannot be written: a cache is an optimisation."""
    if not location.writable():
        return
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array(names), **arrays)
    with contextlib.suppress(OSError):
        location.write_atomic(key, buffer.getvalue())


def _key(unit: str) -> str:
    return f"{DERIVED}/{TRAJECTORY}/{unit}.npz"


def _load(store: Store, unit: str, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A unit's cached (epochs, gram, steps2), or None when absent, unreadable or inconsistent."""
    cached = read_cache(store.location, _key(unit), ("epochs", "gram", "steps2"), names)
    if cached is None:
        return None
    epochs, gram, steps2 = cached["epochs"], cached["gram"], cached["steps2"]
    n = epochs.size
    if gram.shape != (n, n) or steps2.shape != (max(n - 1, 0),) or np.any(np.diff(epochs) <= 0):
        return None
    return epochs.astype(np.int64), gram, steps2


def _save(store: Store, unit: str, names: tuple[str, ...], result: TrajectoryPass) -> None:
    """Write a unit's cache (see `write_cache`)."""
    write_cache(store.location, _key(unit), names, epochs=store.epochs, gram=result.gram, steps2=result.steps2)


def unit_passes(store: Store, names: Sequence[str], memory_budget: int | None = None) -> dict[str, TrajectoryPass]:
    """Gram matrix and squared steps of every unit of `names` over the store's epochs, cache first."""
    from geostore.analysis.trajectory import TrajectoryPass, trajectory_pass

    epochs = store.epochs
    n = epochs.size
    done, todo = {}, {}
    for unit, unit_names in units_of(store, names).items():
        cached = _load(store, unit, unit_names)
        known = np.zeros(n, dtype=bool)
        result = TrajectoryPass(np.zeros((n, n)), np.full(max(n - 1, 0), np.nan))
        if cached is not None and np.isin(cached[0], epochs).all():
            old = np.searchsorted(epochs, cached[0])
            known[old] = True
            result.gram[np.ix_(old, old)] = cached[1]
            kept = np.flatnonzero(np.diff(old) == 1)  # steps between epochs still adjacent
            result.steps2[old[kept]] = cached[2][kept]
        if known.all():
            done[unit] = result
        else:
            todo.setdefault(known.tobytes(), []).append((unit, unit_names, result))
    for key, units in todo.items():
        known = np.frombuffer(key, dtype=bool)
        rows = np.flatnonzero(~known)
        steps = np.flatnonzero(~known[:-1] | ~known[1:])
        passes = trajectory_pass({u: [store.member(p) for p in ns] for u, ns, _ in units}, rows, steps,
                                 memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
        for unit, unit_names, result in units:
            new = passes[unit]
            result.gram[rows] = new.gram[rows]
            result.gram[:, rows] = new.gram[:, rows]
            result.steps2[steps] = new.steps2[steps]
            _save(store, unit, unit_names, result)
            done[unit] = result
    return done


def _summed(passes: dict[str, TrajectoryPass]) -> TrajectoryPass:
    from geostore.analysis.trajectory import TrajectoryPass

    return TrajectoryPass(sum(p.gram for p in passes.values()), sum(p.steps2 for p in passes.values()))


def _fit_rows(epochs: np.ndarray, fit_epochs: tuple[int, int] | Sequence[int] | None) -> np.ndarray | None:
    """Positions of the fit epochs: a `(start, stop)` tuple is an inclusive range, any other sequence lists them."""
    if fit_epochs is None:
        return None
    if isinstance(fit_epochs, tuple) and len(fit_epochs) == 2:
        start, stop = fit_epochs
        return np.flatnonzero((epochs >= start) & (epochs <= stop))
    wanted = np.unique(np.asarray(fit_epochs, dtype=np.int64))
    missing = np.setdiff1d(wanted, epochs)
    if missing.size:
        raise StoreError(f"fit epochs {missing[:5].tolist()} are not stored")
    return np.searchsorted(epochs, wanted)


def pca(
    store: Store,
    group: str | Sequence[str] = "all",
    n_components: int = 3,
    *,
    fit_epochs: tuple[int, int] | Sequence[int] | None = None,
    loadings: bool = False,
    memory_budget: int | None = None,
) -> xr.Dataset:
    """PCA of a group's trajectory as a labelled Dataset (see `Store.pca`)."""
    import xarray as xr

    from geostore.analysis.trajectory import components, pca_from_gram

    names = store.resolve(group)
    epochs = store.epochs
    fit = _fit_rows(epochs, fit_epochs)
    width = sum(int(np.prod(store.member(n).shape[1:])) for n in names)
    m = epochs.size if fit is None else fit.size
    if not 1 <= n_components <= min(m, width):
        raise StoreError(f"n_components must be between 1 and {min(m, width)} here, got {n_components}")
    if m < 2:
        raise StoreError(f"{store.path}: PCA needs at least 2 (fit) epochs, got {m}")
    result = pca_from_gram(_summed(unit_passes(store, names, memory_budget)).gram, n_components, fit)
    fitted = np.ones(epochs.size, dtype=bool) if fit is None else np.isin(np.arange(epochs.size), fit)
    dataset = xr.Dataset(
        {"projections": ((EPOCH, COMPONENT), result.projections),
         "explained_variance_ratio": (COMPONENT, result.explained_variance_ratio),
         "explained_variance": (COMPONENT, result.explained_variance)},
        coords={EPOCH: epochs.copy(), COMPONENT: np.arange(1, n_components + 1), "fit": (EPOCH, fitted)},
        attrs={"group": group if isinstance(group, str) else list(group), "members": list(names)})
    if loadings:
        dataset["components"] = ((COMPONENT, "weight"), components(store.flatten(names), result))
    return dataset


def velocity(store: Store, group: str | Sequence[str] = "all", *, per_epoch: bool = False,
             memory_budget: int | None = None) -> xr.DataArray:
    """Step lengths of a group between consecutive epochs, labelled by each step's later epoch (see
    `Store.velocity`)."""
    steps2 = _summed(unit_passes(store, store.resolve(group), memory_budget)).steps2
    return _labelled_velocity(store, steps2, per_epoch, group)


def velocities(store: Store, *, per_epoch: bool = False, memory_budget: int | None = None) -> xr.Dataset:
    """Velocity of `all` and of each group of the store's partition of it, from one pass (see
    `Store.velocities`)."""
    import xarray as xr

    passes = unit_passes(store, store.groups["all"], memory_budget)
    steps = {"all": _summed(passes).steps2, **{g: passes[g].steps2 for g in store.table.partition()}}
    return xr.Dataset({g: _labelled_velocity(store, s, per_epoch, g) for g, s in steps.items()},
                      attrs={"per_epoch": int(per_epoch)})


def _labelled_velocity(store: Store, steps2: np.ndarray, per_epoch: bool, group: str | Sequence[str]
                       ) -> xr.DataArray:
    """Velocities from squared steps over the epoch ending each step, `from_epoch` the one starting it."""
    import xarray as xr

    from geostore.analysis.trajectory import velocity as from_steps

    epochs = store.epochs
    unit = "per epoch of training" if per_epoch else "per checkpoint step"
    return xr.DataArray(from_steps(steps2, epochs, per_epoch=per_epoch), dims=EPOCH, name="velocity",
                        coords={EPOCH: epochs[1:].copy(), "from_epoch": (EPOCH, epochs[:-1].copy())},
                        attrs={"group": group if isinstance(group, str) else list(group), "units": unit})
