"""`device="cuda"` computes what the CPU computes: flatness, antithetic curvature and the Hessian of a real run, on
the modular-addition fast path and on the generic evaluator. Skipped where no CUDA GPU is present (CI has none;
`benchmarks/device.py` prints the speed ratios where one is)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geostore
from tests.test_ingest import state_dict_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
ANALYSES = ["flatness", "antithetic", "hessian"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    state_dict_dir(root / "run", range(0, 40, 10), seed=0)
    return root / "run"


def test_the_gpu_computes_what_the_cpu_computes(run, tmp_path):
    stores = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.zarr"
        geostore.ingest(run, path, analyses=ANALYSES, n_directions=8, seed=0, hessian_probes=4, lanczos_steps=6,
                        device=device, progress=False)
        stores[device] = geostore.open_store(path)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert gpu.analysis("flatness").attrs["device"] == "cuda"
    baseline = cpu.analysis("flatness")["baseline_loss"].values
    np.testing.assert_allclose(gpu.analysis("flatness")["baseline_loss"].values, baseline, rtol=1e-5)
    # the same directions (drawn on the CPU from the seed), float32 losses: agree to a few ulps of the loss
    np.testing.assert_allclose(gpu.analysis("flatness")["delta_losses"].values,
                               cpu.analysis("flatness")["delta_losses"].values, rtol=0, atol=1e-5 * baseline.max())
    np.testing.assert_allclose(gpu.analysis("antithetic")["curvature"].values,
                               cpu.analysis("antithetic")["curvature"].values, rtol=0, atol=1e-5 * baseline.max())
    for name in ("hessian_trace", "top_eigenvalue"):
        np.testing.assert_allclose(gpu.analysis("hessian")[name].values, cpu.analysis("hessian")[name].values,
                                   rtol=1e-3)
    for name in ("group_hessian_trace", "group_top_eigenvalue"):  # each component group's block likewise
        total = np.abs(cpu.analysis("hessian")[name.removeprefix("group_")].values).max()
        np.testing.assert_allclose(gpu.analysis("hessian_groups")[name].values,
                                   cpu.analysis("hessian_groups")[name].values, rtol=1e-3, atol=1e-4 * total)


def test_a_named_gpu_adds_an_analysis_to_a_stored_run(run, tmp_path):
    path = tmp_path / "generic.zarr"
    geostore.ingest(run, path, analyses=[], progress=False)
    geostore.compute(path, ["flatness"], n_directions=4, seed=1, device="cuda:0", progress=False)
    flat = geostore.open_store(path).analysis("flatness")
    assert flat.attrs["device"] == "cuda:0" and np.isfinite(flat["delta_losses"].values).all()
