"""The library's verbs, equal to the command line: `ingest` checkpoints into a store (or a sweep), `compute`
the landscape analyses of a store from its weights alone, and `loss_plane` on the plane of two PCA components.

`geostore ingest`, `geostore flatness` and `geostore plane` call these and only print what they return. Everything the
commands decide lives here: store, sweep or one run of a sweep; the `auto` device; each setting given,
else the store's recorded one, else the default. Errors name these functions' arguments in backticks
(`n_directions`), which the command line shows as its flags. Importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from geostore.errors import GeostoreError

if TYPE_CHECKING:
    import numpy as np

    from geostore.ingestion import IngestReport
    from geostore.landscape import FlatnessReport, FlatnessSettings
    from geostore.plane import PlaneReport
    from geostore.store.location import Location

PathLike = str | os.PathLike
ANALYSES = ("flatness", "antithetic", "profile", "hessian")
"""What `analyses` may name; flatness comes with any of the others (they share its directions and baseline)."""


def ingest(
    sources: PathLike | Sequence[PathLike],
    store: PathLike,
    *,
    run: str | None = None,
    family: str | None = None,
    probe: np.ndarray | PathLike | None = None,
    analyses: Collection[str] = ("flatness",),
    n_directions: int | None = None,
    epsilon: float | None = None,
    seed: int | None = None,
    profile_epsilons: Sequence[float] | str | None = None,
    profile_relative: bool = False,
    hessian_probes: int | None = None,
    lanczos_steps: int | None = None,
    device: str = "auto",
    recompute: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
) -> IngestReport | dict[str, IngestReport]:
    """Add every checkpoint of `sources` that `store` lacks, then compute the asked landscape analyses for every
    stored epoch that lacks them (`geostore ingest`).

    `sources`: one run's checkpoints (a geostore run, a miscope variant, an ARENA bundle or a folder of state
    dicts), or a list of them, which makes `store` a sweep with one run per source, named by its directory.
    One source goes into `store` itself, into run `run` of the sweep there (created when missing), or, when
    `store` is already a sweep, into the run named by its directory. Returns one report for one source, a
    dict run name -> report for a list.

    `analyses`: any of `ANALYSES` (empty: the weights alone); `profile_epsilons` given adds the profile.
    Settings not given are the store's recorded ones, else the defaults (50 directions, epsilon 0.1, seed 0,
    32 Hessian probes, 20 Lanczos steps); analyses a store holds are kept complete; other settings than the
    stored ones are refused unless `recompute`. `probe`: token ids (or a .npy/.pt file) for families that need
    one. `device`: `auto` (CUDA when present), `cpu` or `cuda`. `workers` (a local Dask cluster of that many
    processes) or `scheduler` (an address; default `$DASK_SCHEDULER_ADDRESS`) spread the analyses out.
    """
    from geostore.cluster import open_client
    from geostore.ingestion import ingest as ingest_run
    from geostore.ingestion import ingest_sweep, sweep_run_names
    from geostore.store.location import Location
    from geostore.store.sweep import is_sweep, run_location

    several = not isinstance(sources, str | os.PathLike)
    listed = list(sources) if several else [sources]
    if run is not None and len(listed) != 1:
        raise GeostoreError(f"`run` {run}: names one run, but {len(listed)} sources were given")
    location = Location.of(store, storage_options)
    if run is not None:
        runs: dict[str | None, PathLike] = {run: listed[0]}
    elif several or is_sweep(location):
        runs = dict(sweep_run_names(listed))
    else:
        runs = {None: listed[0]}
    settings = {name: _settings(location if name is None else run_location(location, name), analyses,
                                n_directions=n_directions, epsilon=epsilon, seed=seed,
                                profile_epsilons=profile_epsilons, profile_relative=profile_relative,
                                hessian_probes=hessian_probes, lanczos_steps=lanczos_steps, device=device)
                for name in runs}
    options = {"family": family, "probe": probe, "recompute_flatness": recompute, "progress": progress}
    with open_client(workers, scheduler) as client:
        if None in runs:
            return ingest_run(runs[None], location, flatness=settings[None], client=client, **options)
        if several:
            return ingest_sweep(runs, location, flatness=settings, client=client, **options)
        (name, source), = runs.items()
        return ingest_run(source, location, run=name, flatness=settings[name], client=client, **options)


def compute(
    store: PathLike,
    analyses: Collection[str] = (),
    *,
    run: str | None = None,
    probe: np.ndarray | PathLike | None = None,
    n_directions: int | None = None,
    epsilon: float | None = None,
    seed: int | None = None,
    profile_epsilons: Sequence[float] | str | None = None,
    profile_relative: bool = False,
    hessian_probes: int | None = None,
    lanczos_steps: int | None = None,
    device: str = "auto",
    recompute: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
) -> FlatnessReport | dict[str, FlatnessReport]:
    """Add or extend the landscape analyses of a store from its stored weights alone (`geostore flatness`).

    Computes flatness, the analyses the store already holds and those `analyses` names (see `ANALYSES`), for
    every stored epoch that lacks them; the settings as `ingest` takes them (each given, else the store's,
    else the default; other settings than the stored ones only with `recompute`). A sweep: every run, or
    only `run`. `probe` (token ids, or a .npy/.pt file) is recorded first, for families that need one.
    Returns one report for a store or one run, a dict run name -> report for a whole sweep.
    """
    from geostore.cluster import open_client
    from geostore.landscape import compute_store_flatness
    from geostore.sources.probe import load_probe
    from geostore.store.location import Location
    from geostore.store.sweep import Sweep, is_sweep, open_store, run_location

    location = Location.of(store, storage_options)
    whole_sweep = run is None and is_sweep(location)
    if whole_sweep:
        targets = {name: run_location(location, name) for name in Sweep(location).runs}
    else:
        targets = {run: open_store(location, run).location}
    if isinstance(probe, str | os.PathLike):
        probe = load_probe(probe)
    reports = {}
    with open_client(workers, scheduler) as client:
        for name, target in targets.items():
            settings = _settings(target, analyses or ("flatness",), n_directions=n_directions, epsilon=epsilon,
                                 seed=seed, profile_epsilons=profile_epsilons, profile_relative=profile_relative,
                                 hessian_probes=hessian_probes, lanczos_steps=lanczos_steps, device=device)
            reports[name] = compute_store_flatness(target, settings, probe=probe, recompute=recompute,
                                                   progress=progress, client=client)
    return reports if whole_sweep else reports[run]


def loss_plane(
    store: PathLike,
    group: str | Sequence[str] = "all",
    *,
    run: str | None = None,
    resolution: int | None = None,
    span: float | None = None,
    dtype: str | None = None,
    device: str = "auto",
    recompute: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
) -> PlaneReport:
    """Compute (or finish) the loss on the plane of `group`'s PC1 and PC2 through the PCA origin
    (`geostore plane`), stored in the store and read back with `Store.loss_plane(group)`.

    A `resolution` x `resolution` grid spanning the trajectory's PC scores `span` times their half-range either
    side of their middle, evaluated in `dtype` (`float32`, or `float64` to check against); each setting given,
    else the stored plane's, else 41, 1.25 and float32. Only rows not yet stored are computed; other settings, or
    a plane whose basis changed since (epochs added), are refused unless `recompute`. `run`: the run of a sweep.
    `device`, `workers` and `scheduler` as for `compute`. See `geostore.plane`.
    """
    from geostore.cluster import open_client
    from geostore.landscape import resolve_device
    from geostore.plane import compute_plane
    from geostore.store.location import Location
    from geostore.store.sweep import open_store

    target = open_store(Location.of(store, storage_options), run).location
    with open_client(workers, scheduler) as client:
        return compute_plane(target, group, resolution=resolution, span=span, dtype=dtype,
                             device=resolve_device(device), recompute=recompute, progress=progress, client=client)


def _settings(target: Location, analyses: Collection[str], *, profile_epsilons: Sequence[float] | str | None,
              profile_relative: bool, hessian_probes: int | None, lanczos_steps: int | None, device: str,
              **given: float | None) -> FlatnessSettings | None:
    """The settings to extend `target` with, or None for the weights alone (`analyses` empty)."""
    from geostore.landscape import resolve_device, resolve_settings

    if isinstance(analyses, str):
        analyses = (analyses,)
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise GeostoreError(f"`analyses` {', '.join(map(repr, unknown))}: choose from {', '.join(ANALYSES)}")
    if not analyses:
        extra = [f"`{k}`" for k, v in (("profile_epsilons", profile_epsilons), ("profile_relative", profile_relative),
                                        ("hessian_probes", hessian_probes), ("lanczos_steps", lanczos_steps))
                 if v is not None and v is not False]  # 0 is a value: asked for
        if extra:
            raise GeostoreError(f"`analyses` is empty (the weights alone): drop {', '.join(extra)} or name an analysis")
        return None
    if "profile" in analyses and profile_epsilons is None and not _stores(target, "profile"):
        raise GeostoreError("`analyses` 'profile' needs `profile_epsilons` (this store holds no profile yet)")
    return resolve_settings(target, antithetic="antithetic" in analyses, hessian="hessian" in analyses,
                            profile_epsilons=profile_epsilons, profile_relative=profile_relative,
                            hessian_probes=hessian_probes, lanczos_steps=lanczos_steps,
                            device=resolve_device(device), **given)


def _stores(target: Location, analysis: str) -> bool:
    """Whether the store at `target` exists and holds `analysis`."""
    from geostore.landscape import stored_settings

    return analysis in stored_settings(target)
