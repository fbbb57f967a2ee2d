"""The comparison viewer's data, free of Qt: the runs of a sweep on one shared epoch axis, read through the public
`geostore.Sweep` and `Store` APIs.

The axis is the union of the runs' stored epochs, so the epoch control and the docks' epoch axes work as over one
run; every per-run series is aligned to it, NaN where a run lacks an epoch (curves break there, `present` says
which runs hold an epoch). Phases are the reference run's (the first). The `load_*` methods read or compute
through the sweep (shared PCA, velocities, flatness, divergence) and may take seconds: the window runs them on its
worker thread; each caches its result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from pathlib import PurePosixPath

import numpy as np

from geostore import Store, StoreError, Sweep
from viewer.data import ANALYSIS_HELP, FLATNESS_THRESHOLD
from viewer.epoch_axis import EpochAxis

SHARED_COMPONENTS = 3
"""Principal components of the shared basis: the docks show two of these three."""


@dataclass(frozen=True)
class SharedTrajectory:
    """A group's runs in one PCA basis (`Sweep.pca`): `projections` `(n_run, n_epoch, k)` on the union axis (NaN
    where a run lacks an epoch) and the explained variance ratio of each component."""

    group: str
    runs: tuple[str, ...]
    projections: np.ndarray
    explained_variance_ratio: np.ndarray


class SweepViewerData(EpochAxis):
    """What the comparison viewer shows of a sweep; see the module docstring."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.runs = tuple(sweep.runs)
        if not self.runs:
            raise StoreError(f"{sweep.path}: a sweep without runs; add one with `geostore ingest CKPTS {sweep.path}`")
        self.stores: dict[str, Store] = {run: sweep[run] for run in self.runs}
        self.run_epochs = {run: np.asarray(s.epochs, dtype=np.int64) for run, s in self.stores.items()}
        epochs = reduce(np.union1d, self.run_epochs.values())
        if epochs.size < 2:
            raise StoreError(f"{sweep.path}: {epochs.size} epoch(s) stored; the viewer needs at least two")
        self.store = self.stores[self.runs[0]]  # the reference run: family, task, groups, phases
        super().__init__(epochs, self.store.phases())
        self.name = PurePosixPath(str(sweep.path).rstrip("/")).name
        self.unit = self.store.index_unit
        self.groups = tuple(self.store.groups)
        self.analyses = sorted({a for s in self.stores.values() for a in s.analyses()})
        self.present = {run: np.isin(self.epochs, e) for run, e in self.run_epochs.items()}
        """Per run, bool `(n_epoch,)`: which epochs of the shared axis the run holds."""
        self.metrics = {run: {name: self.align(run, values) for name, values in s.metrics().items()}
                        for run, s in self.stores.items()}
        """Per run, its recorded metrics on the shared axis."""

    def align(self, run: str, values: np.ndarray, epochs: np.ndarray | None = None) -> np.ndarray:
        """`values` given at `epochs` (default: all of `run`'s) as float64 on the shared axis, NaN elsewhere."""
        epochs = self.run_epochs[run] if epochs is None else np.asarray(epochs, dtype=np.int64)
        out = np.full(self.n_epochs, np.nan)
        out[np.searchsorted(self.epochs, epochs)] = np.asarray(values, dtype=np.float64)
        return out

    # ----------------------------------------------------------------------------- analyses
    @property
    def has_flatness(self) -> bool:
        """Whether any run holds flatness."""
        return "flatness" in self.analyses

    def flatness_runs(self) -> tuple[str, ...]:
        """The runs holding flatness."""
        return tuple(run for run, s in self.stores.items() if "flatness" in s.analyses())

    def missing(self, needs: str) -> str | None:
        """Why a dock that `needs` `metrics` or an analysis cannot show this sweep (no run has it), or None."""
        if needs == "metrics":
            return None if any(self.metrics.values()) else "No training metrics recorded by any run's sources."
        if needs in self.analyses:
            return None
        what, option = ANALYSIS_HELP[needs]
        return f"No run holds {what} — run `geostore flatness {self.sweep.path}{option}` to add it."

    def trajectory(self, group: str) -> SharedTrajectory | None:
        """The cached shared PCA of `group`, or None until `load_trajectory` ran."""
        return self._cache.get(("trajectory", group))

    def load_trajectory(self, group: str) -> SharedTrajectory:
        """Every run projected on one basis fitted on all runs' epochs of `group` (`Sweep.pca`; cached in the sweep,
        slow the first time)."""
        if group not in self.groups:
            raise StoreError(f"unknown group {group!r}; choose from {', '.join(self.groups)}")

        def compute() -> SharedTrajectory:
            fit_rows = sum(e.size for e in self.run_epochs.values())
            pca = self.sweep.pca(group, n_components=min(SHARED_COMPONENTS, fit_rows - 1), runs=self.runs)
            projections = pca["projections"].reindex(epoch=self.epochs)  # the sweep's epochs are the union already
            return SharedTrajectory(group=group, runs=self.runs,
                                    projections=np.asarray(projections.values, dtype=np.float64),
                                    explained_variance_ratio=np.asarray(pca["explained_variance_ratio"],
                                                                        dtype=np.float64))

        return self._load(("trajectory", group), compute)

    def velocities(self, per_epoch: bool) -> dict[str, np.ndarray] | None:
        """The cached velocity of `all` per run, or None until `load_velocities` ran."""
        return self._cache.get(("velocities", per_epoch))

    def load_velocities(self, per_epoch: bool) -> dict[str, np.ndarray]:
        """Per run, the velocity of all weights (`Store.velocity`) on the shared axis, each step at its later
        epoch; per epoch of training or per checkpoint step."""

        def compute() -> dict[str, np.ndarray]:
            out = {}
            for run, store in self.stores.items():
                found = store.velocity("all", per_epoch=per_epoch)
                out[run] = self.align(run, found.values, found["epoch"].values)
            return out

        return self._load(("velocities", per_epoch), compute)

    @property
    def flatness(self) -> dict[str, dict[str, np.ndarray]] | None:
        """The cached flatness summaries, or None until `load_flatness` ran."""
        return self._cache.get(("flatness",))

    def load_flatness(self) -> dict[str, dict[str, np.ndarray]]:
        """Per run holding flatness, `Store.flatness_summary` on the shared axis."""

        def compute() -> dict[str, dict[str, np.ndarray]]:
            return {run: {key: self.align(run, values)
                          for key, values in self.stores[run].flatness_summary(FLATNESS_THRESHOLD).items()}
                    for run in self.flatness_runs()}

        return self._load(("flatness",), compute)

    def divergence(self, reference: str, other: str) -> dict[str, np.ndarray] | None:
        """The cached divergence of `other` from `reference`, or None until `load_divergence` ran."""
        return self._cache.get(("divergence", reference, other))

    def load_divergence(self, reference: str, other: str) -> dict[str, np.ndarray]:
        """`distance` and `relative` (to the reference's norm) of `other` from `reference` over all weights on the
        shared axis, NaN where either run lacks an epoch (`Sweep.divergence`)."""

        def compute() -> dict[str, np.ndarray]:
            found = self.sweep.divergence(reference, other)
            epochs = found["epoch"].values
            return {name: self.align(reference, found[name].values, epochs) for name in ("distance", "relative")}

        return self._load(("divergence", reference, other), compute)
