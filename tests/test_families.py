"""Model families end to end: runs written by TransformerLens itself (any depth, normalisation, activation; the
installed version's model: HookedTransformer checkpoints on 3.x, TransformerBridge ones on 4.x), ingested,
analysed and rebuilt exactly; language models with a probe; families detected and named."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file
from sklearn.decomposition import PCA

import geostore
from geostore.cli import main
from geostore.family import registry, tl_compat
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings

ARCHITECTURES = {
    "ln_gelu": dict(n_layers=2, normalization_type="LN", act_fn="gelu"),
    "attn_only": dict(n_layers=2, normalization_type="LN", act_fn="relu", attn_only=True),
    "lnpre_relu": dict(n_layers=3, normalization_type="LNPre", act_fn="relu"),
}
STEPS = (0, 3, 6)


def tl_config(**fields: Any) -> Any:
    """The installed TransformerLens' config: a HookedTransformerConfig (3.x) or a TransformerBridgeConfig (4.x)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tl_compat.bridge_era():
            from transformer_lens import TransformerBridgeConfig

            return TransformerBridgeConfig(**fields)
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(**fields)


def tl_model(cfg: Any, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The installed TransformerLens' own model of `cfg` (HookedTransformer, or TransformerBridge.boot_native),
    holding `state` loaded by TransformerLens itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tl_compat.bridge_era():
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_native(cfg)
        else:
            from transformer_lens import HookedTransformer

            model = HookedTransformer(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def write_tl_run(path: Path, architecture: dict, *, steps=STEPS, seed: int = 0, d_vocab: int = 23, n_ctx: int = 6,
                 safetensors: bool = True) -> tuple[Path, Any]:
    """A language-model run as a TransformerLens user saves it: `config.json` from `cfg.to_dict()` and one state dict
    per checkpoint, after real AdamW steps on random token sequences."""
    cfg = tl_config(d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=d_vocab, n_ctx=n_ctx, seed=seed, device="cpu",
                    **architecture)
    model = tl_model(cfg).train()
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    tokens = torch.randint(0, d_vocab, (8, n_ctx), generator=torch.Generator().manual_seed(seed))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(max(steps) + 1):
        if step in steps:
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            if safetensors:
                save_file(state, str(path / f"step_{step}.safetensors"))
            else:
                torch.save(state, path / f"step_{step}.pt")
        optimiser.zero_grad()
        model(tokens, return_type="loss").backward()
        optimiser.step()
    return path, cfg


def probe_file(path: Path, d_vocab: int = 23, shape=(5, 6), seed: int = 1) -> Path:
    tokens = np.random.default_rng(seed).integers(0, d_vocab, size=shape)
    np.save(path, tokens)
    return path


def checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / f"step_{step}.safetensors"))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_transformerlens_runs_ingest_exactly(tmp_path, name):
    run, cfg = write_tl_run(tmp_path / name, ARCHITECTURES[name])
    probe = probe_file(tmp_path / "probe.npy")
    report = ingest(run, tmp_path / "s.zarr", probe=probe, flatness=FlatnessSettings(n_directions=3), progress=False)
    assert report.added == len(STEPS) and report.flatness_computed == len(STEPS) and report.note is None
    store = geostore.open_store(tmp_path / "s.zarr")
    assert store.family == "hooked_transformer"
    assert store.params["W_Q"].shape == (len(STEPS), cfg.n_layers, 2, 16, 8)
    assert {"embedding", "attention", *(f"layer{i}" for i in range(cfg.n_layers))} <= set(store.groups)
    assert ("mlp" in store.groups) == (not cfg.attn_only)
    assert ("norm" in store.groups) == (cfg.normalization_type == "LN")
    tokens = torch.as_tensor(np.load(probe))
    np.testing.assert_array_equal(store.probe(), tokens.numpy())
    baseline = store.analysis("flatness")["baseline_loss"].values
    flat = []
    for i, step in enumerate(STEPS):
        state = checkpoint(run, step)
        rebuilt = store.model_at(step).state_dict()
        assert set(rebuilt) == set(state)
        for key, value in state.items():
            assert torch.equal(rebuilt[key], value), key
        with torch.no_grad():
            expected = tl_model(cfg, state)(tokens, return_type="loss").item()
        assert baseline[i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        in_table = store.model.checkpoint_state(state, "checkpoint")  # a bridge's layout converted
        flat.append(np.concatenate([in_table[k].double().numpy().ravel() for p in store.table.parameters
                                    for k in p.keys]))
    # every parameter of a language model trains: the trajectory of `all` is every parameter
    assert store.table.trainable == store.table.names
    ours = store.pca("all", n_components=2)
    theirs = PCA(n_components=2).fit(np.stack(flat))
    np.testing.assert_allclose(ours["explained_variance"], theirs.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(ours["projections"]), np.abs(theirs.transform(np.stack(flat))), atol=1e-6)


def test_language_model_without_probe_stores_weights_and_says_flatness_needs_one(tmp_path, capsys):
    run, _ = write_tl_run(tmp_path / "run", ARCHITECTURES["ln_gelu"], safetensors=False)
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(run), str(store), "--quiet", "--directions", "2"]) == 0
    err = capsys.readouterr().err
    assert "--probe" in err and err.count("\n") == 1
    assert geostore.open_store(store).epochs.tolist() == list(STEPS)
    assert geostore.open_store(store).analyses() == []
    assert main(["flatness", str(store), "--quiet", "--directions", "2"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("geostore: error:") and "--probe" in err and err.count("\n") == 1
    bad = probe_file(tmp_path / "bad.npy", d_vocab=99)
    assert main(["flatness", str(store), "--quiet", "--directions", "2", "--probe", str(bad)]) != 0
    assert "token ids must lie in [0, 23)" in capsys.readouterr().err
    assert geostore.open_store(store).probe() is None  # nothing recorded by the refused call
    good = probe_file(tmp_path / "good.npy")
    assert main(["flatness", str(store), "--quiet", "--directions", "2", "--probe", str(good)]) == 0
    assert geostore.open_store(store).analyses() == ["flatness"]
    assert main(["flatness", str(store), "--quiet", "--probe", str(probe_file(tmp_path / "o.npy", seed=7))]) != 0
    assert "holds another probe" in capsys.readouterr().err


def test_modular_addition_on_a_two_layer_transformer_uses_the_grid(tmp_path):
    """A 2-layer LN modular-addition model: its family is recognised from the shapes (n_ctx 3, d_vocab p + 1), its
    loss is the grid's final-position cross-entropy, evaluated by the generic evaluator."""
    from geostore.family.modular_addition import MODULAR_ADDITION, probe
    from geostore.family.modular_addition_fast import supports

    p = 7
    run, cfg = write_tl_run(tmp_path / "run", dict(n_layers=2, normalization_type="LN", act_fn="gelu"),
                            d_vocab=p + 1, n_ctx=3)
    config = json.loads((run / "config.json").read_text())
    config["d_vocab_out"] = p
    (run / "config.json").write_text(json.dumps(config))
    for step in STEPS:  # a modular-addition unembedding has p outputs
        state = checkpoint(run, step)
        if tl_compat.bridge_era():
            state["unembed.weight"], state["unembed.bias"] = state["unembed.weight"][:p].contiguous(), \
                state["unembed.bias"][:p]
        else:
            state["unembed.W_U"], state["unembed.b_U"] = state["unembed.W_U"][:, :p].contiguous(), \
                state["unembed.b_U"][:p]
        save_file(state, str(run / f"step_{step}.safetensors"))
    ingest(run, tmp_path / "s.zarr", flatness=FlatnessSettings(n_directions=2), progress=False)
    store = geostore.open_store(tmp_path / "s.zarr")
    assert store.family == MODULAR_ADDITION.name and store.task["p"] == p
    assert not supports(store.model)  # the fast loss covers 1-layer models without normalisation only
    assert "b_in" not in store.groups["all"] and "ln1.w" in store.groups["all"]  # biases frozen, norms train
    tokens, labels = probe(p)
    cfg = tl_config(**{k: v for k, v in config.items() if k in ("d_model", "n_heads", "d_head", "d_mlp", "d_vocab",
                                                                 "d_vocab_out", "n_ctx", "n_layers", "act_fn",
                                                                 "normalization_type")})
    for i, step in enumerate(STEPS):
        with torch.no_grad():
            logits = tl_model(cfg, checkpoint(run, step))(tokens)
        expected = torch.nn.functional.cross_entropy(logits[:, -1, :p], labels).item()
        assert store.analysis("flatness")["baseline_loss"].values[i] == pytest.approx(expected, rel=1e-5)


def test_families_are_listed_and_a_named_family_must_fit(tmp_path, capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert "modular_addition" in out and "hooked_transformer" in out
    run, _ = write_tl_run(tmp_path / "run", ARCHITECTURES["attn_only"])
    assert main(["ingest", str(run), str(tmp_path / "s.zarr"), "--family", "no_such", "--no-flatness"]) != 0
    assert "unknown model family 'no_such'" in capsys.readouterr().err
    assert main(["ingest", str(run), str(tmp_path / "s.zarr"), "--family", "modular_addition", "--no-flatness"]) != 0
    assert "not a run of the modular_addition family" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_a_store_refuses_checkpoints_of_another_architecture(tmp_path, capsys):
    run, _ = write_tl_run(tmp_path / "a", ARCHITECTURES["ln_gelu"])
    other, _ = write_tl_run(tmp_path / "b", ARCHITECTURES["lnpre_relu"])
    assert main(["ingest", str(run), str(tmp_path / "s.zarr"), "--no-flatness", "--quiet"]) == 0
    before = sorted(p.name for p in (tmp_path / "s.zarr").rglob("*"))
    assert main(["ingest", str(other), str(tmp_path / "s.zarr"), "--no-flatness", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "store holds another model" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "s.zarr").rglob("*")) == before


def test_registry_detects_in_order():
    names = list(registry.families())
    assert names.index("modular_addition") < names.index("hooked_transformer")


def test_every_landscape_analysis_runs_through_the_generic_evaluator(tmp_path):
    """Antithetic curvature, the profile and the Hessian of a language model: the generic evaluator's HVP equals a
    float64 double backward through TransformerLens, and a 2-worker cluster writes the serial bits."""
    from geostore.analysis.curvature import loss_hvp
    from geostore.cluster import open_client
    from geostore.landscape import HessianSettings, ProfileSettings, compute_store_flatness

    run, cfg = write_tl_run(tmp_path / "run", ARCHITECTURES["ln_gelu"])
    probe = probe_file(tmp_path / "probe.npy")
    settings = FlatnessSettings(n_directions=3, antithetic=True, profile=ProfileSettings((0.05, 0.2)),
                                hessian=HessianSettings(n_probes=2, iterations=3))
    ingest(run, tmp_path / "s.zarr", probe=probe, flatness=settings, progress=False)
    store = geostore.open_store(tmp_path / "s.zarr")
    assert store.analyses() == ["flatness", "antithetic", "profile", "hessian", "hessian_groups"]
    assert np.isfinite(store.analysis("hessian")["hessian_trace"]).all()
    groups = store.analysis("hessian_groups")  # layers `W_Q[l]` too: the blocks of the groups that split `all` add up
    assert list(groups["group"].values) == [g for g in store.groups if g != "all"]
    partition = groups["group_hessian_trace"].sel(group=list(store.table.partition())).sum("group")
    np.testing.assert_allclose(partition, store.analysis("hessian")["hessian_trace"], rtol=1e-9)
    theta = store.flatten("all")[-1].compute()  # a layer's positions in the vector hold what the store's layer holds
    for group in ("layer1", "attention"):
        assert np.array_equal(np.sort(theta[store.table.flat_indices(group)]),
                              np.sort(store.flatten(group)[-1].compute()))
    assert np.isfinite(store.analysis("antithetic")["curvature"]).all()
    np.testing.assert_allclose(store.curvature_profile()["epsilon"], [[0.05, 0.2]] * len(STEPS))

    model, tokens = store.model, torch.as_tensor(np.load(probe))
    params = {name: value.astype(np.float64) for name, value in store.params_at(STEPS[-1]).items()}
    hvp, n = loss_hvp(params, model, model.probe(np.load(probe)), dtype=torch.float64)
    assert n == store.n_trainable
    module = tl_model(cfg, checkpoint(run, STEPS[-1])).to(torch.float64)
    # differentiated in the stored layout, swapped into TransformerLens' own model (a bridge keeps another layout)
    weights = [torch.as_tensor(params[name]).requires_grad_(True) for name in model.table.trainable]
    state = model.module_state(module)(model.table.state_dict(dict(zip(model.table.trainable, weights, strict=True))))
    loss = torch.func.functional_call(module, state, (tokens,), {"return_type": "loss"}, tie_weights=False)
    gradient = torch.autograd.grad(loss, weights, create_graph=True)
    vectors = torch.randn(2, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = hvp(vectors)
    for row, vector in enumerate(vectors):
        parts = vector.split([w.numel() for w in weights])  # the flat vector is the stored parameters in table order
        product = torch.autograd.grad(gradient, weights, grad_outputs=[p.reshape(w.shape) for p, w in
                                                                          zip(parts, weights, strict=True)],
                                      retain_graph=True)
        expected = torch.cat([g.reshape(-1) for g in product])
        np.testing.assert_allclose(ours[row].numpy(), expected.numpy(), rtol=1e-8, atol=1e-10)

    parallel = tmp_path / "parallel.zarr"
    ingest(run, parallel, probe=probe, flatness=None, progress=False)
    with open_client(workers=2) as client:
        compute_store_flatness(parallel, FlatnessSettings(n_directions=3), progress=False, client=client)
    xr.testing.assert_equal(geostore.open_store(parallel).analysis("flatness")["delta_losses"],
                            store.analysis("flatness")["delta_losses"])

    from viewer.app import main as geoview

    assert geoview([str(tmp_path / "s.zarr"), "--screenshot", str(tmp_path / "shot.png"), "--group", "layer1"]) == 0


@pytest.mark.parametrize("extra", [*ARCHITECTURES.values(), dict(n_layers=1, normalization_type="RMS"),
                                   dict(n_layers=1, normalization_type=None, d_mlp=None)])
def test_plain_shapes_equal_the_installed_transformerlens_models(extra):
    """The table of a plain architecture comes from its config alone (no TransformerLens import on the CLI's
    path); it must be exactly the shapes of the model the installed TransformerLens builds."""
    from geostore.family import hooked
    from geostore.family.modular_addition import model_config

    config = hooked.architecture({**model_config(7, d_model=16, n_heads=2), **extra}, "test")
    assert hooked.plain_shapes(config) == hooked.module_shapes(hooked.build_module(config))
    assert hooked.plain_shapes({**config, "positional_embedding_type": "rotary"}) is None
