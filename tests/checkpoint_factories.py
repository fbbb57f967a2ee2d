"""Builders of tiny, real checkpoint sources in every format geostore reads (shared by tests).

Every builder writes real files (torch.save / safetensors) from real TransformerLens weights:
`trajectory()` makes a seeded model and perturbs it once per epoch, and the writers store those
parameters in one format each, exactly as TransformerLens (a HookedTransformer's `state_dict()`, or a
TransformerBridge's), the ARENA run or miscope write them. A trajectory holds each epoch's parameters in the
modular-addition family's table layout (store format 2: `W_Q` is `(layer, n_heads, d_model, d_head)`). Tests
compare what a source loads, turned into stored arrays by the family's table, with the `trajectory()` they wrote.

    traj = trajectory(tiny_config(), [0, 10, 20])
    run = write_state_dict_dir(tmp_path / "run", traj)            # state-dict directory
    run = write_geostore_run(tmp_path / "run", traj)              # geostore run.json directory
    run = write_miscope_variant(tmp_path / "variant", traj)       # training-dynamics-workbench
    file = write_arena_bundle(tmp_path / "full_run_data.pth", arena_trajectory(...))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from geostore.family import hooked, modular_addition, tl_compat
from geostore.family.modular_addition import MODULAR_ADDITION
from geostore.store.schema import METRICS

Trajectory = dict[int, dict[str, np.ndarray]]

MLP_BIASES = ("b_in", "b_out")
ATTENTION_AND_UNEMBED_BIASES = ("b_Q", "b_K", "b_V", "b_O", "b_U")


def tiny_config(p: int = 7, *, d_model: int = 16, n_heads: int = 2, d_vocab_out: int | None = None) -> dict:
    """A small modular-addition config (p=7, d_model=16, 2 heads of 8, d_mlp=64)."""
    config = modular_addition.model_config(p, d_model=d_model, n_heads=n_heads)
    if d_vocab_out is not None:
        config["d_vocab_out"] = d_vocab_out
    return config


def family_model(config: Mapping[str, object]):
    """The modular-addition family's `Model` of a config (its parameter table, exact rebuild, probe)."""
    return MODULAR_ADDITION.model(dict(config))


def trajectory(
    config: Mapping[str, object], epochs: Sequence[int], *, seed: int = 0, biases: str = "all"
) -> Trajectory:
    """Parameters per epoch: a seeded model's weights plus a growing seeded perturbation.

    `biases`: "all" (every bias non-zero), "mlp" (only b_in, b_out non-zero, as in the ARENA run)
    or "none" (biases zero, as a fresh model has them).
    """
    model = family_model(config)
    base = model.stored(model.build(seed=seed))
    rng = np.random.default_rng(seed)
    out: Trajectory = {}
    for step, epoch in enumerate(epochs):
        params = {}
        for name, value in base.items():
            is_bias = name.startswith("b_")
            if is_bias and (biases == "none" or (biases == "mlp" and name not in MLP_BIASES)):
                params[name] = np.zeros_like(value)
                continue
            noise = rng.standard_normal(value.shape).astype(np.float32)
            params[name] = (value + np.float32(0.05 * (step + (1 if is_bias else 0))) * noise).astype(np.float32)
        out[int(epoch)] = params
    return out


def model_with(params: Mapping[str, np.ndarray], config: Mapping[str, object]) -> torch.nn.Module:
    """A model of the installed TransformerLens for `config` holding `params` (stored names and layout)."""
    return family_model(config).build(params)


def tl_state_dict(
    params: Mapping[str, np.ndarray], config: Mapping[str, object], *, buffers: bool = True
) -> dict[str, torch.Tensor]:
    """A HookedTransformer `state_dict()` holding `params`, with its buffers `attn.mask` and `attn.IGNORE` unless
    `buffers=False`: what TransformerLens 3.x (and the ARENA, miscope runs) write. Built from the table, not by
    TransformerLens, so it is the same on 4.x (no HookedTransformer there); tests/test_tl_compat.py checks it
    against a real HookedTransformer's on 3.x."""
    table = family_model(config).table
    state = {k: torch.as_tensor(np.asarray(v)).clone().contiguous() for k, v in table.state_dict(params).items()}
    if buffers:
        n_ctx = int(config["n_ctx"])
        for layer in range(int(config["n_layers"])):
            state[f"blocks.{layer}.attn.mask"] = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool))
            state[f"blocks.{layer}.attn.IGNORE"] = torch.tensor(-torch.inf)
    return state


