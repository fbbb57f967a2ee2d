"""TransformerLens HookedTransformers of any shape: their parameter tables, configs and exact rebuilding.

A HookedTransformer's state dict names every parameter `blocks.{l}.attn.W_Q`, `blocks.{l}.ln1.w`,
`embed.W_E`, ... The store keeps TransformerLens' short names (`W_Q`, `ln1.w`, `W_E`), stacking the
per-layer ones along a `layer` dimension as `model.W_Q` does, in a fixed order (embeddings, each
block's parts, final norm, unembedding) so the trainable vector is the same for every reader.

Two families build on this: any HookedTransformer language model (`hooked_transformer`, in
`geostore.family.transformer`) and modular addition (`geostore.family.modular_addition`).
Stores and tables use this layout whichever TransformerLens is installed; `geostore.family.tl_compat` builds
the installed version's model (a HookedTransformer on 3.x, a TransformerBridge on 4.x) and converts between
the layouts. TransformerLens is imported only to build a model (`import transformer_lens` takes seconds).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from geostore.errors import SourceError
from geostore.family import tl_compat
from geostore.family.base import LAYER_DIM, Parameter, ParameterTable
from geostore.family.tl_compat import is_buffer

if TYPE_CHECKING:
    import torch

# Per-epoch dimension names of TransformerLens short names; other parameters get generic names.
DIMS: dict[str, tuple[str, ...]] = {
    "W_E": ("d_vocab", "d_model"),
    "W_pos": ("n_ctx", "d_model"),
    "ln1.w": ("d_model",), "ln1.b": ("d_model",), "ln2.w": ("d_model",), "ln2.b": ("d_model",),
    "W_Q": ("n_heads", "d_model", "d_head"),
    "W_K": ("n_heads", "d_model", "d_head"),
    "W_V": ("n_heads", "d_model", "d_head"),
    "W_O": ("n_heads", "d_head", "d_model"),
    "b_Q": ("n_heads", "d_head"),
    "b_K": ("n_heads", "d_head"),
    "b_V": ("n_heads", "d_head"),
    "b_O": ("d_model",),
    "W_in": ("d_model", "d_mlp"),
    "b_in": ("d_mlp",),
    "W_gate": ("d_model", "d_mlp"),
    "W_out": ("d_mlp", "d_model"),
    "b_out": ("d_model",),
    "ln_final.w": ("d_model",), "ln_final.b": ("d_model",),
    "W_U": ("d_model", "d_vocab_out"),
    "b_U": ("d_vocab_out",),
}
ORDER = tuple(DIMS)
# Where each short name lives in a block or at the top of the model.
_BLOCK_PREFIX = {"attn": "", "mlp": "", "ln1": "ln1.", "ln2": "ln2."}
_TOP_KEYS = {"embed.W_E": "W_E", "pos_embed.W_pos": "W_pos", "ln_final.w": "ln_final.w", "ln_final.b": "ln_final.b",
             "unembed.W_U": "W_U", "unembed.b_U": "b_U"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(attn|mlp|ln1|ln2)\.(\w+)")

GROUP_OF = {"W_E": "embedding", "W_pos": "embedding", "W_U": "embedding", "b_U": "embedding",
            "ln1.w": "norm", "ln1.b": "norm", "ln2.w": "norm", "ln2.b": "norm", "ln_final.w": "norm",
            "ln_final.b": "norm", "W_in": "mlp", "b_in": "mlp", "W_gate": "mlp", "W_out": "mlp", "b_out": "mlp"}


def short_key(key: str) -> tuple[str, int | None] | None:
    """`(short name, layer)` of a state-dict key (`layer` None outside the blocks), None for unknown keys."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key], None
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return None
    layer, part, name = match.groups()
    return _BLOCK_PREFIX[part] + name, int(layer)


