"""Both TransformerLens eras on the installed version: the model built, the two checkpoint layouts ingested into
identical stores, `model_at` equal to the original model and to the fast evaluator, and training.

Runs under `make test` (the newest TransformerLens) and `make test-compat` (3.9); the checks that need the other
era's own code (a real HookedTransformer on 3.x, TransformerLens' `convert_tl_checkpoint` on 4.x) run where it
exists."""

from __future__ import annotations

import importlib.metadata
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import geostore
from geostore.errors import SourceError
from geostore.family import hooked, modular_addition_fast, tl_compat
from geostore.family.modular_addition import MODULAR_ADDITION, model_config, probe
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings
from tests.checkpoint_factories import bridge_state_dict, config_json, tl_state_dict, trajectory

CONFIG = model_config(5, d_model=8, n_heads=2)  # p = 5: a 25-pair grid
EPOCHS = (0, 4, 9)


@pytest.fixture(scope="module")
def traj():
    return trajectory(CONFIG, EPOCHS)


def test_the_installed_era_builds_its_own_model():
    major = int(importlib.metadata.version("transformer-lens").split(".")[0])
    assert tl_compat.bridge_era() == (major >= 4)
    module = MODULAR_ADDITION.model(CONFIG).build(seed=0)
    assert type(module).__name__ == ("TransformerBridge" if major >= 4 else "HookedTransformer")
    assert not module.training


def test_seeded_initial_weights_are_geostore_s_on_every_version():
    model = MODULAR_ADDITION.model(CONFIG)
    held = model.stored(model.build(seed=3))
    drawn = hooked.initial_params(model.table, CONFIG, 3)
    assert all(np.array_equal(held[name], drawn[name]) for name in model.table.names)
    assert not np.array_equal(drawn["W_E"], hooked.initial_params(model.table, CONFIG, 4)["W_E"])
    assert np.all(drawn["b_in"] == 0) and np.std(drawn["W_in"]) == pytest.approx(0.8 / np.sqrt(8), rel=0.2)


def test_layout_conversions_invert_each_other_and_match_transformerlens(traj):
    state = {k: v for k, v in tl_state_dict(traj[4], CONFIG).items() if not hooked.is_buffer(k)}
    bridge = tl_compat.to_bridge(state)
    assert bridge["blocks.0.attn.q.weight"].shape == (2 * 4, 8) and bridge["unembed.weight"].shape == (5, 8)
    back = tl_compat.to_hooked(bridge, n_heads=2)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    real = bridge_state_dict(traj[4], CONFIG)  # a real TransformerBridge's state dict
    assert real.keys() == bridge.keys() and all(torch.equal(real[k], bridge[k]) for k in real)
    if tl_compat.bridge_era():  # TransformerLens' own converter (4.x only) agrees
        from transformer_lens import TransformerBridgeConfig
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        theirs = convert_tl_checkpoint(dict(state), TransformerBridgeConfig(**CONFIG))
        assert all(torch.equal(theirs[k], bridge[k]) for k in theirs)
    with pytest.raises(SourceError, match="not a TransformerBridge parameter"):
        tl_compat.to_hooked({"lm_head.weight": torch.zeros(2)}, n_heads=2)


