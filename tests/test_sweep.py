"""Sweeps: several runs in one store under `runs/<name>`, each identical to the same run ingested alone."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import geostore
from geostore.cli import main
from geostore.errors import StoreError
from geostore.ingestion import ingest, ingest_sweep
from geostore.landscape import FlatnessSettings
from tests.conftest import snapshot
from tests.terminal import run_on_terminal
from tests.test_ingest import assert_one_line_error, run_cli, state_dict_dir

SETTINGS = FlatnessSettings(n_directions=4, seed=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one model, different seeds and checkpoint schedules."""
    root = tmp_path_factory.mktemp("runs")
    state_dict_dir(root / "seed0", range(0, 60, 10), seed=0)
    state_dict_dir(root / "seed1", range(0, 90, 15), seed=1)
    return root


def test_each_run_of_a_sweep_equals_its_single_store_bit_for_bit(runs, tmp_path):
    sweep_path = tmp_path / "sweep.zarr"
    reports = ingest_sweep({"seed0": runs / "seed0", "seed1": runs / "seed1"}, sweep_path, flatness=SETTINGS,
                           progress=False)
    assert {name: r.added for name, r in reports.items()} == {"seed0": 6, "seed1": 6}
    for name in ("seed0", "seed1"):
        single = tmp_path / f"{name}.zarr"
        ingest(runs / name, single, flatness=SETTINGS, progress=False)
        assert snapshot(sweep_path / "runs" / name) == snapshot(single)

    sweep = geostore.open_sweep(sweep_path)
    assert sweep.runs == ["seed0", "seed1"] and len(sweep) == 2
    assert sweep["seed1"].epochs.tolist() == list(range(0, 90, 15))
    store = geostore.open_store(sweep_path, run="seed0")
    ds = xr.open_zarr(sweep_path / "runs" / "seed0", consolidated=True)  # a run is a store of its own
    np.testing.assert_array_equal(ds["W_in"].values, store.params["W_in"].compute())
    np.testing.assert_array_equal(ds["delta_losses"].values, store.analysis("flatness")["delta_losses"].values)

    ingest(runs / "seed0", sweep_path, run="seed0", flatness=SETTINGS, progress=False)  # nothing new: unchanged
    assert snapshot(sweep_path / "runs" / "seed0") == snapshot(tmp_path / "seed0.zarr")

    with pytest.raises(StoreError, match=r"a sweep of 2 runs \(seed0, seed1\)"):
        geostore.open_store(sweep_path)
    with pytest.raises(StoreError, match="no run 'seed9'"):
        geostore.open_store(sweep_path, run="seed9")
    with pytest.raises(StoreError, match="not a sweep"):
        geostore.open_store(tmp_path / "seed0.zarr", run="seed0")
    with pytest.raises(StoreError, match="not a sweep"):
        geostore.open_sweep(tmp_path / "seed0.zarr")


def test_sweep_cli_progress_info_flatness_and_viewer(runs, tmp_path, qapp):
    from viewer.app import main as geoview

    sweep = tmp_path / "sweep.zarr"
    code, text = run_on_terminal("ingest", str(runs / "seed0"), str(runs / "seed1"), str(sweep), "--no-flatness")
    assert code == 0
    assert "sweep" in text and "2/2" in text and "run" in text  # one bar over the whole sweep
    result = run_cli("info", str(sweep))
    assert result.returncode == 0 and "2 runs" in result.stdout and "seed1" in result.stdout
    assert main(["flatness", str(sweep), "--directions", "4", "--quiet"]) == 0  # every run
    assert all(s.analysis_epochs("flatness").size == 6 for _, s in geostore.open_sweep(sweep).items())
    assert main(["pca", str(sweep), "--run", "seed1", "--components", "2", "--csv", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().count("\n") == 7
    shot = tmp_path / "seed1.png"
    assert geoview([str(sweep), "--run", "seed1", "--screenshot", str(shot), "--size", "800x600"]) == 0
    assert shot.stat().st_size > 10_000


def test_sweep_errors_are_one_line_and_write_nothing(runs, tmp_path):
    twin = tmp_path / "other" / "seed0"
    state_dict_dir(twin, range(0, 30, 10))
    target = tmp_path / "never.zarr"
    assert_one_line_error(run_cli("ingest", str(runs / "seed0"), str(twin), str(target)), "also named 'seed0'")
    assert not target.exists()

    single = tmp_path / "single.zarr"
    ingest(runs / "seed0", single, flatness=None, progress=False)
    before = snapshot(single)
    assert_one_line_error(run_cli("ingest", str(runs / "seed1"), str(single), "--run", "seed1"), "not a sweep")
    assert_one_line_error(run_cli("ingest", str(runs / "seed1"), str(single), "--run", "../x"), "run name")
    assert_one_line_error(run_cli("pca", str(single), "--run", "seed1"), "not a sweep")
    assert snapshot(single) == before
