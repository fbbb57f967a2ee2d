"""Loss-landscape flatness and curvature of a store's epochs: the settings, per-epoch rows, and filling in
what is missing.

Ingest computes them for the checkpoints it loads; `geostore flatness STORE` computes them from the
weights already stored (each model rebuilt from the store alone). Either way only epochs whose
analyses are missing are computed, each from its own weights and the seeded random draws alone, so
incremental, resumed and reordered runs give bit-identical values. Importing this module is cheap;
torch loads when the first epoch is computed.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from geostore.errors import GeostoreError, StoreError
from geostore.family.base import ALL
from geostore.store import schema
from geostore.store.location import Location
from geostore.store.writer import StoreWriter

if TYPE_CHECKING:
    from distributed import Client

    from geostore.family.base import Model, ParameterTable
    from geostore.store.reader import Store

LOSS_DEFINITION = "the model family's loss on its probe: mean of float32 per-example losses, summed in float64"
DIRECTIONS_DEFINITION = (
    "standard normal over the trainable parameters as one vector (parameter-table order), unit L2 norm, "
    "drawn on the CPU from torch.Generator(seed); the same directions at every epoch"
)


# The one-sided flatness ratio's threshold in the multi-epsilon profile (the seed's, as `flatness_summary`).
PROFILE_THRESHOLD = 0.1


@dataclass(frozen=True)
class ProfileSettings:
    """The multi-epsilon profile: perturbation lengths, absolute or as fractions of each epoch's weight norm."""

    epsilons: tuple[float, ...]
    relative: bool = False

    def __post_init__(self) -> None:
        values = tuple(float(e) for e in self.epsilons)
        if not values or not all(np.isfinite(e) and e > 0 for e in values) or len(set(values)) != len(values):
            raise StoreError(f"`profile_epsilons` must be distinct positive numbers, got {list(self.epsilons)}")
        object.__setattr__(self, "epsilons", values)

    def absolute(self, params: Mapping[str, np.ndarray], trainable: Sequence[str]) -> list[float]:
        """The epsilons used for an epoch: as given, or times the L2 norm of its trainable parameters."""
        if not self.relative:
            return list(self.epsilons)
        from geostore.analysis.curvature import weight_norm

        norm = weight_norm(params, trainable)
        return [e * norm for e in self.epsilons]


@dataclass(frozen=True)
class HessianSettings:
    """Hutchinson probes and Lanczos steps per epoch, and the seed of the Rademacher probes."""

    n_probes: int = 32
    iterations: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_probes < 2:
            raise StoreError(f"`hessian_probes` must be at least 2 (for a standard error), got {self.n_probes}")
        if self.iterations < 1:
            raise StoreError(f"`lanczos_steps` must be at least 1, got {self.iterations}")


@dataclass(frozen=True)
class FlatnessSettings:
    """How the landscape is measured: directions per epoch, perturbation size, direction seed, device, and
    the optional curvature measurements (antithetic pairs, a multi-epsilon profile, the Hessian)."""

    n_directions: int = 50
    epsilon: float = 0.1
    seed: int = 0
    device: str = "cpu"
    antithetic: bool = False
    profile: ProfileSettings | None = None
    hessian: HessianSettings | None = None

    def __post_init__(self) -> None:
        if self.n_directions < 1:
            raise StoreError(f"`n_directions` must be at least 1, got {self.n_directions}")
        if not np.isfinite(self.epsilon) or self.epsilon <= 0:
            raise StoreError(f"`epsilon` must be a positive number, got {self.epsilon}")

    def attrs(self) -> dict[str, object]:
        """The flatness settings as recorded in the store (the device is informational)."""
        return {
            "epsilon": float(self.epsilon), "n_directions": int(self.n_directions), "seed": int(self.seed),
            "loss": LOSS_DEFINITION, "directions": DIRECTIONS_DEFINITION, "device": self.device,
        }

    def analyses(self, table: ParameterTable | None = None) -> dict[str, dict[str, object]]:
        """Every analysis these settings compute (`schema.ANALYSES` names) with its recorded settings; with the
        store's parameter `table`, the Hessian comes with its component groups' blocks (`hessian_groups`)."""
        from geostore.analysis import curvature

        directions = {"n_directions": int(self.n_directions), "seed": int(self.seed)}
        out = {"flatness": self.attrs()}
        if self.antithetic:
            out["antithetic"] = {"epsilon": float(self.epsilon), **directions,
                                 "definition": curvature.ANTITHETIC_DEFINITION}
        if self.profile is not None:
            out["profile"] = {"epsilons": list(self.profile.epsilons), "relative": bool(self.profile.relative),
                              **directions, "threshold": PROFILE_THRESHOLD,
                              "definition": curvature.PROFILE_DEFINITION}
        if self.hessian is not None:
            out["hessian"] = {"n_probes": int(self.hessian.n_probes), "iterations": int(self.hessian.iterations),
                              "seed": int(self.hessian.seed), "definition": curvature.HESSIAN_DEFINITION,
                              "device": self.device}
            groups = hessian_groups(table) if table is not None else []
            if groups:
                out["hessian_groups"] = {**out["hessian"], "groups": groups,
                                         "definition": curvature.HESSIAN_GROUPS_DEFINITION}
        return out


