"""The viewer's data, free of Qt: everything it shows, read once through the public `geostore.Store` API.

`ViewerData` answers per-epoch questions from arrays held in memory (nearest stored epoch, the
histogram row of an epoch), so scrubbing never touches the store. The `load_*` methods read or
compute through the store (PCA, velocities, flatness) and may take seconds: the window runs them on
a worker thread; each caches its result, so asking twice costs nothing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from geostore import GeostoreError, Store, StoreError
from geostore.analysis.flatness_stats import flatness_summary
from viewer.epoch_axis import EpochAxis

SCREE_COMPONENTS = 10
"""Principal components asked of the store: three for the projections, the rest for the scree plot."""

HISTOGRAM_BINS = 48
WEIGHT_BINS = 64
# Values per matrix (its last two axes) of the Spectrum dock's default: 2048 x 2048.
SPECTRUM_DEFAULT_SIZE = 2**22
"""Bins of the weight histograms (`Store.histograms`), fixed for the run."""
FLATNESS_THRESHOLD = 0.1
"""`flatness_ratio` counts directions whose loss rises by less than this fraction of the baseline."""

ANALYSIS_HELP = {
    "flatness": ("flatness", ""),
    "antithetic": ("antithetic curvature", " --antithetic"),
    "profile": ("curvature profile", " --profile-epsilons 0.01,0.03,0.1,0.3"),
    "hessian": ("Hessian trace or eigenvalue", " --hessian"),
    "hessian_groups": ("Hessian by component group", " --hessian"),
}
"""What each analysis is called in messages, and the `geostore flatness` option that adds it."""

GROUP_LABELS = {"all": "All", "embedding": "Embedding", "attention": "Attention", "mlp": "MLP", "norm": "Norm"}


def group_label(group: str) -> str:
    """A component group's name as the viewer shows it (`layer0` -> `Layer 0`)."""
    if group in GROUP_LABELS:
        return GROUP_LABELS[group]
    if group.startswith("layer") and group[5:].isdigit():
        return f"Layer {group[5:]}"
    return group.replace("_", " ").capitalize()
METRIC_LABELS = {
    "mean_delta_loss": "mean Δloss", "median_delta_loss": "median Δloss", "max_delta_loss": "max Δloss",
    "std_delta_loss": "std of Δloss", "p90_delta_loss": "p90 Δloss", "flatness_ratio": "flatness ratio",
}


@dataclass(frozen=True)
class Trajectory:
    """A group's PCA: `projections` `(n_epoch, k)`, the explained variance (ratio) of each component."""

    group: str
    projections: np.ndarray
    explained_variance_ratio: np.ndarray
    explained_variance: np.ndarray


