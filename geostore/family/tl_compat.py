"""The two eras of TransformerLens behind one interface: which is installed, the model it builds, and the two
state-dict layouts.

TransformerLens 3.x builds `HookedTransformer`s; 4.0 removed them for `TransformerBridge` (3.9 has both). A
store keeps every TransformerLens model in the HookedTransformer layout whichever version wrote or reads it
(`blocks.0.attn.W_Q` as `(n_heads, d_model, d_head)`, `blocks.0.mlp.W_in` as `(d_model, d_mlp)`, ...). The
bridge layout (`blocks.0.attn.q.weight` as `(n_heads * d_head, d_model)`, `blocks.0.mlp.in.weight` as
`(d_mlp, d_model)`, `unembed.weight` as `(d_vocab_out, d_model)`, ...) is converted to it on ingest and back
when a bridge is built; the logits of the two models are then bit-identical. On 3.x `build` gives a
HookedTransformer, on 4.x a `TransformerBridge.boot_native` model, so `Store.model_at` returns the model of the
installed version.

The conversions work on numpy arrays and torch tensors alike and need no TransformerLens; it is imported only
to build a model (`import transformer_lens` takes seconds).
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from geostore.errors import SourceError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")  # numpy arrays or torch tensors: every conversion is reshape, swapaxes and transposes


def _flat_heads(w: T) -> T:  # W_Q/K/V (H, d, dh) -> (H*dh, d)
    return w.swapaxes(1, 2).reshape(-1, w.shape[1])


def _heads_of(n_heads: int) -> Callable[[T], T]:  # (H*dh, d) -> (H, d, dh)
    return lambda w: w.reshape(n_heads, -1, w.shape[1]).swapaxes(1, 2)


def _flat_out(w: T) -> T:  # W_O (H, dh, d) -> (d, H*dh)
    return w.reshape(-1, w.shape[2]).swapaxes(0, 1)


def _out_heads_of(n_heads: int) -> Callable[[T], T]:  # (d, H*dh) -> (H, dh, d)
    return lambda w: w.swapaxes(0, 1).reshape(n_heads, -1, w.shape[0])


def _flat(b: T) -> T:  # b_Q/K/V (H, dh) -> (H*dh,)
    return b.reshape(-1)


def _bias_heads_of(n_heads: int) -> Callable[[T], T]:
    return lambda b: b.reshape(n_heads, -1)


def _same(x: T) -> T:
    return x


def _transposed(x: T) -> T:
    return x.swapaxes(0, 1)


# HookedTransformer key suffix -> (bridge key suffix, to bridge, to HookedTransformer given n_heads), the most
# specific first (".b_Q" before the norms' ".b"). Top-level keys are matched whole.
_SUFFIXES: tuple[tuple[str, str, Callable, Callable[[int], Callable]], ...] = (
    *((f".W_{x}", f".{x.lower()}.weight", _flat_heads, _heads_of) for x in "QKV"),
    *((f".b_{x}", f".{x.lower()}.bias", _flat, _bias_heads_of) for x in "QKV"),
    (".W_O", ".o.weight", _flat_out, _out_heads_of),
    (".b_O", ".o.bias", _same, lambda h: _same),
    (".W_in", ".in.weight", _transposed, lambda h: _transposed),
    (".b_in", ".in.bias", _same, lambda h: _same),
    (".W_gate", ".gate.weight", _transposed, lambda h: _transposed),
    (".W_out", ".out.weight", _transposed, lambda h: _transposed),
    (".b_out", ".out.bias", _same, lambda h: _same),
    (".w", ".weight", _same, lambda h: _same),
    (".b", ".bias", _same, lambda h: _same),
)
_TOP = {"embed.W_E": ("embed.weight", _same), "pos_embed.W_pos": ("pos_embed.weight", _same),
        "unembed.W_U": ("unembed.weight", _transposed), "unembed.b_U": ("unembed.bias", _same)}
# Buffers HookedTransformer keeps in state dicts (attention masks, IGNORE, rotary tables): never parameters.
BUFFER_SUFFIXES = ("attn.mask", "attn.IGNORE", "rotary_sin", "rotary_cos")


def is_buffer(key: str) -> bool:
    """Whether a HookedTransformer state-dict key is a buffer (attention mask, IGNORE, rotary tables)."""
    return key.endswith(BUFFER_SUFFIXES)


def is_bridge_layout(keys: object) -> bool:
    """Whether state-dict keys are TransformerBridge's (`embed.weight`), not HookedTransformer's (`embed.W_E`)."""
    return "embed.weight" in keys and "embed.W_E" not in keys  # type: ignore[operator]


def bridge_key(key: str) -> str:
    """The bridge-layout key of a HookedTransformer-layout key (`blocks.0.attn.W_Q` -> `blocks.0.attn.q.weight`)."""
    return _convert_key(key)[0]


def _convert_key(key: str) -> tuple[str, Callable]:
    if key in _TOP:
        return _TOP[key]
    for hooked, bridge, to_bridge, _ in _SUFFIXES:
        if key.endswith(hooked):
            return key[: -len(hooked)] + bridge, to_bridge
    raise SourceError(f"state-dict key {key!r} has no TransformerBridge counterpart")


def to_bridge(state: Mapping[str, T]) -> dict[str, T]:
    """A HookedTransformer-layout state dict in the bridge layout (HookedTransformer buffers dropped)."""
    out = {}
    for key, value in state.items():
        if not is_buffer(key):
            new_key, convert = _convert_key(key)
            out[new_key] = convert(value)
    return out


def to_hooked(state: Mapping[str, T], n_heads: int, origin: str = "state dict") -> dict[str, T]:
    """A bridge-layout state dict in the HookedTransformer layout; `n_heads` splits the flat attention matrices.
    SourceError naming `origin` for a key with no HookedTransformer counterpart."""
    top = {bridge: (hooked, convert) for hooked, (bridge, convert) in _TOP.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key][0]] = top[key][1](value)
            continue
        found = key.startswith(("blocks.", "ln_final.")) and next(
            ((key[: -len(bridge)] + hooked, to_hooked_of) for hooked, bridge, _, to_hooked_of in _SUFFIXES
             if key.endswith(bridge)), None)
        if not found:
            raise SourceError(f"{origin}: state-dict key {key!r} is not a TransformerBridge parameter geostore knows "
                              "(embed, pos_embed, blocks.N.{attn.{q,k,v,o},mlp.{in,out,gate},ln1,ln2}, ln_final, "
                              "unembed)")
        out[found[0]] = found[1](n_heads)(value)
    return out


def to_hooked_shapes(shapes: Mapping[str, tuple[int, ...]], n_heads: int, origin: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a bridge-layout state dict, in the HookedTransformer layout (no array is allocated)."""
    empty = {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}
    return {key: tuple(value.shape) for key, value in to_hooked(empty, n_heads, origin).items()}