def bridge_state_dict(params: Mapping[str, np.ndarray], config: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A TransformerBridge `state_dict()` holding `params`: a real `TransformerBridge.boot_native` model (3.9 and 4.x
    both have it) with the weights loaded strictly in its own layout."""
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    fields = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn",
              "normalization_type")
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**{k: config[k] for k in fields}))
    hooked_layout = {k: v for k, v in tl_state_dict(params, config).items() if not hooked.is_buffer(k)}
    bridge.load_state_dict(tl_compat.to_bridge(hooked_layout), strict=True)
    return {k: v.detach().clone().contiguous() for k, v in bridge.state_dict().items()}


def state_dict_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict of tensors as numpy arrays (what `Checkpoint.load()` returns)."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def metrics_of(epoch: int) -> dict[str, float]:
    """Made-up but distinct metric values of an epoch."""
    return {
        "train_loss": 1.0 / (epoch + 1), "test_loss": 2.0 / (epoch + 1),
        "train_accuracy": min(1.0, epoch / 100), "test_accuracy": min(1.0, epoch / 200),
    }


def config_json(config: Mapping[str, object], **extra: object) -> dict:
    """A config.json holding the HookedTransformerConfig fields and `p`."""
    return {**config, "p": int(config["d_vocab"]) - 1, **extra}


def _config_of(traj: Trajectory) -> dict:
    params = next(iter(traj.values()))
    d_vocab, d_model = params["W_E"].shape
    n_layers, n_heads, _, d_head = params["W_Q"].shape
    return {
        "n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_head": d_head,
        "d_mlp": params["W_in"].shape[-1], "d_vocab": d_vocab, "d_vocab_out": params["W_U"].shape[1],
        "n_ctx": params["W_pos"].shape[0], "act_fn": "relu", "normalization_type": None,
    }


# --- a directory of state dicts ----------------------------------------------------------------


def write_state_dict_dir(
    path: Path,
    traj: Trajectory,
    *,
    fmt: str = "safetensors",
    name: str = "checkpoint_{epoch}",
    wrap: str | None = None,
    config: Mapping[str, object] | None = None,
    config_file: dict | None = None,
) -> Path:
    """One state-dict file per epoch (`fmt`: safetensors, pt or pth), optionally nested under `wrap`.

    `config_file`, when given, is written as `config.json` beside the checkpoints.
    """
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config or _config_of(traj))
    for epoch, params in traj.items():
        state = tl_state_dict(params, config)
        file = path / f"{name.format(epoch=epoch)}.{fmt}"
        if fmt == "safetensors":
            if wrap is not None:
                raise ValueError("safetensors files cannot nest a state dict")
            save_file(state, str(file))
        else:
            obj = state if wrap is None else {wrap: state, "epoch": epoch, "optimizer": {"lr": 1e-3}}
            torch.save(obj, file)
    if config_file is not None:
        (path / "config.json").write_text(json.dumps(config_file))
    return path


# --- geostore's own run directory ---------------------------------------------------------------


def write_geostore_run(
    path: Path,
    traj: Trajectory,
    *,
    config: Mapping[str, object] | None = None,
    train_fraction: float = 0.3,
    data_seed: int = 1,
    model_seed: int = 0,
) -> Path:
    """A geostore run directory: run.json (format geostore-run, version 1) and safetensors checkpoints."""
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config or _config_of(traj))
    p = int(config["d_vocab"]) - 1
    entries = []
    for epoch, params in sorted(traj.items()):
        file = f"checkpoint_{epoch:06d}.safetensors"
        save_file(tl_state_dict(params, config, buffers=False), str(path / file))
        entries.append({"epoch": epoch, "file": file, **metrics_of(epoch)})
    run = {
        "format": "geostore-run",
        "version": 1,
        "family": "modular_addition",
        "model_config": dict(config),
        "task": {
            "p": p, "train_fraction": train_fraction, "data_seed": data_seed, "model_seed": model_seed,
            "train_indices": modular_addition.split(p, train_fraction, data_seed).tolist(),
        },
        "training": {
            "optimizer": "AdamW", "lr": 1e-3, "weight_decay": 1.0, "betas": [0.9, 0.98],
            "epochs": max(traj) + 1, "schedule": "every 10",
        },
        "checkpoints": entries,
    }
    (path / "run.json").write_text(json.dumps(run, indent=1))
    return path


# --- the ARENA / Nanda bundle --------------------------------------------------------------------


def arena_trajectory(p: int = 7, epochs: Sequence[int] = (0, 100, 200), *, seed: int = 0) -> Trajectory:
    """A trajectory the ARENA layout can hold: `d_vocab_out = p + 1`, only MLP biases non-zero."""
    return trajectory(tiny_config(p, d_vocab_out=p + 1), epochs, seed=seed, biases="mlp")


def to_original_layout(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HookedTransformer-layout parameters in the paper's original layout and key names.

    The inverse of the documented conversion: W_E, W_Q, W_K, W_V, W_in, W_out transposed on their
    last two axes; W_O `n_heads d_head d_model -> d_model (n_heads d_head)`; W_pos, W_U and the MLP
    biases as they are; no attention or unembedding biases; the causal `mask` buffer.
    """
    state = family_model(_config_of({0: params})).table.state_dict(params)  # state-dict key -> array
    n_heads, d_head, d_model = state["blocks.0.attn.W_O"].shape
    out = {}
    for key in ("embed.W_E", "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V", "blocks.0.mlp.W_in",
                "blocks.0.mlp.W_out"):
        out[key] = torch.from_numpy(np.ascontiguousarray(np.swapaxes(state[key], -1, -2)))
    w_o = state["blocks.0.attn.W_O"].transpose(2, 0, 1).reshape(d_model, n_heads * d_head)
    out["blocks.0.attn.W_O"] = torch.from_numpy(np.ascontiguousarray(w_o))
    for key in ("pos_embed.W_pos", "unembed.W_U", "blocks.0.mlp.b_in", "blocks.0.mlp.b_out"):
        out[key] = torch.from_numpy(np.array(state[key]))
    n_ctx = state["pos_embed.W_pos"].shape[0]
    out["blocks.0.attn.mask"] = torch.tril(torch.ones((n_ctx, n_ctx)))
    return out


def original_forward(state: Mapping[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the paper's own 1-layer transformer (its einsums) from an original-layout state dict."""
    w_e, w_pos = state["embed.W_E"], state["pos_embed.W_pos"]
    w_q, w_k, w_v = (state[f"blocks.0.attn.W_{c}"] for c in "QKV")
    w_o, mask = state["blocks.0.attn.W_O"], state["blocks.0.attn.mask"]
    d_head = w_q.shape[1]
    x = torch.einsum("dbp->bpd", w_e[:, tokens])
    x = x + w_pos[: x.shape[-2]]
    k = torch.einsum("ihd,bpd->biph", w_k, x)
    q = torch.einsum("ihd,bpd->biph", w_q, x)
    v = torch.einsum("ihd,bpd->biph", w_v, x)
    n = x.shape[-2]
    scores = torch.einsum("biph,biqh->biqp", k, q)
    masked = torch.tril(scores) - 1e10 * (1 - mask[:n, :n])
    attn = torch.softmax(masked / np.sqrt(d_head), dim=-1)
    z = torch.einsum("biph,biqp->biqh", v, attn)
    z_flat = z.permute(0, 2, 1, 3).reshape(z.shape[0], n, -1)  # "b i q h -> b q (i h)"
    x = x + torch.einsum("df,bqf->bqd", w_o, z_flat)
    hidden = torch.relu(torch.einsum("md,bpd->bpm", state["blocks.0.mlp.W_in"], x) + state["blocks.0.mlp.b_in"])
    x = x + torch.einsum("dm,bpm->bpd", state["blocks.0.mlp.W_out"], hidden) + state["blocks.0.mlp.b_out"]
    return x @ state["unembed.W_U"]


def write_arena_bundle(path: Path, traj: Trajectory, *, numpy_losses: bool = False) -> Path:
    """A `full_run_data.pth` bundle in the original layout: train losses per epoch, test per checkpoint.

    `path` is the bundle file (its parent is created). With `numpy_losses` the losses are numpy
    float64 scalars instead of Python floats.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = sorted(traj)
    train_losses = [metrics_of(e)["train_loss"] for e in range(max(epochs) + 1)]
    test_losses = [metrics_of(e)["test_loss"] for e in epochs]
    if numpy_losses:
        train_losses = [np.float64(v) for v in train_losses]
        test_losses = [np.float64(v) for v in test_losses]
    bundle = {
        "state_dicts": [to_original_layout(traj[e]) for e in epochs],
        "epochs": epochs,
        "train_losses": train_losses,
        "test_losses": test_losses,
    }
    torch.save(bundle, path)
    return path


# --- training-dynamics-workbench (miscope) ------------------------------------------------------


def write_miscope_variant(
    path: Path,
    traj: Trajectory,
    *,
    config: Mapping[str, object] | None = None,
    seed: int = 3,
    data_seed: int = 5,
    training_fraction: float = 0.3,
    with_extras: bool = True,
) -> Path:
    """A miscope variant: checkpoints/checkpoint_epoch_{e:05d}.safetensors, config.json, metadata.json.

    With `with_extras`, an `artifacts/` file and an `interventions/<label>/` sub-variant that the
    reader must ignore are written too.
    """
    config = dict(config or _config_of(traj))
    p = int(config["d_vocab"]) - 1
    folder = path / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, params in traj.items():
        save_file(tl_state_dict(params, config), str(folder / f"checkpoint_epoch_{epoch:05d}.safetensors"))
    num_epochs = max(traj) + 1
    (path / "config.json").write_text(json.dumps({
        **config,
        "seed": seed, "prime": p, "data_seed": data_seed, "model_seed": seed,
        "training_fraction": training_fraction,
    }))
    train = modular_addition.split(p, training_fraction, data_seed)
    test = np.setdiff1d(np.arange(p * p), train)
    (path / "metadata.json").write_text(json.dumps({
        "train_losses": [metrics_of(e)["train_loss"] for e in range(num_epochs)],
        "test_losses": [metrics_of(e)["test_loss"] for e in range(num_epochs)],
        "train_indices": np.random.default_rng(0).permutation(train).tolist(),
        "test_indices": test.tolist(),
        "checkpoint_epochs": sorted(traj),
        "num_epochs": num_epochs,
    }))
    if with_extras:
        (path / "artifacts" / "parameter_snapshot").mkdir(parents=True)
        (path / "artifacts" / "parameter_snapshot" / "epoch_00000.npz").write_bytes(b"not a checkpoint")
        extra = path / "interventions" / "ablate" / "checkpoints"
        extra.mkdir(parents=True)
        (extra / "checkpoint_epoch_99999.safetensors").write_bytes(b"not read")
    return path


# --- broken and hostile files --------------------------------------------------------------------


class _RunsCode:
    """Unpickling this object runs `code` (what a malicious checkpoint does)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def write_malicious_pickle(path: Path, marker: Path, *, bundle: bool = False) -> Path:
    """A `.pt`/`.pth` file that creates `marker` when unpickled without weights_only.

    It looks like a state dict (or, with `bundle`, an ARENA bundle) with one hostile entry.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _RunsCode(f"open({str(marker)!r}, 'w').close()")
    state = {"embed.W_E": torch.zeros(8, 16), "unembed.W_U": payload}
    torch.save({"state_dicts": [state], "epochs": [0]} if bundle else state, path)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to `keep` of its size (a checkpoint copied or written half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def expected_metrics(epochs: Sequence[int], names: Sequence[str] = METRICS) -> dict[str, dict[int, float]]:
    """The `metrics_of` values of `epochs`, as a source reports them."""
    return {name: {e: metrics_of(e)[name] for e in epochs} for name in names}
