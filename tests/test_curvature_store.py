"""Curvature in the store: antithetic pairs, the multi-epsilon profile and the Hessian, computed by ingest and by
`geostore flatness`, with flatness's guarantees (one-sided values untouched, deterministic, incremental, whole
epochs only, settings refused unless recomputed)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr

import geostore
from geostore.analysis.curvature import antithetic_parts, hessian_for_params, weight_norm
from geostore.analysis.flatness import directional_losses
from geostore.cli import main
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings, HessianSettings, ProfileSettings
from geostore.store import schema
from geostore.store.writer import StoreWriter
from tests.conftest import random_params, snapshot
from tests.test_ingest import state_dict_dir

FLATNESS = FlatnessSettings(n_directions=6, epsilon=0.1, seed=3)
CURVATURE = FlatnessSettings(n_directions=6, epsilon=0.1, seed=3, antithetic=True,
                             profile=ProfileSettings((0.03, 0.1)), hessian=HessianSettings(n_probes=4, iterations=4,
                                                                                            seed=3))
CURVATURE_ARGS = ["--antithetic", "--profile-epsilons", "0.03,0.1", "--hessian", "--hessian-probes", "4",
                  "--lanczos-steps", "4"]
ARRAYS = list(schema.ANALYSIS_ARRAYS)


def arrays_of(path) -> dict[str, bytes]:
    """Every analysis array of a store, as bytes (equal bytes: bit-identical values)."""
    ds = xr.open_zarr(path)
    return {name: ds[name].values.tobytes() for name in ARRAYS if name in ds}


@pytest.fixture(scope="module")
def curvature_store(trained_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("curvature") / "run.zarr"
    ingest(trained_run, path, flatness=CURVATURE, progress=False)
    return path


def test_ingest_stores_every_curvature_analysis_and_leaves_one_sided_flatness_alone(trained_run, curvature_store,
                                                                                   tmp_path):
    plain = tmp_path / "plain.zarr"
    ingest(trained_run, plain, flatness=FLATNESS, progress=False)
    store, one_sided = geostore.open_store(curvature_store), geostore.open_store(plain)
    assert store.analyses() == ["flatness", "antithetic", "profile", "hessian", "hessian_groups"]
    for name in ("baseline_loss", "delta_losses"):  # the +eps evaluations are the one-sided ones, bit for bit
        assert arrays_of(curvature_store)[name] == arrays_of(plain)[name]
    n = store.epochs.size
    antithetic = store.analysis("antithetic")
    curvature, slope = antithetic["curvature"].values, antithetic["slope"].values
    assert curvature.shape == slope.shape == (n, 6) and np.isfinite(curvature).all()
    epoch = int(store.epochs[-1])
    _, deltas = directional_losses(store.params_at(epoch), store.model, n_directions=6, scales=[0.1, -0.1], seed=3)
    want = antithetic_parts(deltas[0], deltas[1], 0.1)
    assert curvature[-1].tobytes() == want[0].tobytes() and slope[-1].tobytes() == want[1].tobytes()
    # the pair holds what the one-sided value held: delta = curvature + eps * slope
    np.testing.assert_allclose(one_sided.analysis("flatness")["delta_losses"], curvature + 0.1 * slope, rtol=1e-12,
                               atol=1e-18)

    profile = store.curvature_profile()
    assert profile["epsilon"].shape == (n, 2) and (profile["epsilon"] == [0.03, 0.1]).all()
    np.testing.assert_array_equal(profile["mean_curvature"][:, 1], curvature.mean(axis=1))  # same eps, directions
    np.testing.assert_array_equal(profile["flatness_ratio"][:, 1], one_sided.flatness_summary()["flatness_ratio"])
    np.testing.assert_allclose(profile["normalised_curvature"], 2 / profile["epsilon"] ** 2 * profile["mean_curvature"])

    summary = store.curvature_summary()
    np.testing.assert_array_equal(summary["mean_curvature"], curvature.mean(axis=1))
    np.testing.assert_allclose(summary["trace_estimate"], 2 * store.n_trainable / 0.01 * curvature.mean(axis=1))
    hessian = hessian_for_params(store.params_at(epoch), store.model, n_probes=4, iterations=4, seed=3)
    stored = store.analysis("hessian")
    for name, value in hessian.items():
        assert stored[name].values[-1] == value, name
    assert (stored["hessian_trace_stderr"] > 0).all() and (stored["top_eigenvalue"] > 0).all()

    ds = xr.open_zarr(curvature_store)
    for name, dims in schema.ANALYSIS_ARRAYS.items():
        assert ds[name].dims == dims and ds[name].encoding["chunks"][0] == store.chunk_epochs, name
    text = store.describe()
    for line in ("antithetic  curvature and slope", "profile     epsilon 0.03, 0.1, 6 directions",
                 "hessian     Hutchinson trace (4 probes), top eigenvalue (4 Lanczos steps), seed 3: 9 of 9"):
        assert line in text


def test_curvature_added_later_from_the_store_alone_is_bit_identical(trained_run, curvature_store, tmp_path, capsys):
    later = tmp_path / "later.zarr"
    ingest(trained_run, later, flatness=FLATNESS, progress=False)
    # directions, epsilon and seed come from the store's flatness settings
    assert main(["flatness", str(later), *CURVATURE_ARGS, "--quiet"]) == 0
    assert "flatness, antithetic, profile, hessian, hessian_groups computed for 9 epochs" in capsys.readouterr().out
    assert arrays_of(later) == arrays_of(curvature_store)
    assert main(["flatness", str(later), "--quiet"]) == 0  # stored analyses are kept complete, nothing to do
    assert "hessian_groups computed for 0 epochs (9 already complete)" in capsys.readouterr().out


def test_curvature_is_bit_identical_however_epochs_arrive(tmp_path):
    settings = FlatnessSettings(n_directions=4, seed=1, antithetic=True, profile=ProfileSettings((0.05, 0.2), True),
                                hessian=HessianSettings(n_probes=3, iterations=3, seed=1))
    full = tmp_path / "full"
    state_dict_dir(full, [0, 10, 20, 30])
    one_go = tmp_path / "one_go.zarr"
    ingest(full, one_go, flatness=settings, progress=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(full / "model_step20.safetensors", partial)
    in_parts = tmp_path / "in_parts.zarr"
    ingest(partial, in_parts, flatness=settings, progress=False)
    assert main(["ingest", str(full), str(in_parts), "--quiet"]) == 0  # no options: the store's analyses go on
    assert arrays_of(in_parts) == arrays_of(one_go)

    store = geostore.open_store(one_go)  # relative profile: epsilon times each epoch's weight norm
    norms = np.array([weight_norm(store.params_at(int(e)), store.table.trainable) for e in store.epochs])
    np.testing.assert_allclose(store.curvature_profile()["epsilon"], norms[:, None] * [0.05, 0.2], rtol=1e-15)
    assert store.analysis_settings("profile")["relative"] is True


def test_curvature_settings_are_refused_unless_recomputed(curvature_store, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    shutil.copytree(curvature_store, path)
    before = snapshot(path)
    for args, message in ((["--hessian-probes", "5"], "holds hessian with n_probes=4, iterations=4, seed=3"),
                          (["--profile-epsilons", "0.1"], "holds profile with epsilons=[0.03, 0.1]"),
                          (["--seed", "4"], "holds flatness with epsilon=0.1, n_directions=6, seed=3")):
        assert main(["flatness", str(path), *args, "--quiet"]) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "recompute" in err, err
    assert snapshot(path) == before
    assert main(["flatness", str(path), "--hessian-probes", "5", "--recompute", "--quiet"]) == 0
    after = arrays_of(path)
    assert after["hessian_trace"] != arrays_of(curvature_store)["hessian_trace"]
    for name in ("delta_losses", "curvature", "profile_curvature"):  # only the analysis asked for is replaced
        assert after[name] == arrays_of(curvature_store)[name]
    assert geostore.open_store(path).analysis_settings("hessian")["n_probes"] == 5


@pytest.mark.parametrize(("args", "fragment"), [
    (["flatness", "{store}", "--profile-epsilons", "0.1,x"], "--profile-epsilons must be numbers"),
    (["flatness", "{store}", "--profile-epsilons", "0.1,-0.2"], "--profile-epsilons must be distinct positive"),
    (["flatness", "{store}", "--profile-relative"], "--profile-relative needs --profile-epsilons"),
    (["flatness", "{store}", "--hessian", "--hessian-probes", "1"], "--hessian-probes must be at least 2"),
    (["flatness", "{store}", "--hessian", "--lanczos-steps", "0"], "--lanczos-steps must be at least 1"),
    (["flatness", "{store}", "--lanczos-steps", "3"], "need --hessian"),
    (["ingest", "{source}", "{store}", "--no-flatness", "--hessian"], "--no-flatness stores the weights alone: drop"),
])
def test_bad_curvature_options_are_one_line_errors_and_leave_the_store_alone(args, fragment, tmp_path, capsys):
    source = tmp_path / "run"
    state_dict_dir(source, [0, 10])
    path = tmp_path / "s.zarr"
    ingest(source, path, flatness=None, progress=False)
    before = snapshot(path)
    assert main([a.format(store=path, source=source) for a in args]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("geostore: error: ") and fragment in err, err
    assert snapshot(path) == before


def test_a_curvature_row_shows_only_once_its_marker_is_written_and_rollback_removes_new_analyses(tmp_path,
                                                                                                tiny_model):
    path, task = tmp_path / "s.zarr", {"family": "modular_addition", "p": 7}
    StoreWriter.open(path, model=tiny_model, task=task, chunk_epochs=2).append([0, 10, 20],
                                                                               random_params(tiny_model, range(3)))
    before = snapshot(path)
    writer = StoreWriter.open(path, model=tiny_model, task=task)
    writer.enable_analyses(CURVATURE.analyses())
    # A writer killed after the Hessian's other arrays but before hessian_trace, which marks completion.
    writer._array("top_eigenvalue")[1] = 3.0
    writer._array("hessian_trace_stderr")[1] = 0.5
    writer.write_analysis("hessian", [20], {"hessian_trace": [7.0], "hessian_trace_stderr": [1.0],
                                            "top_eigenvalue": [2.0], "top_eigenvalue_residual": [0.1]})
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.analysis("hessian")["top_eigenvalue"].values, [np.nan, np.nan, 2.0])
    np.testing.assert_array_equal(store.analysis_epochs("hessian"), [20])
    np.testing.assert_array_equal(writer.missing("hessian"), [0, 10])
    with pytest.raises(geostore.StoreError, match="rows of shape \\(1, 5\\), the store holds \\(6,\\)"):
        writer.write_analysis("antithetic", [0], {"curvature": np.zeros((1, 5)), "slope": np.zeros((1, 5))})
    writer.rollback()
    assert snapshot(path) == before and geostore.open_store(path).analyses() == []
    with pytest.raises(geostore.StoreError, match="no hessian stored \\(run `geostore flatness .* --hessian`\\)"):
        geostore.open_store(path).analysis("hessian")