@dataclass(frozen=True)
class Flatness:
    """Stored flatness with what the docks draw from it, precomputed.

    `summary` holds the per-epoch statistics of `Store.flatness_summary`; `counts[i]` is the histogram
    of epoch `i`'s delta losses over `edges`, the same bins for every epoch so epochs compare by eye.
    """

    settings: dict
    threshold: float
    summary: dict[str, np.ndarray]
    deltas: np.ndarray
    edges: np.ndarray
    counts: np.ndarray

    @property
    def complete(self) -> np.ndarray:
        """Bool `(n_epoch,)`: epochs whose flatness is computed."""
        return np.isfinite(self.summary["mean_delta_loss"])

    def histogram(self, index: int, *, same_bins: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """`(edges, counts)` of epoch `index`: over the run's fixed bins, or over bins spanning this epoch only."""
        if same_bins:
            return self.edges, self.counts[index]
        edges, counts = fixed_histograms(self.deltas[index : index + 1], self.counts.shape[1])
        return edges, counts[0]


@dataclass(frozen=True)
class Curvature:
    """The stored curvature analyses, each None when the store lacks it.

    `summary`: `Store.curvature_summary` (antithetic pairs), `values` its per-direction curvatures `(n_epoch,
    n_dir)`; `hessian`: `hessian_trace`, `hessian_trace_stderr`, `top_eigenvalue`, `top_eigenvalue_residual` per
    epoch; `profile`: `Store.curvature_profile`; `n_params`: the trainable parameter count D (Tr(H) / D is what the
    profile's normalised curvature estimates); `hessian_groups`: group -> the same four arrays as `hessian`, of
    that group's Hessian block.
    """

    summary: dict[str, np.ndarray] | None
    values: np.ndarray | None
    hessian: dict[str, np.ndarray] | None
    profile: dict[str, np.ndarray] | None
    settings: dict[str, dict]
    n_params: int
    hessian_groups: dict[str, dict[str, np.ndarray]] | None = None


@dataclass(frozen=True)
class Plane:
    """A group's stored loss plane (`Store.loss_plane`): `loss` `(len(pc1), len(pc2))` on the grid `pc1` x `pc2`,
    NaN in rows not computed; the trajectory's `projections` `(len(epochs), 2)` in the plane's basis and the two
    components' `explained` variance ratios; `stale` when epochs were added after its basis was fitted."""

    group: str
    pc1: np.ndarray
    pc2: np.ndarray
    loss: np.ndarray
    epochs: np.ndarray
    projections: np.ndarray
    explained: np.ndarray
    stale: bool

    def position(self, epoch: int) -> np.ndarray | None:
        """`(pc1, pc2)` of a stored epoch on the plane, or None when the plane's basis predates it."""
        index = int(np.searchsorted(self.epochs, epoch))
        if index < self.epochs.size and self.epochs[index] == epoch:
            return self.projections[index]
        return None

    def loss_near(self, a: float, b: float) -> float:
        """The loss at the grid point nearest `(pc1, pc2)` = `(a, b)`."""
        return float(self.loss[np.abs(self.pc1 - a).argmin(), np.abs(self.pc2 - b).argmin()])


def upsample(values: np.ndarray, factor: int) -> np.ndarray:
    """`values` `(n, m)` linearly interpolated onto a grid `factor` times finer along both axes (same corners):
    smooth contours from a coarse grid. NaN spreads to the points it touches."""
    out = values
    for axis in (0, 1):
        n = out.shape[axis]
        fine = np.linspace(0, n - 1, (n - 1) * factor + 1)
        low = np.minimum(np.floor(fine).astype(np.intp), n - 2)
        weight = (fine - low).reshape((-1, 1) if axis == 0 else (1, -1))
        out = np.take(out, low, axis=axis) * (1 - weight) + np.take(out, low + 1, axis=axis) * weight
    return out


LOADERS = {"trajectory": "load_trajectory", "velocities": "load_velocities", "flatness": "load_flatness",
           "curvature": "load_curvature", "weights": "load_weight_histograms", "spectrum": "load_spectrum",
           "plane": "load_plane"}
"""The `load_*` method of each cache key's first part: what `ViewerData.follow` loads again on a newer commit."""


def _signature(store: Store) -> tuple:
    """What the viewer shows of a store changes with: its epochs and the epochs each analysis completed."""
    return (tuple(store.epochs.tolist()),
            tuple((name, store.analysis_epochs(name).size) for name in store.analyses()))


def fixed_histograms(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of every row of `values` `(n, m)` over one set of `bins` edges spanning all finite values.

    Returns `(edges (bins+1,), counts (n, bins) int64)`; NaN values are not counted.
    """
    finite = np.isfinite(values)
    if finite.any():
        low, high = float(values[finite].min()), float(values[finite].max())
    else:
        low, high = 0.0, 1.0
    if high <= low:
        low, high = low - 0.5 * (abs(low) or 1.0), high + 0.5 * (abs(high) or 1.0)
    edges = np.linspace(low, high, bins + 1)
    which = np.clip(np.searchsorted(edges, np.where(finite, values, low), side="right") - 1, 0, bins - 1)
    rows = np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)
    counts = np.zeros((values.shape[0], bins), dtype=np.int64)
    np.add.at(counts, (rows[finite], which[finite]), 1)
    return edges, counts


@dataclass(frozen=True)
class WeightHistograms:
    """`Store.histograms` of a group or parameter: `counts[i]` of epoch `i` over `edges`, the run's bins."""

    group: str
    edges: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Spectrum:
    """`Store.spectrum` of one parameter, its batch (layers, heads) flattened to `labels`:
    `participation_ratio` `(n_epoch, n_matrix)`, `singular_values` `(n_epoch, n_matrix, k)`."""

    name: str
    labels: list[str]
    participation_ratio: np.ndarray
    singular_values: np.ndarray


class ViewerData(EpochAxis):
    """What the viewer shows of one store; see the module docstring."""

    def __init__(self, store: Store) -> None:
        epochs = np.asarray(store.epochs, dtype=np.int64)
        if epochs.size < 2:
            raise StoreError(f"{store.path}: {epochs.size} epoch(s) stored; the viewer needs at least two")
        super().__init__(epochs, store.phases())  # {phase: (first epoch, last epoch)} the recorded curves reach
        self.store = store
        self.name = store.name
        self.metrics = store.metrics()
        self.unit = store.index_unit  # what the epoch axis counts: "epoch" or "step"; labels say so
        self.analyses = store.analyses()
        self.groups = tuple(store.groups)  # `all` first, then the family's groups
        self.velocity_groups = ("all", *store.table.partition())  # what `Store.velocities` returns
        self.weight_choices = (*self.groups, *store.param_shapes())  # what `Store.histograms` takes
        self.matrices = store.matrices  # what `Store.spectrum` takes
        # the Spectrum dock's first choice: the first matrix of at most SPECTRUM_DEFAULT_SIZE values (a GPT-2 `W_E`,
        # 50257 x 768, costs seconds of SVD per epoch; the model's other matrices a fraction of that)
        small = [name for name in self.matrices if math.prod(store.params[name].shape[-2:]) <= SPECTRUM_DEFAULT_SIZE]
        self.default_matrix = (small or list(self.matrices) or [None])[0]
        # self._cache keys: ("trajectory", group), ("velocities", per_epoch), ("flatness",), ...

    # ----------------------------------------------------------------------------- following
    def follow(self) -> ViewerData | None:
        """The store's latest commit as new data when it changed (epochs, analyses or their completed epochs: a
        run recording into it, `geostore flatness --follow`), else None. The new data comes with what this one
        has loaded (PCA, velocities, flatness, ...) loaded again, so the docks swap to it at once; the store's
        caches make that cost only the new epochs. Slow: call it on the worker thread."""
        if not self.store.changed():
            return None
        store = self.store.reopen()
        if _signature(store) == _signature(self.store):
            return None
        data = ViewerData(store)
        for key in list(self._cache):
            loader = LOADERS.get(key[0])  # a cache without a loader here is loaded by its dock, as on opening
            with contextlib.suppress(GeostoreError):  # the dock that asks again shows the error
                if loader is not None:
                    getattr(data, loader)(*key[1:])
        return data

    # ----------------------------------------------------------------------------- analyses
    @property
    def has_flatness(self) -> bool:
        """Whether the store holds flatness."""
        return "flatness" in self.analyses

    def trajectory(self, group: str) -> Trajectory | None:
        """The cached PCA of `group`, or None until `load_trajectory` ran."""
        return self._cache.get(("trajectory", group))

    def load_trajectory(self, group: str) -> Trajectory:
        """The PCA of `group` over every stored epoch, through `Store.pca` (slow the first time)."""
        if group not in self.groups:
            raise StoreError(f"unknown group {group!r}; choose from {', '.join(self.groups)}")

        def compute() -> Trajectory:
            pca = self.store.pca(group, n_components=min(SCREE_COMPONENTS, self.n_epochs - 1))
            return Trajectory(
                group=group,
                projections=np.asarray(pca["projections"], dtype=np.float64),
                explained_variance_ratio=np.asarray(pca["explained_variance_ratio"], dtype=np.float64),
                explained_variance=np.asarray(pca["explained_variance"], dtype=np.float64),
            )

        return self._load(("trajectory", group), compute)

    def velocities(self, per_epoch: bool) -> dict[str, np.ndarray] | None:
        """The cached velocities `group -> (n_epoch - 1,)`, or None until `load_velocities` ran."""
        return self._cache.get(("velocities", per_epoch))

    def load_velocities(self, per_epoch: bool) -> dict[str, np.ndarray]:
        """Velocity of every group, through `Store.velocities`: per epoch of training or per checkpoint step.

        Value `i` is the step from stored epoch `i` to `i + 1`; the docks draw it at the later epoch.
        """

        def compute() -> dict[str, np.ndarray]:
            found = self.store.velocities(per_epoch=per_epoch)
            return {g: np.asarray(found[g], dtype=np.float64) for g in self.velocity_groups}

        return self._load(("velocities", per_epoch), compute)

    @property
    def flatness(self) -> Flatness | None:
        """The cached flatness, or None until `load_flatness` ran."""
        return self._cache.get(("flatness",))

    def load_flatness(self) -> Flatness:
        """Stored flatness and its per-epoch histograms; StoreError when the store has none."""

        def compute() -> Flatness:
            summary = self.store.flatness_summary(threshold=FLATNESS_THRESHOLD)
            deltas = np.asarray(self.store.analysis("flatness")["delta_losses"].values, dtype=np.float64)
            edges, counts = fixed_histograms(deltas, HISTOGRAM_BINS)
            return Flatness(settings=self.store.analysis_settings("flatness"), threshold=FLATNESS_THRESHOLD,
                            summary=summary, deltas=deltas, edges=edges, counts=counts)

        return self._load(("flatness",), compute)

    @property
    def curvature(self) -> Curvature | None:
        """The cached curvature analyses, or None until `load_curvature` ran."""
        return self._cache.get(("curvature",))

    def load_curvature(self) -> Curvature:
        """Whichever curvature analyses the store holds (small per-epoch arrays, read once)."""

        def compute() -> Curvature:
            store, present = self.store, self.analyses
            hessian = None
            if "hessian" in present:
                stored = store.analysis("hessian").compute()
                hessian = {name: np.asarray(stored[name], dtype=np.float64) for name in stored.data_vars}
            groups = None
            if "hessian_groups" in present:  # `group_top_eigenvalue` over (epoch, group) -> `top_eigenvalue` by group
                stored = store.analysis("hessian_groups").compute()
                groups = {str(group): {name.removeprefix("group_"): np.asarray(stored[name].sel(group=group),
                                                                                dtype=np.float64)
                                       for name in stored.data_vars} for group in stored["group"].values}
            antithetic = "antithetic" in present
            return Curvature(
                summary=store.curvature_summary(FLATNESS_THRESHOLD) if antithetic else None,
                values=(np.asarray(store.analysis("antithetic")["curvature"].values, dtype=np.float64) if antithetic
                        else None),
                hessian=hessian,
                profile=store.curvature_profile() if "profile" in present else None,
                settings={name: store.analysis_settings(name) for name in present},
                n_params=store.n_trainable, hessian_groups=groups)

        return self._load(("curvature",), compute)

    def weight_histograms(self, group: str) -> WeightHistograms | None:
        """The cached histograms of a group's weights, or None until `load_weight_histograms(group)` ran."""
        return self._cache.get(("weights", group))

    def load_weight_histograms(self, group: str) -> WeightHistograms:
        """Per-epoch histograms of a group's (or a parameter's) weights over the run's bins."""

        def compute() -> WeightHistograms:
            found = self.store.histograms(group, bins=WEIGHT_BINS)
            return WeightHistograms(group=group, edges=np.asarray(found.attrs["edges"], dtype=np.float64),
                                    counts=np.asarray(found.values, dtype=np.int64))

        return self._load(("weights", group), compute)

    def spectrum(self, name: str) -> Spectrum | None:
        """The cached spectrum of a parameter, or None until `load_spectrum(name)` ran."""
        return self._cache.get(("spectrum", name))

    def load_spectrum(self, name: str) -> Spectrum:
        """Singular values and participation ratio of every matrix of a parameter at every epoch."""

        def compute() -> Spectrum:
            from geostore.analysis.weights import batch_labels

            found = self.store.spectrum(name)
            ratio, values = found["participation_ratio"], found["singular_values"].values
            return Spectrum(name=name, labels=batch_labels(name, dict(zip(ratio.dims[1:], ratio.shape[1:],
                                                                          strict=True))),
                            participation_ratio=ratio.values.reshape(self.n_epochs, -1),
                            singular_values=values.reshape(self.n_epochs, -1, values.shape[-1]))

        return self._load(("spectrum", name), compute)

    def flatness_ratio(self, kind: str, threshold: float) -> np.ndarray:
        """Per epoch, the share of directions whose one-sided Δloss (`kind` `one_sided`) or antithetic curvature
        (`antithetic`) stays below `threshold` times the baseline loss; needs `load_flatness` (and
        `load_curvature`) to have run."""
        values = self.flatness.deltas if kind == "one_sided" else self.curvature.values
        return flatness_summary(self.flatness.summary["baseline_loss"], values, threshold)["flatness_ratio"]

    @property
    def planes(self) -> list[str]:
        """The groups whose loss planes the store holds (listed once)."""
        return self._load(("planes",), self.store.planes)

    def plane(self, group: str) -> Plane | None:
        """The cached loss plane of `group`, or None until `load_plane` ran."""
        return self._cache.get(("plane", group))

    def load_plane(self, group: str) -> Plane:
        """A group's stored loss plane, through `Store.loss_plane` (a small file: read at once)."""

        def compute() -> Plane:
            plane = self.store.loss_plane(group)
            return Plane(group=group, pc1=plane["pc1"].values, pc2=plane["pc2"].values,
                         loss=np.asarray(plane["loss"], dtype=np.float64), epochs=plane["epoch"].values,
                         projections=np.asarray(plane["projections"], dtype=np.float64),
                         explained=np.asarray(plane["explained_variance_ratio"], dtype=np.float64),
                         stale=bool(plane.attrs["stale"]))

        return self._load(("plane", group), compute)

    def missing(self, needs: str) -> str | None:
        """Why a dock (or a choice in it) that `needs` `metrics`, a loss `plane` or an analysis (`flatness`,
        `antithetic`, `profile`, `hessian`, `hessian_groups`) cannot show this store, or None."""
        if needs == "metrics":
            return None if self.metrics else "No training metrics recorded by this store's sources."
        if needs == "plane":
            return None if self.planes else (f"No loss plane stored — run `geostore plane {self.store.path}` "
                                             "to add it.")
        if needs in self.analyses:
            return None
        what, option = ANALYSIS_HELP[needs]
        return f"No {what} stored — run `geostore flatness {self.store.path}{option}` to add it."
