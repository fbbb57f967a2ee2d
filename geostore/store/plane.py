"""The stored loss planes of a store: one file per component group, `<store>/derived/plane/<group>.npz`.

A plane lives beside the PCA Gram cache (`geostore.store.derived`) rather than in the zarr hierarchy because
it is not per-epoch data: it is one `(resolution, resolution)` grid in the basis of one PCA fit, which the
epoch-indexed arrays, their done flags and the commit record (the root `zarr.json`, which never lists it) have
no place for, and which a later ingest must not touch. Unlike the Gram cache it is a result, not a cache: it is
never dropped silently, only replaced by `geostore plane --recompute`.

The file holds the settings (JSON: group, members, resolution, span, dtype, the fit epochs that define the
basis), the axes `pc1` and `pc2`, the `loss` grid (rows by `pc1`; NaN where not computed), a `done` flag per
row, and the trajectory's `projections` and `explained_variance_ratio` in the same basis (signs included). It
is rewritten whole under a temporary name and renamed after each finished row, so a reader sees the rows of
one moment and a killed run keeps every row it finished. Writers hold the store's writer lock.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from geostore.errors import StoreError
from geostore.store.derived import COMPONENT, DERIVED
from geostore.store.schema import EPOCH_DIM as EPOCH

if TYPE_CHECKING:
    import xarray as xr

    from geostore.store.location import Location
    from geostore.store.reader import Store

PLANE = "plane"
SUFFIX = ".npz"


@dataclass
class PlaneRecord:
    """A plane as stored: `settings`, axes, the `loss` grid `(len(pc1), len(pc2))` and its per-row `done`
    flags, and the trajectory in the plane's basis: `epochs`, `projections` `(n_epoch, 2)`, `explained`
    (the two components' explained variance ratios)."""

    settings: dict
    pc1: np.ndarray
    pc2: np.ndarray
    loss: np.ndarray
    done: np.ndarray
    epochs: np.ndarray
    projections: np.ndarray
    explained: np.ndarray


def group_key(store: Store, group: str | Sequence[str]) -> str:
    """The name a group's plane is stored under: the group's name, or its sorted members joined by `+`."""
    if isinstance(group, str):
        store.resolve(group)  # an unknown name fails here, naming the choices
        return group
    return "+".join(sorted(store.resolve(group)))


def _key(name: str) -> str:
    return f"{DERIVED}/{PLANE}/{name}{SUFFIX}"


def names(location: Location) -> list[str]:
    """The groups whose planes a store holds, sorted (`all` first)."""
    found = [f.rsplit("/", 1)[-1][:-len(SUFFIX)] for f in location.files(f"{DERIVED}/{PLANE}") if f.endswith(SUFFIX)]
    return sorted(found, key=lambda name: (name != "all", name))


def load(location: Location, name: str) -> PlaneRecord | None:
    """The stored plane of group `name`, or None when there is none; StoreError when the file is damaged."""
    key = _key(name)
    if not location.is_file(key):
        return None
    try:
        with np.load(io.BytesIO(location.read_bytes(key)), allow_pickle=False) as data:
            return PlaneRecord(settings=json.loads(str(data["settings"])), pc1=data["pc1"], pc2=data["pc2"],
                               loss=data["loss"], done=data["done"], epochs=data["epochs"].astype(np.int64),
                               projections=data["projections"], explained=data["explained"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise StoreError(f"{location}/{key}: unreadable loss plane ({exc}): recompute it with "
                         f"`geostore plane {location} --group {name} --recompute`") from None


def save(location: Location, name: str, record: PlaneRecord) -> None:
    """Write a plane atomically (readers see the old file or the new one, never a mix)."""
    buffer = io.BytesIO()
    np.savez(buffer, settings=np.array(json.dumps(record.settings)), pc1=record.pc1, pc2=record.pc2,
             loss=record.loss, done=record.done, epochs=record.epochs, projections=record.projections,
             explained=record.explained)
    location.write_atomic(_key(name), buffer.getvalue())


def stale(store: Store, record: PlaneRecord) -> bool:
    """Whether the store's epochs changed since the plane's basis was fitted (the PCA would now differ)."""
    return not np.array_equal(np.asarray(record.settings["fit_epochs"], dtype=np.int64), store.epochs)


def loss_plane(store: Store, group: str | Sequence[str] = "all") -> xr.Dataset:
    """A group's stored loss plane as a Dataset (see `Store.loss_plane`)."""
    import xarray as xr

    name = group_key(store, group)
    record = load(store.location, name)
    if record is None:
        raise StoreError(f"{store.path}: no loss plane of group {name} stored (run `geostore plane {store.path}"
                         f"{'' if name == 'all' else f' --group {name}'}`)")
    loss = np.where(record.done[:, None], record.loss, np.nan)
    attrs = {**record.settings, "stale": stale(store, record), "complete_rows": int(record.done.sum())}
    return xr.Dataset(
        {"loss": (("pc1", "pc2"), loss),
         "projections": ((EPOCH, COMPONENT), record.projections),
         "explained_variance_ratio": (COMPONENT, record.explained)},
        coords={"pc1": record.pc1, "pc2": record.pc2, EPOCH: record.epochs, COMPONENT: np.array([1, 2])},
        attrs=attrs)


def describe(store: Store) -> list[str]:
    """One line per stored plane for `geostore info`: grid, span, rows complete, and whether it is stale."""
    lines = []
    for name in names(store.location):
        record = load(store.location, name)
        settings = record.settings
        n = settings["resolution"]
        line = (f"plane       group {name}: {n} x {n} points, span {settings['span']:g}, {settings['dtype']}: "
                f"{int(record.done.sum())} of {n} rows complete")
        if stale(store, record):
            line += (f" (stale: fitted on {len(settings['fit_epochs'])} epochs, the store holds {store.epochs.size}; "
                     f"recompute it with `geostore plane {store.path} --group {name} --recompute`)")
        lines.append(line)
    return lines
