"""A user's own (non-transformer) family, registered through the `geostore.families` entry point: ingest, PCA,
flatness with the generic evaluator, exact models and the viewer work for it as for the built-in families."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.decomposition import PCA

import geostore
from geostore.analysis.flatness import compute_landscape_flatness, directional_losses
from geostore.cli import main
from geostore.family import registry

PLUGIN = Path(__file__).parent / "plugin"
STEPS = (0, 2, 4, 8)


@pytest.fixture
def toy_family(monkeypatch):
    """The plug-in distribution on sys.path (as `pip install` would put it), the registry re-read."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    registry._plugins.cache_clear()
    yield sys.modules.get("geostore_toy_family") or __import__("geostore_toy_family")
    registry._plugins.cache_clear()


def write_toy_run(path: Path, toy) -> Path:
    """A run of the toy regressor trained by SGD: `config.json` and a state dict per step."""
    torch.manual_seed(0)
    net = toy.module(3, 5)
    x, y = toy.task_data(3)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architecture": "toy_regressor", "d_in": 3, "d_hidden": 5}))
    for step in range(max(STEPS) + 1):
        if step in STEPS:
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            save_file(state, str(path / f"ckpt_{step}.safetensors"))
        optimiser.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        optimiser.step()
    return path


def test_entry_point_family_end_to_end(tmp_path, toy_family):
    assert "toy_regressor" in registry.families()
    run = write_toy_run(tmp_path / "run", toy_family)
    store_path = tmp_path / "s.zarr"
    assert main(["ingest", str(run), str(store_path), "--quiet", "--directions", "6"]) == 0
    store = geostore.open_store(store_path)
    assert store.family == "toy_regressor" and store.epochs.tolist() == list(STEPS)
    assert store.groups == {"all": ("0.weight", "0.bias", "2.weight"), "hidden": ("0.weight", "0.bias"),
                            "readout": ("2.weight",)}
    from safetensors.torch import load_file

    states = [load_file(str(run / f"ckpt_{s}.safetensors")) for s in STEPS]
    for step, state in zip(STEPS, states, strict=True):
        rebuilt = store.model_at(step).state_dict()
        assert set(rebuilt) == set(state) and all(torch.equal(rebuilt[k], v) for k, v in state.items())

    flat = np.stack([np.concatenate([s[k].double().numpy().ravel() for k in ("0.weight", "0.bias", "2.weight")])
                     for s in states])
    ours = store.pca("all", n_components=2)
    theirs = PCA(n_components=2).fit(flat)
    np.testing.assert_allclose(ours["explained_variance"], theirs.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(ours["projections"]), np.abs(theirs.transform(flat)), atol=1e-6)

    model, (x, y) = store.model, toy_family.task_data(3)
    deltas = store.analysis("flatness")["delta_losses"].values
    for i, state in enumerate(states):
        net = store.model_at(STEPS[i])
        with torch.no_grad():
            want = ((net(x) - y) ** 2).mean().item()
            assert store.analysis("flatness")["baseline_loss"].values[i] == pytest.approx(want, rel=1e-6)
        plain = compute_landscape_flatness(net, (x, y), lambda m, probe: ((m(probe[0]) - probe[1]) ** 2).mean(),
                                           n_directions=6, epsilon=0.1, seed=0,
                                           trainable=["0.weight", "0.bias", "2.weight"])
        np.testing.assert_allclose(deltas[i], plain["delta_losses"], atol=2e-6)
        # float64: the generic evaluator and the plain loop agree to rounding
        params = {k: v.double().numpy() for k, v in state.items()}
        _, exact = directional_losses(params, model, (x.double(), y.double()), n_directions=6, scales=[0.1], seed=0,
                                      dtype=torch.float64)
        net64 = net.double()
        loop = compute_landscape_flatness(net64, (x.double(), y.double()),
                                          lambda m, probe: ((m(probe[0]) - probe[1]) ** 2).mean(), n_directions=6,
                                          epsilon=0.1, seed=0, trainable=["0.weight", "0.bias", "2.weight"])
        np.testing.assert_allclose(exact[0], loop["delta_losses"], rtol=0, atol=1e-10)

    from viewer.app import main as geoview

    assert geoview([str(store_path), "--screenshot", str(tmp_path / "shot.png")]) == 0
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_without_the_plugin_a_store_still_reads_and_model_at_says_what_is_missing(tmp_path, toy_family, capsys):
    run = write_toy_run(tmp_path / "run", toy_family)
    assert main(["ingest", str(run), str(tmp_path / "s.zarr"), "--quiet", "--no-flatness"]) == 0
    registry._plugins.cache_clear()
    sys.path.remove(str(PLUGIN))
    store = geostore.open_store(tmp_path / "s.zarr")
    assert store.velocity("all").shape == (len(STEPS) - 1,)  # the table lives in the store: no plug-in needed
    with pytest.raises(geostore.GeostoreError, match="unknown model family 'toy_regressor'"):
        store.model_at(0)