def hessian_groups(table: ParameterTable) -> list[str]:
    """The component groups whose Hessian blocks `hessian_groups` measures: every group but `all` (the whole
    vector, the `hessian` analysis itself)."""
    return [group for group in table.groups if group != ALL]


DEFAULT_FLATNESS = FlatnessSettings()

# Finished epochs are written at least this often (each write rewrites two small chunks).
FLUSH_SECONDS = 0.2


@dataclass(frozen=True)
class FlatnessReport:
    """What a fill did: epochs computed (for any analysis), epochs already complete, seconds spent, and the
    analyses it kept complete."""

    computed: int
    already: int
    seconds: float
    analyses: tuple[str, ...] = ("flatness",)
    nonfinite: tuple[int, ...] = ()  # epochs whose weights are NaN or infinite: recorded with NaN values


def needs_probe(model: Model, probe: np.ndarray | None) -> bool:
    """Whether the landscape of `model` cannot be measured without a probe, and none is given."""
    return model.needs_probe and probe is None


def probe_missing_message(where: object) -> str:
    """The one line saying that the landscape analyses need a probe."""
    return (f"{where}: the landscape analyses of this model need a probe: give token ids (batch, seq) as "
            "`probe` (an array, or a .npy or .pt file)")


def resolve_settings(
    store: str | os.PathLike | Location | None,
    *,
    n_directions: int | None = None,
    epsilon: float | None = None,
    seed: int | None = None,
    device: str = "cpu",
    antithetic: bool = False,
    profile_epsilons: str | Sequence[float] | None = None,
    profile_relative: bool = False,
    hessian: bool = False,
    hessian_probes: int | None = None,
    lanczos_steps: int | None = None,
) -> FlatnessSettings:
    """Settings to extend `store` with (what `geostore flatness` and `geostore ingest` do): each value given,
    else the store's recorded one, else the default; analyses the store holds stay on with their settings.

    `store` may be missing or not yet a store (a new one). `profile_epsilons` is a list or comma-separated
    text; given, it sets the whole profile (`profile_relative` with it), else `profile_relative` applies to
    the stored profile. Every random draw uses `seed`. Asking for settings that differ from stored ones is
    allowed here; the writer refuses them unless recomputing.
    """
    stored = stored_settings(store)
    flat = stored.get("flatness", {})
    seed = int(flat.get("seed", 0)) if seed is None else seed
    if profile_epsilons is not None:
        profile = ProfileSettings(_epsilons(profile_epsilons), relative=profile_relative)
    elif "profile" in stored:
        profile = ProfileSettings(tuple(stored["profile"]["epsilons"]),
                                  relative=profile_relative or bool(stored["profile"]["relative"]))
    elif profile_relative:
        raise StoreError("`profile_relative` needs `profile_epsilons` (fractions of each epoch's weight norm)")
    else:
        profile = None
    hessian_stored = stored.get("hessian")
    if (hessian_probes is not None or lanczos_steps is not None) and not (hessian or hessian_stored):
        raise StoreError("`hessian_probes` and `lanczos_steps` need `hessian` (the Hessian analysis)")
    defaults = HessianSettings()
    hessian_settings = None if not (hessian or hessian_stored) else HessianSettings(
        n_probes=_given(hessian_probes, hessian_stored, "n_probes", defaults.n_probes),
        iterations=_given(lanczos_steps, hessian_stored, "iterations", defaults.iterations), seed=seed)
    return FlatnessSettings(
        n_directions=_given(n_directions, flat, "n_directions", DEFAULT_FLATNESS.n_directions),
        epsilon=float(_given(epsilon, flat, "epsilon", DEFAULT_FLATNESS.epsilon)), seed=seed, device=device,
        antithetic=antithetic or "antithetic" in stored, profile=profile, hessian=hessian_settings)