# ------------------------------------------------------------------------------------------------ the installed era
@functools.cache
def bridge_era() -> bool:
    """Whether the installed TransformerLens builds bridges (4.x, where `HookedTransformer` is gone) rather than
    HookedTransformers (3.x). Read from the package metadata: `hasattr(transformer_lens, "HookedTransformer")`
    raises on 4.x, and importing it costs seconds."""
    return int(importlib.metadata.version("transformer-lens").split(".")[0]) >= 4


# Architecture fields the native bridge implements as HookedTransformer does; any other must keep its default
# there (a rotary or parallel-attention model would otherwise compute another function). Hook switches
# (use_attn_result, ...) do not change the numbers and pass.
_BRIDGE_FIELDS = {"n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out", "act_fn",
                  "normalization_type", "attn_only", "eps", "final_rms", "attention_dir", "use_attn_scale",
                  "attn_scale"}
_HOOK_SWITCHES = {"use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in", "use_hook_tokens",
                  "uses_rms_norm", "layer_norm_folding", "ungroup_grouped_query_attention"}
_BRIDGE_ACTIVATIONS = {"relu", "gelu", "gelu_new", "silu"}
_BRIDGE_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}


def build(config: Mapping[str, Any], defaults: Mapping[str, Any], *, dtype: torch.dtype | None = None
          ) -> torch.nn.Module:
    """A model of an architecture dict (HookedTransformerConfig fields; `defaults` the stored config's defaults)
    in eval mode on the CPU, computing in `dtype` (default float32), of the installed TransformerLens: a
    HookedTransformer on 3.x, a native TransformerBridge on 4.x. Its weights are not initialised for use
    (TransformerLens' seeded draws differ between the eras): callers load their own (`load`). SourceError for a
    config the installed version cannot build exactly."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens 3.x warns that HookedTransformer is deprecated
        if not bridge_era():
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            try:
                cfg = HookedTransformerConfig(**dict(config), device="cpu", dtype=dtype, init_weights=False)
            except (TypeError, ValueError, AssertionError) as exc:
                raise SourceError(f"not a valid HookedTransformer config: {exc}") from None
            return HookedTransformer(cfg).eval()
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        _check_bridgeable(config, defaults)
        fields = {k: v for k, v in config.items() if k in _BRIDGE_FIELDS}
        try:
            cfg = TransformerBridgeConfig(**fields, dtype=dtype, init_weights=False)
            return TransformerBridge.boot_native(cfg, device="cpu", dtype=dtype).eval()
        except (TypeError, ValueError, AssertionError) as exc:
            raise SourceError(f"not a valid TransformerBridge config: {exc}") from None


def _check_bridgeable(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """SourceError unless TransformerLens 4's native bridge computes exactly this HookedTransformer architecture."""
    changed = sorted(k for k, v in config.items()
                     if k not in _BRIDGE_FIELDS | _HOOK_SWITCHES and v != defaults.get(k, v))
    problems = [f"{k}={config[k]!r}" for k in changed]
    if config.get("act_fn") not in _BRIDGE_ACTIVATIONS:
        problems.append(f"act_fn={config.get('act_fn')!r}")
    if config.get("normalization_type", "LN") not in _BRIDGE_NORMS:
        problems.append(f"normalization_type={config.get('normalization_type')!r}")
    if problems:
        raise SourceError(f"TransformerLens {importlib.metadata.version('transformer-lens')} (TransformerBridge) "
                          f"cannot build this HookedTransformer exactly: {', '.join(problems)}; install "
                          "transformer-lens 3.9 for it")


