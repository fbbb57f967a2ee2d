"""The loss on the plane of a group's two leading principal components (`geostore plane`), stored in the store.

`theta(a, b) = mean + a u1 + b u2`: `mean` is the PCA origin (every parameter's mean over the fit epochs, so
parameters outside the group stay at their mean), `u1` and `u2` the unit components of
`store.pca(group, 2, loadings=True)` (zero outside the group), `a` and `b` in the units of the trajectory's PC
scores. The grid spans the trajectory's scores `span` times their half-range either side of their middle
(`geostore.analysis.plane.plane_axes`), and is evaluated row by row (one `a`, every `b`) by the family's
batched loss (`geostore.analysis.evaluator.batched_loss`, the evaluator flatness uses), in blocks of
`DIRECTION_BLOCK` points. Rows are written as they finish (`geostore.store.plane`), under the store's writer
lock, so a killed run keeps its rows and a re-run computes only the rest; a row's values depend only on the
settings and the stored weights, so resumed and distributed runs equal one uninterrupted run. The settings
(group, resolution, span, dtype and the fit epochs that define the basis) are recorded; other settings, or
epochs added since the basis was fitted (a stale plane), are refused unless recomputing.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.landscape import LOSS_DEFINITION, _given, model_params, needs_probe, progress_bar
from geostore.store import lock
from geostore.store import plane as stored_plane
from geostore.store.location import Location

if TYPE_CHECKING:
    from distributed import Client

    from geostore.family.base import Model
    from geostore.store.reader import Store

DEFAULT_RESOLUTION = 41
DEFAULT_SPAN = 1.25
DTYPES = ("float32", "float64")
ORIGIN_DEFINITION = ("theta(pc1, pc2) = mean + pc1 u1 + pc2 u2: mean over the fit epochs of every parameter, "
                     "u1 and u2 the group's unit PCA components (zero outside the group)")


@dataclass(frozen=True)
class PlaneReport:
    """What a plane run did: the group, its grid, rows computed now and rows already stored, seconds spent."""

    group: str
    resolution: int
    span: float
    computed: int
    already: int
    seconds: float


def compute_plane(
    store: str | os.PathLike | Location, group: str | Sequence[str] = "all", *, resolution: int | None = None,
    span: float | None = None, dtype: str | None = None, device: str = "cpu", recompute: bool = False,
    progress: bool = True, client: Client | None = None,
) -> PlaneReport:
    """Compute the missing rows of a group's loss plane (`geostore plane`); see the module docstring.

    Settings not given are the stored plane's, else the defaults (41 points per axis, span 1.25, float32);
    other settings than the stored ones, or a stale plane, are refused unless `recompute`.
    """
    from geostore import open_store

    location = Location.of(store)
    opened = open_store(location)  # refuses a missing path or a non-store before the lock is taken
    name = stored_plane.group_key(opened, group)
    model = opened.model
    if needs_probe(model, opened.probe()):
        raise StoreError(f"{opened.path}: the loss of this model needs a probe (token ids): record one with "
                         f"`geostore flatness {opened.path} --probe FILE` first")
    if dtype is not None and dtype not in DTYPES:
        raise StoreError(f"`dtype` {dtype!r}: choose from {', '.join(DTYPES)}")
    began = time.perf_counter()
    key = lock.acquire(location)
    try:
        opened = open_store(location)  # the epochs as they are now that nobody else writes
        record = _record(opened, name, group, stored_plane.load(location, name), resolution=resolution, span=span,
                         dtype=dtype, device=device, recompute=recompute)
        rows = np.flatnonzero(~record.done)
        already = int(record.done.sum())
        if rows.size:  # written from the first finished row on: a recompute stopped before it keeps the old plane
            _fill(opened, model, name, record, rows, device=device, progress=progress, client=client)
    finally:
        lock.release(key)
    return PlaneReport(name, int(record.settings["resolution"]), float(record.settings["span"]), int(rows.size),
                       already, time.perf_counter() - began)


def _record(store: Store, name: str, group: str | Sequence[str], existing: stored_plane.PlaneRecord | None, *,
            resolution: int | None, span: float | None, dtype: str | None, device: str, recompute: bool
            ) -> stored_plane.PlaneRecord:
    """The plane to fill: the stored one when the settings agree, else (with `recompute`, or none stored) a new
    empty one on the current PCA basis; StoreError naming the setting that differs."""
    from geostore.analysis.plane import plane_axes

    old = {} if existing is None else existing.settings
    settings = {
        "group": name, "members": list(store.resolve(group)),
        "resolution": int(_given(resolution, old, "resolution", DEFAULT_RESOLUTION)),
        "span": float(_given(span, old, "span", DEFAULT_SPAN)),
        "dtype": str(_given(dtype, old, "dtype", DTYPES[0])),
        "fit_epochs": store.epochs.tolist(), "origin": ORIGIN_DEFINITION, "loss": LOSS_DEFINITION, "device": device,
    }
    if existing is not None and not recompute:
        for setting in ("resolution", "span", "dtype", "members"):
            if settings[setting] != old[setting]:
                raise StoreError(f"`{setting}` {settings[setting]}: the stored loss plane of group {name} has "
                                 f"{old[setting]} (give `recompute` to replace it)")
        if stored_plane.stale(store, existing):
            raise StoreError(f"{store.path}: the stored loss plane of group {name} is stale: its basis was fitted "
                             f"on {len(old['fit_epochs'])} epochs, the store now holds {store.epochs.size} (give "
                             "`recompute` to recompute it on the current basis)")
        return existing
    pca = store.pca(group, 2)
    projections = np.asarray(pca["projections"], dtype=np.float64)
    pc1, pc2 = plane_axes(projections, settings["resolution"], settings["span"])
    n = settings["resolution"]
    return stored_plane.PlaneRecord(settings=settings, pc1=pc1, pc2=pc2, loss=np.full((n, n), np.nan),
                                    done=np.zeros(n, dtype=bool), epochs=store.epochs.copy(), projections=projections,
                                    explained=np.asarray(pca["explained_variance_ratio"], dtype=np.float64))


def basis(store: Store, model: Model, group: str | Sequence[str]
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(mean, u1, u2)`: every parameter's float64 mean over the store's epochs and the group's two unit PCA
    components spread over the parameters (zero outside the group), in the layout of the family's model.

    Read with local threads even under a distributed client: one pass over the weights whose results this
    process needs (shipping the chunks' tasks to a fresh cluster took 12 s, against about 1 s here, for a small
    store)."""
    import dask
    import dask.array as da

    names = store.resolve(group)
    with dask.config.set(scheduler="threads"):
        components = np.asarray(store.pca(group, 2, loadings=True)["components"], dtype=np.float64)
        means = dask.compute(*[da.mean(value.astype(np.float64), axis=0) for value in store.params.values()])
    mean = {name: np.asarray(value) for name, value in zip(store.params, means, strict=True)}
    shapes = {name: store.member(name).shape[1:] for name in names}
    spread = []
    for component in components:
        direction = {name: np.zeros_like(value) for name, value in mean.items()}
        pieces = np.split(component, np.cumsum([int(np.prod(shape)) for shape in shapes.values()])[:-1])
        for (member, shape), piece in zip(shapes.items(), pieces, strict=True):
            base, _, layer = member.partition("[")
            target = direction[base] if not layer else direction[base][int(layer[:-1])]
            target[...] = piece.reshape(shape)
        spread.append(direction)
    # a format-1 store's parameters get their `layer` dimension back (through float32: such stores are rare)
    return tuple(dict(model_params(store, model, params)) for params in (mean, *spread))


