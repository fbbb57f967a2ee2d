"""Stores written by geostore before model families (format 1: a fixed 1-layer table, no layer dimension) open,
extend and render unchanged. `tests/data/format1/` holds such a store (3 epochs with flatness and antithetic
curvature, written by the format-1 code) and the run it came from (5 checkpoints)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import xarray as xr

import geostore
from geostore.family import tl_compat
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings

DATA = Path(__file__).parent / "data" / "format1"
SETTINGS = FlatnessSettings(n_directions=4, antithetic=True)


def test_format1_store_opens_extends_and_renders(tmp_path):
    store_path = tmp_path / "format1.zarr"
    shutil.copytree(DATA / "format1.zarr", store_path)
    before = geostore.open_store(store_path)
    assert before.attrs["geostore"]["version"] == 1 and before.family == "modular_addition"
    assert before.params["W_Q"].shape == (3, 2, 8, 4)  # no layer dimension
    assert before.groups["all"] == ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U")
    old = {"flatness": before.analysis("flatness")["delta_losses"].values,
           "antithetic": before.analysis("antithetic")["curvature"].values}
    old_weights = before.params_at(10)
    before.pca("all", n_components=2)

    report = ingest(DATA / "run", store_path, flatness=SETTINGS, progress=False)
    assert (report.added, report.skipped, report.flatness_computed) == (2, 3, 2)
    store = geostore.open_store(store_path)
    assert store.attrs["geostore"]["version"] == 1  # extended in its own format
    assert store.epochs.tolist() == [0, 10, 20, 30, 40] and store.params["W_Q"].shape == (5, 2, 8, 4)
    for name, values in store.params_at(10).items():
        np.testing.assert_array_equal(values, old_weights[name])
    np.testing.assert_array_equal(store.analysis("flatness")["delta_losses"].values[:3], old["flatness"])
    np.testing.assert_array_equal(store.analysis("antithetic")["curvature"].values[:3], old["antithetic"])

    # the same run ingested afresh (format 2, layered arrays) holds the same weights and the same analyses
    fresh = tmp_path / "fresh.zarr"
    ingest(DATA / "run", fresh, flatness=SETTINGS, progress=False)
    fresh_store = geostore.open_store(fresh)
    assert fresh_store.attrs["geostore"]["version"] == 2 and fresh_store.params["W_Q"].shape == (5, 1, 2, 8, 4)
    np.testing.assert_array_equal(store.params["W_Q"].compute(), fresh_store.params["W_Q"].compute()[:, 0])
    for analysis in ("flatness", "antithetic"):
        # the two epochs both computed now are bit-identical; the format-1 code's own epochs agree to the float32
        # rounding of the losses (~2.5 here, differences ~1e-8): the fast loss has since been reassociated
        xr.testing.assert_equal(store.analysis(analysis).isel(epoch=slice(3, None)),
                                fresh_store.analysis(analysis).isel(epoch=slice(3, None)))
        for name, old_values in store.analysis(analysis).data_vars.items():
            now = fresh_store.analysis(analysis)[name].values
            np.testing.assert_allclose(old_values.values, now, rtol=0, atol=1e-7 + 1e-3 * np.abs(now).max())
    np.testing.assert_allclose(np.abs(store.pca("all")["projections"]), np.abs(fresh_store.pca("all")["projections"]),
                               atol=1e-6)

    checkpoints = json.loads((DATA / "run" / "run.json").read_text())["checkpoints"]
    from safetensors.torch import load_file

    state = load_file(str(DATA / "run" / checkpoints[-1]["file"]))
    rebuilt = tl_compat.hooked_state(store.model_at(40))  # a TransformerBridge's layout on TransformerLens 4
    assert all(np.array_equal(rebuilt[k].numpy(), v.numpy()) for k, v in state.items())

    from viewer.app import main as geoview

    assert geoview([str(store_path), "--screenshot", str(tmp_path / "shot.png")]) == 0
    assert (tmp_path / "shot.png").stat().st_size > 10_000