def resolve_device(name: str) -> str:
    """A torch device name: `auto` is CUDA when a GPU is present, the CPU otherwise; `cpu`, `cuda` or `cuda:N` as
    given when this machine has it (StoreError naming `device` otherwise, before any work starts)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise StoreError(f"`device` {name!r}: choose auto, cpu or cuda (cuda:N for one GPU)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise StoreError(f"`device` {name}: no CUDA GPU here (torch.cuda.is_available() is False); use auto "
                             "or cpu")
        if device.index is not None and device.index >= count:
            raise StoreError(f"`device` {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise StoreError(f"`device` {name!r}: choose auto, cpu or cuda (cuda:N for one GPU)")
    return name


def _given(value: object, stored: Mapping | None, key: str, default: object) -> object:
    """`value` when given, else `stored[key]` when recorded, else `default`."""
    if value is not None:
        return value
    return stored[key] if stored and key in stored else default


def stored_settings(store: str | os.PathLike | Location | None) -> dict[str, dict]:
    """The recorded settings of every analysis a store holds; empty when the path is not (yet) a store."""
    if store is None:
        return {}
    from geostore import open_store

    try:
        opened = open_store(store)
    except StoreError:
        return {}  # missing or not a store: whoever opens it for writing creates it or says why
    return {name: opened.analysis_settings(name) for name in opened.analyses()}


def _epsilons(values: str | Sequence[float]) -> tuple[float, ...]:
    """Profile epsilons from a list or comma-separated text."""
    if not isinstance(values, str):
        return tuple(values)
    try:
        return tuple(float(v) for v in values.split(","))
    except ValueError:
        raise StoreError(f"`profile_epsilons` must be numbers separated by commas, got {values!r}") from None


def epoch_landscape(params: Mapping[str, np.ndarray], model: Model, probe: np.ndarray | None,
                    settings: FlatnessSettings, analyses: Collection[str]) -> dict[str, dict[str, object]]:
    """One epoch's rows of the asked `analyses` from its parameters (the model's table names): analysis -> array
    name -> value. `probe` is the stored probe array, for families that need one.

    Every direction is evaluated once per distinct perturbation length (`+eps` for flatness, `-eps` too for
    the antithetic pair, `+-eps_k` for the profile), so the one-sided `delta_losses` are the same numbers
    whichever other analyses run beside them.
    """
    from geostore.analysis.curvature import antithetic_parts, hessian_for_params, profile_row
    from geostore.analysis.flatness import directional_losses

    rows: dict[str, dict[str, object]] = {}
    eps = settings.epsilon
    scales = ([eps] if {"flatness", "antithetic"} & set(analyses) else []) + ([-eps] if "antithetic" in analyses
                                                                                else [])
    profile = settings.profile.absolute(params, model.table.trainable) if "profile" in analyses else []
    scales += [s for e in profile for s in (e, -e)]
    probe_data = model.probe(probe)
    if scales:
        unique = list(dict.fromkeys(scales))
        baseline, deltas = directional_losses(params, model, probe_data, n_directions=settings.n_directions,
                                              scales=unique, seed=settings.seed, device=settings.device)
        at = dict(zip(unique, deltas, strict=True))
        if "flatness" in analyses:
            rows["flatness"] = {"baseline_loss": baseline, "delta_losses": at[eps]}
        if "antithetic" in analyses:
            curvature, slope = antithetic_parts(at[eps], at[-eps], eps)
            rows["antithetic"] = {"curvature": curvature, "slope": slope}
        if profile:
            rows["profile"] = {**profile_row(baseline, np.stack([at[e] for e in profile]),
                                             np.stack([at[-e] for e in profile]), PROFILE_THRESHOLD),
                               "profile_epsilon": np.array(profile)}
    if {"hessian", "hessian_groups"} & set(analyses):  # one pass: the groups' traces reuse the total's products
        hessian = settings.hessian
        groups = ({g: model.table.flat_indices(g) for g in hessian_groups(model.table)}
                  if "hessian_groups" in analyses else None)
        values = hessian_for_params(params, model, probe_data, n_probes=hessian.n_probes,
                                    iterations=hessian.iterations, seed=hessian.seed, device=settings.device,
                                    groups=groups, total="hessian" in analyses)
        rows.update({name: {array: values[array] for array in schema.ANALYSES[name]}
                     for name in ("hessian", "hessian_groups") if name in analyses})
    return rows


def fill_missing(
    writer: StoreWriter, settings: FlatnessSettings, *, progress: bool = True, client: Client | None = None
) -> FlatnessReport:
    """Compute every analysis of `settings` for every stored epoch that lacks it, from the stored weights.

    Serially, each stored chunk holding missing epochs is read once; with a `dask.distributed`
    client, each epoch is a task that reads its own weights on a worker. Either way this process
    alone writes, finished epochs at least every `FLUSH_SECONDS`, so a killed run loses little work.
    """
    from geostore import open_store

    began = time.perf_counter()
    names = tuple(settings.analyses(writer.table))
    missing = {name: set(writer.missing(name).tolist()) for name in names}
    epochs = np.array(sorted(set().union(*missing.values())), dtype=np.int64)
    already = int(writer.epochs.size - epochs.size)
    if epochs.size == 0:
        return FlatnessReport(0, already, 0.0, names)
    wanted = {int(e): tuple(name for name in names if int(e) in missing[name]) for e in epochs}
    store = open_store(writer.location)
    results = (_serial_results(store, wanted, settings) if client is None
               else _distributed_results(client, store, wanted, settings))
    done: list[tuple[int, dict]] = []
    nonfinite: list[int] = []
    last_flush = time.perf_counter()
    with progress_bar(epochs.size, "+".join(n for n in names if any(n in w for w in wanted.values())),
                      progress) as bar:
        for epoch, rows in results:
            if rows is None:  # NaN/inf weights: nothing to measure, every value is NaN (a result, recorded)
                nonfinite.append(epoch)
                rows = {name: writer.nan_row(name) for name in wanted[epoch]}
            done.append((epoch, rows))
            bar.update(1)
            bar.set_postfix_str(f"{settings.n_directions * bar.n / (time.perf_counter() - began):.0f} dir/s",
                                refresh=False)
            if time.perf_counter() - last_flush > FLUSH_SECONDS:
                _flush(writer, done)
                last_flush = time.perf_counter()
        _flush(writer, done)
    if nonfinite:
        import warnings

        from geostore.errors import GeostoreWarning

        shown = ", ".join(str(e) for e in sorted(nonfinite)[:5]) + (", ..." if len(nonfinite) > 5 else "")
        warnings.warn(GeostoreWarning(f"{writer.path}: {len(nonfinite)} epoch{'s' if len(nonfinite) > 1 else ''} "
                                      f"({shown}) hold NaN or infinite weights: their landscape values are NaN"),
                      stacklevel=2)
    return FlatnessReport(int(epochs.size) - len(nonfinite), already, time.perf_counter() - began, names,
                          tuple(sorted(nonfinite)))


def _flush(writer: StoreWriter, done: list[tuple[int, dict]]) -> None:
    """Write the finished epochs, one batch per analysis (each writes its completion marker last)."""
    for name in schema.ANALYSES:
        batch = [(epoch, rows[name]) for epoch, rows in done if name in rows]
        if batch:
            writer.write_analysis(name, [epoch for epoch, _ in batch],
                                  {array: np.stack([np.asarray(row[array]) for _, row in batch])
                                   for array in schema.ANALYSES[name]})
    done.clear()


def _serial_results(store: Store, wanted: Mapping[int, tuple[str, ...]], settings: FlatnessSettings
                    ) -> Iterator[tuple[int, dict]]:
    """`(epoch, rows)` in epoch order, reading each chunk that holds the `wanted` epochs once."""
    index = np.searchsorted(store.epochs, np.array(list(wanted), dtype=np.int64))
    chunk = store.chunk_epochs
    model, probe = store.model, store.probe()
    for block in np.unique(index // chunk):
        rows = index[index // chunk == block]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        stored = {name: np.asarray(store.params[name][lo:hi]) for name in store.table.names}
        for row in rows:
            epoch = int(store.epochs[row])
            params = model_params(store, model, {name: value[row - lo] for name, value in stored.items()})
            yield epoch, (epoch_landscape(params, model, probe, settings, wanted[epoch]) if _finite(params)
                          else None)


def model_params(store: Store, model: Model, params: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """One epoch's stored parameters in the layout of the family's model (a format-1 store's 1-layer arrays get
    their `layer` dimension back); unchanged when the store's table is the model's."""
    if store.table == model.table:
        return params
    return model.table.stored(store.table.state_dict(params), store.path)


def _distributed_results(client: Client, store: Store, wanted: Mapping[int, tuple[str, ...]],
                         settings: FlatnessSettings) -> Iterator[tuple[int, dict]]:
    """`(epoch, rows)` as the cluster's workers finish them (one task per epoch)."""
    from distributed import as_completed

    futures = [client.submit(remote_epoch_landscape, store.location, epoch, settings, analyses,
                             key=f"geostore-flatness-{store.name}-{epoch}-{uuid.uuid4().hex[:8]}")
               for epoch, analyses in wanted.items()]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.cancel(futures)