def plane_losses(model: Model, probe: np.ndarray | None, mean: Mapping[str, np.ndarray],
                 u1: Mapping[str, np.ndarray], u2: Mapping[str, np.ndarray], pc1: Sequence[float],
                 pc2: Sequence[float], rows: Sequence[int], *, dtype: str = "float32", device: str = "cpu"
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """`(row, losses over pc2)` of each asked row of the grid (`pc1[row]`), in order, from the family's batched
    loss with the frozen parameters at `mean`; `probe` is the stored probe array, for families that need one."""
    import torch

    from geostore.analysis.evaluator import batched_loss
    from geostore.analysis.plane import plane_row

    torch_dtype = getattr(torch, dtype)
    _, loss = batched_loss(model, mean, model.probe(probe), device=device, dtype=torch_dtype)

    def tensors(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {name: torch.as_tensor(np.asarray(params[name], dtype=np.float64), device=device)
                for name in model.table.trainable}

    origin, d1, d2 = tensors(mean), tensors(u1), tensors(u2)
    for row in rows:
        yield int(row), plane_row(loss, origin, d1, d2, float(pc1[row]), pc2, torch_dtype)


def _fill(store: Store, model: Model, name: str, record: stored_plane.PlaneRecord, rows: np.ndarray, *,
          device: str, progress: bool, client: Client | None) -> None:
    """Compute `rows` of `record`, saving the plane after each finished row."""
    mean, u1, u2 = basis(store, model, record.settings["members"])
    args = (record.pc1, record.pc2)
    options = {"dtype": record.settings["dtype"], "device": device}
    if client is None:
        results = plane_losses(model, store.probe(), mean, u1, u2, *args, rows, **options)
    else:
        results = _distributed_rows(client, store, (mean, u1, u2), args, rows, options)
    with progress_bar(rows.size, f"plane {name}", progress, unit="row") as bar:
        for row, values in results:
            record.loss[row] = values
            record.done[row] = True
            stored_plane.save(store.location, name, record)
            bar.update(1)


def _distributed_rows(client: Client, store: Store, vectors: tuple, axes: tuple, rows: np.ndarray,
                      options: dict) -> Iterator[tuple[int, np.ndarray]]:
    """`(row, losses)` as the cluster's workers finish them (one task per row; the vectors sent once)."""
    from distributed import as_completed

    shared = client.scatter(list(vectors), broadcast=True, hash=False)  # own keys: never another run's, released
    futures = [client.submit(remote_plane_row, store.location, *shared, *axes, int(row), options,
                             key=f"geostore-plane-{store.name}-{row}-{uuid.uuid4().hex[:8]}") for row in rows]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.cancel(futures)


def remote_plane_row(path: str | Location, mean: Mapping[str, np.ndarray], u1: Mapping[str, np.ndarray],
                     u2: Mapping[str, np.ndarray], pc1: np.ndarray, pc2: np.ndarray, row: int, options: dict
                     ) -> tuple[int, np.ndarray]:
    """One row of the plane on a worker, torch on one thread (see `landscape.remote_epoch_landscape`)."""
    import torch

    from geostore import open_store

    torch.set_num_threads(1)
    store = open_store(path)
    return next(plane_losses(store.model, store.probe(), mean, u1, u2, pc1, pc2, [row], **options))
