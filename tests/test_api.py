"""The Python API equals the command line: `geostore.ingest` and `geostore.compute` decide store, sweep and run,
resolve settings and the device, and their errors name arguments (the CLI shows them as flags)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import geostore
from geostore.cli import main
from geostore.ingestion import IngestReport
from geostore.landscape import FlatnessReport
from tests.test_ingest import state_dict_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    state_dict_dir(root / "a", range(0, 30, 10), seed=0)
    state_dict_dir(root / "b", range(0, 20, 10), seed=1)
    return root


def test_ingest_then_compute_a_store_as_the_cli_does(sources, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    report = geostore.ingest(sources / "a", path, analyses=[], progress=False)
    assert isinstance(report, IngestReport) and (report.added, report.analyses) == (3, ())
    assert geostore.open_store(path).analyses() == []
    done = geostore.compute(path, ["antithetic"], n_directions=2, seed=0, device="auto", progress=False)
    assert isinstance(done, FlatnessReport) and done.analyses == ("flatness", "antithetic") and done.computed == 3
    store = geostore.open_store(path)
    assert store.analysis("flatness").attrs["n_directions"] == 2 and store.analysis("flatness").attrs["seed"] == 0
    assert store.analysis("flatness").attrs["device"] in ("cpu", "cuda")  # `auto` resolved

    # the CLI on a copy ingested the same way ends equal, bit for bit
    cli = tmp_path / "cli.zarr"
    assert main(["ingest", str(sources / "a"), str(cli), "--no-flatness", "--quiet"]) == 0
    assert main(["flatness", str(cli), "--antithetic", "--directions", "2", "--seed", "0", "--quiet"]) == 0
    for analysis in ("flatness", "antithetic"):
        xr.testing.assert_equal(geostore.open_store(cli).analysis(analysis), store.analysis(analysis))
    capsys.readouterr()


def test_errors_name_arguments_and_the_cli_names_flags(sources, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    geostore.ingest(sources / "a", path, analyses=[], progress=False)
    with pytest.raises(geostore.GeostoreError, match="`n_directions` must be at least 1, got 0"):  # 0 is a value
        geostore.compute(path, n_directions=0, progress=False)
    with pytest.raises(geostore.GeostoreError, match="`hessian_probes` must be at least 2 .*got 0"):
        geostore.compute(path, ["hessian"], hessian_probes=0, progress=False)
    with pytest.raises(geostore.GeostoreError, match="`analyses` 'curvature': choose from flatness, antithetic"):
        geostore.compute(path, ["curvature"])
    with pytest.raises(geostore.GeostoreError, match="`analyses` is empty .* drop `lanczos_steps`"):
        geostore.ingest(sources / "a", path, analyses=[], lanczos_steps=0)
    with pytest.raises(geostore.GeostoreError, match="`workers` must be at least 1, got 0"):
        geostore.compute(path, workers=0)
    with pytest.raises(geostore.GeostoreError, match="`device` 'tpu': choose auto, cpu or cuda"):
        geostore.compute(path, device="tpu", progress=False)
    assert geostore.open_store(path).analyses() == []
    assert main(["flatness", str(path), "--directions", "0"]) == geostore.StoreError.exit_code
    assert capsys.readouterr().err == "geostore: error: --directions must be at least 1, got 0\n"
    import torch

    if not torch.cuda.is_available():  # asking for a GPU the machine lacks: one line before any work
        assert main(["flatness", str(path), "--device", "cuda"]) == geostore.StoreError.exit_code
        assert capsys.readouterr().err.startswith("geostore: error: --device cuda: no CUDA GPU here")
        assert geostore.open_store(path).analyses() == []


def test_a_list_of_sources_makes_a_sweep_and_compute_covers_every_run_or_one(sources, tmp_path):
    sweep = tmp_path / "sweep.zarr"
    reports = geostore.ingest([sources / "a", sources / "b"], sweep, analyses=[], progress=False)
    assert {name: r.added for name, r in reports.items()} == {"a": 3, "b": 2}
    one = geostore.compute(sweep, run="b", n_directions=2, progress=False)
    assert isinstance(one, FlatnessReport) and one.computed == 2
    every = geostore.compute(sweep, progress=False)  # the stored settings extend run b; run a gets the defaults
    assert {name: r.computed for name, r in every.items()} == {"a": 3, "b": 0}
    with pytest.raises(geostore.GeostoreError, match="`run` b: names one run, but 2 sources were given"):
        geostore.ingest([sources / "a", sources / "b"], sweep, run="b")
    opened = geostore.open_sweep(sweep)
    np.testing.assert_array_equal(opened["a"].analysis_epochs("flatness"), [0, 10, 20])
    assert opened["a"].analysis("flatness").attrs["n_directions"] == 50