def table_from_shapes(shapes: Mapping[str, tuple[int, ...]], origin: str,
                      trainable: Callable[[str], bool] = lambda name: True) -> ParameterTable:
    """The parameter table of a HookedTransformer state dict (key -> shape), buffers skipped.

    Groups: `embedding`, `attention`, `mlp`, `norm` (those that are non-empty) and, for more than one
    layer, `layer{l}` (each layered parameter's slice `name[l]`, see `Store.flatten`).
    """
    by_name: dict[str, dict[int | None, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if is_buffer(key):
            continue
        found = short_key(key)
        if found is None or found[0] not in DIMS:
            raise SourceError(f"{origin}: state-dict key {key!r} is not a HookedTransformer parameter geostore "
                              "knows (embed, pos_embed, blocks.N.{attn,mlp,ln1,ln2}, ln_final, unembed)")
        name, layer = found
        by_name.setdefault(name, {})[layer] = tuple(int(s) for s in shape)
    layers = sorted({layer for entries in by_name.values() for layer in entries if layer is not None})
    if layers and layers != list(range(len(layers))):
        raise SourceError(f"{origin}: blocks {layers} are not numbered 0..{len(layers) - 1}")
    parameters = []
    for name in ORDER:
        entries = by_name.get(name)
        if not entries:
            continue
        dims = DIMS[name]
        if None in entries:
            parameters.append(Parameter(name, entries[None], dims, (_top_key(name),), trainable(name)))
            continue
        shapes_seen = set(entries.values())
        missing = [layer for layer in layers if layer not in entries]
        if missing or len(shapes_seen) != 1:
            raise SourceError(f"{origin}: {name} is missing in blocks {missing} or changes shape across blocks")
        shape = shapes_seen.pop()
        if len(shape) != len(dims):
            raise SourceError(f"{origin}: {name} has shape {shape}, expected {len(dims)} dimensions {dims}")
        keys = tuple(_block_key(name, layer) for layer in layers)
        parameters.append(Parameter(name, (len(layers), *shape), (LAYER_DIM, *dims), keys, trainable(name),
                                    layered=True))
    try:
        return ParameterTable(tuple(parameters), groups(parameters, len(layers)))
    except ValueError as exc:
        raise SourceError(f"{origin}: {exc}") from None


def groups(parameters: Iterable[Parameter], n_layers: int) -> dict[str, tuple[str, ...]]:
    """Component groups of HookedTransformer parameters (trainable ones only)."""
    out: dict[str, list[str]] = {}
    trainable = [p for p in parameters if p.trainable]
    for parameter in trainable:
        out.setdefault(GROUP_OF.get(parameter.name, "attention"), []).append(parameter.name)
    ordered = {g: tuple(out[g]) for g in ("embedding", "attention", "mlp", "norm") if g in out}
    if n_layers > 1:
        for layer in range(n_layers):
            ordered[f"layer{layer}"] = tuple(f"{p.name}[{layer}]" for p in trainable if p.layered)
    return ordered


def _top_key(name: str) -> str:
    return next(key for key, short in _TOP_KEYS.items() if short == name)


def _block_key(name: str, layer: int) -> str:
    if name.startswith(("ln1.", "ln2.")):
        return f"blocks.{layer}.{name}"
    part = "mlp" if GROUP_OF.get(name) == "mlp" else "attn"
    return f"blocks.{layer}.{part}.{name}"


# ---------------------------------------------------------------------------------------------- configs
# The architecture fields of HookedTransformerConfig (TransformerLens 3.9) with their defaults (MISSING where
# required): the vocabulary of a stored model config. Fixed here, not read from the installed TransformerLens,
# so a store's config is the same whichever version wrote it (4.x has no HookedTransformerConfig).
MISSING = dataclasses.MISSING
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "d_model": MISSING, "d_head": MISSING, "n_layers": MISSING, "n_ctx": MISSING, "n_heads": -1, "d_mlp": None,
    "d_vocab": -1, "use_attn_result": False, "use_split_qkv_input": False, "positional_embedding_type": "standard",
    "n_key_value_heads": None, "attn_only": False, "gated_mlp": False, "uses_rms_norm": False, "eps": 1e-05,
    "layer_norm_folding": False, "act_fn": "relu", "normalization_type": "LN", "num_experts": None,
    "experts_per_token": None, "final_rms": False, "use_attn_scale": True, "attn_scale": -1.0,
    "use_hook_mlp_in": False, "use_attn_in": False, "use_qk_norm": False, "clip_qkv": None, "use_logn_attn": False,
    "train_seq_length": None, "use_dynamic_ntk_rope": False, "use_local_attn": False,
    "ungroup_grouped_query_attention": False, "window_size": None, "attn_types": None, "attention_dir": "causal",
    "scale_attn_by_inverse_layer_idx": False, "d_vocab_out": -1, "parallel_attn_mlp": False, "rotary_dim": None,
    "use_hook_tokens": False, "post_embedding_ln": False, "rotary_base": 10000, "rotary_base_local": None,
    "rotary_scaling_factor": 1.0, "rotary_adjacent_pairs": False, "relative_attention_max_distance": None,
    "relative_attention_num_buckets": None, "decoder_start_token_id": None, "tie_word_embeddings": False,
    "use_normalization_before_and_after": False, "attn_scores_soft_cap": -1.0, "output_logits_soft_cap": -1.0,
    "use_NTK_by_parts_rope": False, "NTK_by_parts_low_freq_factor": 1.0, "NTK_by_parts_high_freq_factor": 4.0,
    "NTK_by_parts_factor": 8.0, "NTK_original_ctx_len": 8192, "use_yarn_rope": False, "yarn_factor": 1.0,
    "yarn_attention_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0,
    "yarn_original_max_position_embeddings": 4096, "yarn_truncate": True, "yarn_global_attn_only": False,
    "use_attention_sinks": False, "norm_topk_prob": False,
}
REQUIRED = ("n_layers", "d_model", "n_ctx", "d_head", "d_vocab", "act_fn")


def architecture(config: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The architecture fields of a HookedTransformerConfig-like dict, JSON values, the model's defaults dropped
    only where absent; SourceError naming `origin` when a required field is missing or not JSON."""
    out = {}
    for key, value in config.items():
        if key not in ARCHITECTURE_DEFAULTS:
            continue
        if not isinstance(value, str | int | float | bool | type(None) | list | dict):
            raise SourceError(f"{origin}: model config {key}={value!r} is not a plain value")
        out[key] = value
    missing = [k for k in REQUIRED if out.get(k) is None]
    if missing:
        raise SourceError(f"{origin}: model config lacks {', '.join(missing)}")
    if out.get("d_vocab_out") in (-1, None):
        out["d_vocab_out"] = out["d_vocab"]
    if out.get("normalization_type") in ("None", "none"):
        out["normalization_type"] = None
    return out


# Fields `plain_shapes` understands; a config with any other field away from its default (rotary, gated MLPs,
# grouped-query attention, ...) has its shapes read off a built model instead.
PLAIN_FIELDS = frozenset({"d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab", "d_vocab_out",
                          "act_fn", "normalization_type", "attn_only", "eps"})
NORM_PARAMETERS = {"LN": ("w", "b"), "RMS": ("w",), "LNPre": (), "RMSPre": (), None: ()}


def plain_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The HookedTransformer parameter shapes of a plain architecture dict (learned positions, LN/RMS/none, ReLU
    or GELU MLPs, attention-only or not) without importing TransformerLens (seconds), or None for other
    architectures. Equal to `module_shapes(build_module(config))` where it answers (tests/test_families.py)."""
    if any(key not in PLAIN_FIELDS and value != ARCHITECTURE_DEFAULTS.get(key, value) for key, value in config.items()):
        return None
    norm = config.get("normalization_type", "LN")
    if norm not in NORM_PARAMETERS:
        return None
    d, d_head, n_ctx = int(config["d_model"]), int(config["d_head"]), int(config["n_ctx"])
    heads = int(config.get("n_heads", -1))
    heads = d // d_head if heads == -1 else heads
    vocab = int(config["d_vocab"])
    vocab_out = vocab if config.get("d_vocab_out") in (-1, None) else int(config["d_vocab_out"])
    d_mlp = int(config.get("d_mlp") or 4 * d)
    norms = NORM_PARAMETERS[norm]
    shapes = {"embed.W_E": (vocab, d), "pos_embed.W_pos": (n_ctx, d)}
    for layer in range(int(config["n_layers"])):
        block = f"blocks.{layer}"
        shapes.update({f"{block}.ln1.{p}": (d,) for p in norms})
        shapes.update({f"{block}.attn.W_{x}": (heads, d, d_head) for x in "QKV"})
        shapes.update({f"{block}.attn.b_{x}": (heads, d_head) for x in "QKV"})
        shapes.update({f"{block}.attn.W_O": (heads, d_head, d), f"{block}.attn.b_O": (d,)})
        if not config.get("attn_only", False):
            shapes.update({f"{block}.ln2.{p}": (d,) for p in norms})
            shapes.update({f"{block}.mlp.W_in": (d, d_mlp), f"{block}.mlp.b_in": (d_mlp,),
                           f"{block}.mlp.W_out": (d_mlp, d), f"{block}.mlp.b_out": (d,)})
    shapes.update({f"ln_final.{p}": (d,) for p in norms})
    shapes.update({"unembed.W_U": (d, vocab_out), "unembed.b_U": (vocab_out,)})
    return shapes


def build_module(config: Mapping[str, Any], *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model of an architecture dict from the installed TransformerLens (`tl_compat.build`), weights not loaded."""
    return tl_compat.build(config, ARCHITECTURE_DEFAULTS, dtype=dtype)


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HookedTransformer-layout key -> shape of a model's parameters (buffers left out), of either era."""
    return {key: tuple(value.shape) for key, value in tl_compat.hooked_state(module).items()}


def load_stored(module: torch.nn.Module, table: ParameterTable, params: Mapping[str, np.ndarray]) -> None:
    """Copy stored parameters into a model of either era in place (buffers kept); ValueError when they do not fit."""
    import torch

    tl_compat.load(module, {key: torch.as_tensor(np.asarray(value)) for key, value in table.state_dict(params).items()})


def initial_params(table: ParameterTable, config: Mapping[str, Any], seed: int | None) -> dict[str, np.ndarray]:
    """geostore's initialisation of a table's parameters (float32, stored layout), drawn from a generator seeded
    with `seed` (fresh entropy for None) in table order: as HookedTransformer's default ("gpt2"), weight matrices
    `W_*` normal with standard deviation 0.8 / sqrt(d_model), norm weights one, biases zero. geostore draws them
    itself so a seed gives the same model on every TransformerLens version (their own seeded draws differ)."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    std = 0.8 / np.sqrt(int(config["d_model"]))
    out = {}
    for parameter in table.parameters:
        if parameter.name.startswith("W_"):
            value = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * np.float32(std)
            out[parameter.name] = value.numpy()
        else:
            fill = 1.0 if parameter.name.endswith(".w") else 0.0
            out[parameter.name] = np.full(parameter.shape, fill, dtype=np.float32)
    return out


def infer_architecture(shapes: Mapping[str, tuple[int, ...]], origin: str) -> dict[str, Any]:
    """A HookedTransformer architecture from state-dict shapes: sizes, layers, normalisation, attention-only.

    What shapes cannot tell takes TransformerLens' defaults except `act_fn`, which is `relu` (the
    modular-addition models') and should come from a config.json for anything else.
    """
    table = table_from_shapes(shapes, origin)
    names = set(table.names)
    for needed in ("W_E", "W_Q", "W_U"):
        if needed not in names:
            raise SourceError(f"{origin}: cannot infer the model config: no {needed} parameter")
    d_vocab, d_model = table["W_E"].shape
    n_layers, n_heads, _, d_head = table["W_Q"].shape
    config: dict[str, Any] = {
        "n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_head": d_head, "d_vocab": d_vocab,
        "d_vocab_out": table["W_U"].shape[1], "act_fn": "relu",
        "normalization_type": ("LN" if "ln1.b" in names or "ln_final.b" in names
                               else "RMS" if "ln1.w" in names or "ln_final.w" in names else None),
        "attn_only": "W_in" not in names,
    }
    if "W_in" in names:
        config["d_mlp"] = table["W_in"].shape[2]
    if "W_pos" in names:
        config["n_ctx"] = table["W_pos"].shape[0]
    else:
        raise SourceError(f"{origin}: no positional embedding (rotary?): give the architecture in a config.json")
    return config
