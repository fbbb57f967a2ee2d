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

if TYPE_CHECKING:
    from geostore.analysis.trajectory import TrajectoryPass
    from geostore.store.reader import Store

DERIVED = "derived"
TRAJECTORY = "trajectory"
# Bytes of panels a trajectory pass may hold per process: a paper-size run (400 x 226,048) is read once.
DEFAULT_MEMORY_BUDGET = 2**30


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


def _key(unit: str) -> str:
    return f"{DERIVED}/{TRAJECTORY}/{unit}.npz"


def _load(store: Store, unit: str, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A unit's cached (epochs, gram, steps2), or None when absent, unreadable or inconsistent."""
    try:
        with np.load(io.BytesIO(store.location.read_bytes(_key(unit))), allow_pickle=False) as data:
            epochs, gram, steps2 = data["epochs"], data["gram"], data["steps2"]
            cached_names = tuple(str(n) for n in data["names"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    n = epochs.size
    if (cached_names != names or gram.shape != (n, n) or steps2.shape != (max(n - 1, 0),)
            or np.any(np.diff(epochs) <= 0)):
        return None
    return epochs.astype(np.int64), gram, steps2


def _save(store: Store, unit: str, names: tuple[str, ...], result: TrajectoryPass) -> None:
    """Write a unit's cache atomically; skipped silently when the store cannot be written."""
    if not store.location.writable():
        return
    buffer = io.BytesIO()
    np.savez(buffer, epochs=store.epochs, gram=result.gram, steps2=result.steps2, names=np.array(names))
    with contextlib.suppress(OSError):
        store.location.write_atomic(_key(unit), buffer.getvalue())


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
                                 memory_budget=memory_budget or DEFAULT_MEMORY_BUDGET)
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
) -> dict:
    """PCA of a group's trajectory (see `Store.pca`)."""
    from geostore.analysis.trajectory import components, pca_from_gram

    names = store.resolve(group)
    fit = _fit_rows(store.epochs, fit_epochs)
    width = sum(int(np.prod(store.member(n).shape[1:])) for n in names)
    m = store.epochs.size if fit is None else fit.size
    if not 1 <= n_components <= min(m, width):
        raise StoreError(f"n_components must be between 1 and {min(m, width)} here, got {n_components}")
    if m < 2:
        raise StoreError(f"{store.path}: PCA needs at least 2 (fit) epochs, got {m}")
    result = pca_from_gram(_summed(unit_passes(store, names, memory_budget)).gram, n_components, fit)
    out = {
        "projections": result.projections,
        "explained_variance_ratio": result.explained_variance_ratio,
        "explained_variance": result.explained_variance,
        "epochs": store.epochs.copy(),
    }
    if loadings:
        out["components"] = components(store.flatten(names), result)
    return out


def velocity(store: Store, group: str | Sequence[str] = "all", *, per_epoch: bool = True,
             memory_budget: int | None = None) -> np.ndarray:
    """Step lengths of a group between consecutive epochs (see `Store.velocity`)."""
    from geostore.analysis.trajectory import velocity as from_steps

    steps2 = _summed(unit_passes(store, store.resolve(group), memory_budget)).steps2
    return from_steps(steps2, store.epochs, per_epoch=per_epoch)


def velocities(store: Store, *, per_epoch: bool = True, memory_budget: int | None = None) -> dict[str, np.ndarray]:
    """Velocity of `all` and of each group of the store's partition of it, from one pass (see
    `Store.velocities`)."""
    from geostore.analysis.trajectory import velocity as from_steps

    passes = unit_passes(store, store.groups["all"], memory_budget)
    out = {"all": from_steps(_summed(passes).steps2, store.epochs, per_epoch=per_epoch)}
    out.update({g: from_steps(passes[g].steps2, store.epochs, per_epoch=per_epoch) for g in store.table.partition()})
    return out