@pytest.mark.skipif(tl_compat.bridge_era(), reason="HookedTransformer exists on TransformerLens 3.x only")
def test_hooked_layout_checkpoints_are_what_a_real_hookedtransformer_writes(traj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        real = HookedTransformer(HookedTransformerConfig(**CONFIG))
    ours = tl_state_dict(traj[4], CONFIG)
    assert set(real.state_dict()) == set(ours)
    real.load_state_dict(ours)  # every parameter and buffer fits
    assert type(MODULAR_ADDITION.model(CONFIG).build()) is HookedTransformer


def test_both_layouts_ingest_into_identical_stores_and_model_at_is_exact(tmp_path, traj):
    """The same weights as HookedTransformer and as TransformerBridge checkpoints: identical stores; `model_at`
    gives the installed version's model, whose logits equal a TransformerBridge's holding the bridge checkpoint
    (TransformerLens' own load) and whose loss equals the fast evaluator's."""
    runs = {}
    for layout, writer in (("hooked", tl_state_dict), ("bridge", bridge_state_dict)):
        run = runs[layout] = tmp_path / layout
        run.mkdir()
        (run / "config.json").write_text(json.dumps(config_json(CONFIG)))
        for epoch in EPOCHS:
            save_file(writer(traj[epoch], CONFIG), str(run / f"checkpoint_{epoch}.safetensors"))
        ingest(run, tmp_path / f"{layout}.zarr", flatness=FlatnessSettings(n_directions=2), progress=False)
    hooked_store, bridge_store = (geostore.open_store(tmp_path / f"{k}.zarr") for k in ("hooked", "bridge"))
    assert hooked_store.config == bridge_store.config and hooked_store.table == bridge_store.table
    assert hooked_store.params["W_Q"].shape == (3, 1, 2, 8, 4)  # the HookedTransformer layout on every version
    for name in hooked_store.table.names:
        np.testing.assert_array_equal(hooked_store.params[name].compute(), bridge_store.params[name].compute())
        np.testing.assert_array_equal(hooked_store.params[name].compute()[1], traj[4][name], err_msg=name)
    np.testing.assert_array_equal(hooked_store.delta_losses.compute(), bridge_store.delta_losses.compute())

    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tokens, labels = probe(5)
    original = TransformerBridge.boot_native(TransformerBridgeConfig(**CONFIG)).eval()
    original.load_state_dict(bridge_state_dict(traj[9], CONFIG))
    rebuilt = hooked_store.model_at(9)
    assert type(rebuilt) is type(MODULAR_ADDITION.model(CONFIG).build())
    with torch.no_grad():
        logits = rebuilt(tokens)
        torch.testing.assert_close(logits, original(tokens), rtol=1e-6, atol=1e-6)
    model = hooked_store.model
    assert modular_addition_fast.supports(model)
    params = {n: torch.as_tensor(v, dtype=torch.float64) for n, v in hooked_store.params_at(9).items()}
    fast = modular_addition_fast.batched(model, {n: v for n, v in params.items() if n not in model.table.trainable})
    want = fast({n: params[n][None] for n in model.table.trainable})[0]
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(model.build(hooked_store.params_at(9), dtype=torch.float64)(
            tokens)[:, -1, :5], labels)
    assert float(plain) == pytest.approx(float(want), rel=1e-12)
    assert hooked_store.baseline_loss.compute()[2] == pytest.approx(float(want), rel=1e-5)


def test_a_bridge_checkpoint_needs_the_head_count(tmp_path, traj):
    run = tmp_path / "run"
    run.mkdir()
    save_file(bridge_state_dict(traj[0], CONFIG), str(run / "checkpoint_0.safetensors"))
    with pytest.raises(SourceError, match="needs n_heads"):
        ingest(run, tmp_path / "s.zarr", flatness=None, progress=False)
    (run / "config.json").write_text(json.dumps({"d_head": 4, "p": 5}))
    ingest(run, tmp_path / "s.zarr", flatness=None, progress=False)
    np.testing.assert_array_equal(geostore.open_store(tmp_path / "s.zarr").params["W_O"].compute()[0], traj[0]["W_O"])


def test_training_runs_on_the_installed_version(trained_run):
    """`geostore train` on this version: checkpoints in the HookedTransformer layout, starting from geostore's
    seeded weights, and each recorded train loss is the loss of its own checkpoint's model."""
    run = json.loads((trained_run / "run.json").read_text())
    model = MODULAR_ADDITION.model(run["model_config"])
    from safetensors.numpy import load_file

    first = load_file(str(trained_run / run["checkpoints"][0]["file"]))
    assert "blocks.0.attn.W_Q" in first and "embed.weight" not in first
    initial = hooked.initial_params(model.table, run["model_config"], run["task"]["model_seed"])
    stored = model.table.stored(first, "run")
    assert all(np.array_equal(stored[n], initial[n]) for n in model.table.names)
    last = run["checkpoints"][-1]
    params = model.table.stored(load_file(str(trained_run / last["file"])), "run")
    train = np.asarray(run["task"]["train_indices"])
    tokens, labels = probe(run["task"]["p"])
    with torch.no_grad():
        logits = model.build(params)(tokens[train])
    loss = torch.nn.functional.cross_entropy(logits[:, -1, :run["task"]["p"]], labels[train]).item()
    assert loss == pytest.approx(last["train_loss"], rel=1e-5)
    assert last["train_loss"] < run["checkpoints"][0]["train_loss"]