def remote_epoch_landscape(path: str | Location, epoch: int, settings: FlatnessSettings,
                           analyses: tuple[str, ...]) -> tuple[int, dict]:
    """One epoch's analyses on a worker: its weights read from the store, torch on one thread.

    One torch thread per task: a worker runs as many tasks at once as it has dask threads, so the
    cluster uses exactly the cores its workers were given.
    """
    import torch

    from geostore import open_store

    torch.set_num_threads(1)
    store = open_store(path)
    model = store.model
    params = model_params(store, model, store.params_at(epoch))
    return epoch, epoch_landscape(params, model, store.probe(), settings, analyses) if _finite(params) else None


def _finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(value).all() for value in params.values())


def check_memory(settings: FlatnessSettings, model: Model, chunk_epochs: int | None = None) -> None:
    """Refuse, before anything is written, settings whose direction matrix or stored rows cannot fit in memory:
    the `(n_directions, D)` float32 directions (a block of them where one is too large to cache), and one
    chunk of each per-direction float64 array."""
    from geostore.analysis.flatness import DIRECTION_BLOCK, cached_directions
    from geostore.store import layout

    n_params = model.table.n_trainable()
    if chunk_epochs is None:
        chunk_epochs = layout.chunk_epochs_for(max(p.size for p in model.table.parameters) * 4)
    per_direction = 2 + settings.antithetic * 2 + (2 * len(settings.profile.epsilons) if settings.profile else 0)
    held = settings.n_directions if cached_directions(n_params) else min(settings.n_directions, DIRECTION_BLOCK)
    directions = held * n_params * 4
    need = directions + settings.n_directions * chunk_epochs * 8 * per_direction
    have = _memory_bytes()
    if have and need > have // 2:
        raise StoreError(f"`n_directions` {settings.n_directions}: needs about {need / 2**30:.1f} GiB of memory "
                         f"(directions of {n_params} weights, and stored rows), more than half of this machine's "
                         f"{have / 2**30:.1f} GiB: use fewer directions")


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def compute_store_flatness(
    store: str | os.PathLike | Location, settings: FlatnessSettings, *, probe: np.ndarray | None = None,
    recompute: bool = False, progress: bool = True, client: Client | None = None,
) -> FlatnessReport:
    """Add or extend flatness and the curvature analyses of `settings` on an existing store from its weights
    alone (`geostore flatness`); `probe` (token ids) is recorded in the store first, for families that need one."""
    from geostore import open_store

    store = Location.of(store)
    opened = open_store(store)  # refuses a missing path or a non-store before anything is opened for writing
    model = opened.model
    if probe is not None:
        model.probe(probe)  # checks the token ids against the model before anything is written
    if needs_probe(model, opened.probe() if probe is None else probe):
        raise GeostoreError(probe_missing_message(opened.path))
    check_memory(settings, model, opened.chunk_epochs)
    writer = StoreWriter.open(store, model=model, task=opened.task, probe=probe)
    with writer:  # any exception rolls back what this run enabled (its settings too), then unlocks
        writer.enable_analyses(settings.analyses(writer.table), recompute=recompute)
        return fill_missing(writer, settings, progress=progress, client=client)




def progress_bar(total: int, desc: str, progress: bool, unit: str = "ckpt") -> tqdm:
    """A progress bar on stderr counting `unit`s (checkpoints), shown on terminals only (logs and pipes get
    clean lines)."""
    return tqdm(total=total, unit=unit, desc=desc, disable=None if progress else True, file=sys.stderr,
                dynamic_ncols=True)