def _paths(module: torch.nn.Module) -> dict[str, str]:
    """Bridge state-dict key -> the module's own attribute path of that tensor (the bridge nests the native model's
    tensors under `_original_component`, and keeps the unembedding bias as a buffer)."""
    tensors = {(t.data_ptr(), t.shape): path for path, t in [*module.named_buffers(), *module.named_parameters()]}
    return {key: tensors[value.data_ptr(), value.shape] for key, value in module.state_dict().items()}


def to_module(module: torch.nn.Module) -> Callable[[Mapping[str, T]], dict[str, T]]:
    """`convert(state)`: HookedTransformer-layout entries as `module`'s own attribute paths and layouts, what
    `torch.func.functional_call` and in-place copies need (the identity for a HookedTransformer)."""
    if not bridge_era():
        return dict
    paths = _paths(module)
    return lambda state: {paths[key]: value for key, value in to_bridge(state).items()}


def load(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a HookedTransformer-layout state dict into `module` in place (buffers kept); ValueError when it does
    not fit."""
    converted = to_bridge(state) if bridge_era() else dict(state)
    missing, unexpected = module.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not is_buffer(k)]
    if missing or unexpected:
        raise ValueError(f"parameters do not fit the model: missing {missing}, unexpected {unexpected}")


def hooked_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's parameters as a HookedTransformer-layout state dict (buffers dropped), whichever era built it."""
    state = module.state_dict()
    if is_bridge_layout(state):
        return to_hooked(state, int(module.cfg.n_heads), "model")
    return {key: value for key, value in state.items() if not is_buffer(key)}


def set_trainable(module: torch.nn.Module, frozen: set[str]) -> None:
    """`requires_grad` on every parameter of `module` but those of the HookedTransformer-layout keys `frozen`."""
    if bridge_era():
        paths = _paths(module)
        frozen = {paths[bridge_key(key)] for key in frozen}
    for path, parameter in module.named_parameters():
        parameter.requires_grad_(path not in frozen)
