"""Any causal language model that Hugging Face `transformers` builds from a config alone (`transformers`).

The model is `AutoModelForCausalLM.from_config(config.json)` (offline: no weights are downloaded; the stored
tensors are loaded into it exactly), in float32 with eager attention. Its parameters are stored under their
state-dict names, per-layer ones stacked along `layer` (`gpt_neox.layers.attention.dense.weight` holds
`gpt_neox.layers.{l}.attention.dense.weight` for every `l`). Tied weights (GPT-2's `lm_head.weight` is
`transformer.wte.weight`) are one parameter of the module, stored once and tied again by `build`. Groups come from
the parameter names (GPT-NeoX, GPT-2, Llama-style names); a parameter no pattern knows is in `all` only.

The landscape loss is `model(input_ids=probe, labels=probe).loss` over a probe of token ids `(batch, seq)` given
with `--probe FILE`: per sequence the mean next-token cross-entropy, whose mean over equal-length sequences is
that loss.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geostore.errors import GeostoreWarning, SourceError
from geostore.family.base import LAYER_DIM, Forward, Parameter, ParameterTable, Probe, RunInfo
from geostore.family.transformer import check_probe

if TYPE_CHECKING:
    import torch

# config.json fields that describe a file or a run, not the architecture: never stored, never compared.
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache",
                     "_attn_implementation_autoset", "attn_implementation"}
# Dimension names for sizes the config names, in order of preference (the first field of a size names it).
_SIZE_NAMES = (("vocab_size", "vocab"), ("hidden_size", "hidden"), ("n_embd", "hidden"),
               ("intermediate_size", "intermediate"), ("n_inner", "intermediate"),
               ("max_position_embeddings", "position"), ("n_positions", "position"))
# Component group of a parameter, by the first pattern its state-dict name matches.
_GROUP_PATTERNS = (
    ("norm", re.compile(r"(^|\.)(ln_\w+|\w*layer_?norm\w*|norm)\.")),
    ("attention", re.compile(r"\.(attention|attn|self_attn)\.")),
    ("mlp", re.compile(r"\.(mlp|feed_forward)\.")),
    ("embedding", re.compile(r"(^|\.)(embed_in|embed_out|wte|wpe|embed_tokens|embed_positions|lm_head)\.")),
)
_LAYER = re.compile(r"\.(\d+)\.")
# Buffers that older transformers versions saved in checkpoints (causal masks, rotary frequencies).
_LEGACY_BUFFER = re.compile(r"\.(attention|attn)\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def architecture(config: Mapping[str, Any], origin: str = "model config") -> dict[str, Any]:
    """A config.json's architecture fields (file and run facts dropped); SourceError without a `model_type`."""
    if not isinstance(config.get("model_type"), str):
        raise SourceError(f"{origin}: no model_type")
    return {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}


def build_module(config: Mapping[str, Any], *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_config(config)` in `dtype` (default float32), eager attention, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    module = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32, attn_implementation="eager")
    return module.eval()


def _layered_name(key: str) -> tuple[str, int] | None:
    """`(stored name, layer)` of a per-layer key (`a.layers.3.b` -> `a.layers.b`, 3), None for others."""
    match = _LAYER.search(key)
    if match is None:
        return None
    return key[:match.start()] + "." + key[match.end():], int(match.group(1))


def _dims(shape: tuple[int, ...], names: Mapping[int, str]) -> tuple[str, ...]:
    """Dimension names of a shape: the config's name of each size (`dim<size>` else), a repeat numbered
    (`hidden`, `hidden2`), since one array names each dimension once."""
    out = []
    for i, size in enumerate(shape):
        base, repeat = names.get(size, f"dim{size}"), shape[:i].count(size)
        out.append(f"{base}{repeat + 1}" if repeat else base)
    return tuple(out)


def table_of(module: torch.nn.Module, config: Mapping[str, Any]) -> tuple[ParameterTable, list[str]]:
    """The parameter table of a built model, and the parameters no group pattern knows (in `all` only)."""
    sizes: dict[int, str] = {}
    for field, name in _SIZE_NAMES:
        if isinstance(config.get(field), int):
            sizes.setdefault(config[field], name)
    shapes = {key: tuple(p.shape) for key, p in module.named_parameters()}  # tied weights listed once
    layered: dict[str, dict[int, str]] = {}
    for key in shapes:
        split = _layered_name(key)
        if split is not None:
            layered.setdefault(split[0], {})[split[1]] = key
    parameters = []
    for key, shape in shapes.items():
        split = _layered_name(key)
        if split is None:
            parameters.append(Parameter(key, shape, _dims(shape, sizes), (key,)))
            continue
        name, layer = split
        keys = layered[name]
        if layer != min(keys):
            continue
        parameters.append(Parameter(name, (len(keys), *shape), (LAYER_DIM, *_dims(shape, sizes)),
                                    tuple(keys[i] for i in sorted(keys)), layered=True))
    groups: dict[str, list[str]] = {}
    unknown = []
    for parameter in parameters:
        group = next((g for g, pattern in _GROUP_PATTERNS if pattern.search(parameter.keys[0])), None)
        if group is None:
            unknown.append(parameter.name)
        else:
            groups.setdefault(group, []).append(parameter.name)
    ordered = {g: tuple(groups[g]) for g in ("embedding", "attention", "mlp", "norm") if g in groups}
    n_layers = max((p.shape[0] for p in parameters if p.layered), default=0)
    for layer in range(n_layers):
        ordered[f"layer{layer}"] = tuple(f"{p.name}[{layer}]" for p in parameters if p.layered)
    return ParameterTable(tuple(parameters), ordered), unknown


@dataclass(frozen=True)
class _Parts:
    """What a built model tells about its checkpoints: the table, the parameters no group knows, the state-dict
    keys that are buffers, the tied aliases (`lm_head.weight` -> `transformer.wte.weight` for GPT-2), and the
    renamings transformers applies to older checkpoints' keys (`embed_out.` -> `lm_head.` for GPT-NeoX)."""

    table: ParameterTable
    ungrouped: tuple[str, ...]
    buffers: frozenset[str]
    ties: Mapping[str, str]
    renamings: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=8)
def _parts(config_json: str) -> _Parts:
    """The `_Parts` of an architecture, read off the model transformers builds (cached)."""
    config = json.loads(config_json)
    module = build_module(config)
    table, ungrouped = table_of(module, config)
    owner = {id(p): key for key, p in module.named_parameters()}
    ties = {key: owner[id(p)] for key, p in module.named_parameters(remove_duplicate=False)
            if owner[id(p)] != key}
    return _Parts(table, tuple(ungrouped), frozenset(key for key, _ in module.named_buffers()), ties,
                  _renamings(type(module).__name__))


def _renamings(architecture: str) -> tuple[tuple[str, str], ...]:
    """`(pattern, replacement)` of the plain key renamings transformers applies when loading this architecture's
    older checkpoints (its other conversions, which reshape tensors, are not applied)."""
    from transformers.conversion_mapping import WeightRenaming, get_checkpoint_conversion_mapping

    return tuple((source, target) for rule in get_checkpoint_conversion_mapping(architecture) or ()
                 if isinstance(rule, WeightRenaming)
                 for source, target in zip(rule.source_patterns, rule.target_patterns, strict=False))


@dataclass(frozen=True)
class HFModel:
    """A transformers causal language model of one config: table, exact rebuild, probe and per-example loss."""

    family: str
    config: dict[str, Any]
    table: ParameterTable
    needs_probe: bool = True

    @property
    def _parts(self) -> _Parts:
        return _parts(json.dumps(self.config, sort_keys=True))

    def build(self, params: Mapping[str, np.ndarray] | None = None, *, dtype: torch.dtype | None = None
              ) -> torch.nn.Module:
        """The transformers model (eval mode) holding `params` (stored names), tied weights tied again; a fresh
        initialisation for None."""
        import torch

        module = build_module(self.config, dtype=dtype)
        if params is not None:
            stored = {name: torch.as_tensor(np.asarray(params[name])) for name in self.table.names}
            missing, unexpected = module.load_state_dict(self.table.state_dict(stored), strict=False)
            missing = sorted(set(missing) - set(self._parts.ties) - self._parts.buffers)
            if unexpected or missing:
                raise SourceError(f"stored parameters do not fit the {self.config['model_type']} model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return module

    def checkpoint_state(self, state: Mapping[str, Any], origin: str) -> dict[str, Any]:
        """A checkpoint's entries (tensors or shapes) under the stored keys: buffers, tied aliases (SourceError
        naming `origin` when one differs from its target) and the attention-mask buffers older transformers saved
        dropped; keys saved without the base model's prefix (`h.0.attn...` for `transformer.h.0.attn...`) given it."""
        parts = self._parts
        known = {key for p in parts.table.parameters for key in p.keys}
        prefix = {key.split(".", 1)[1]: key for key in known if "." in key}
        out = {}
        for key, value in state.items():
            for pattern, replacement in parts.renamings:
                key = re.sub(pattern, replacement, key) if key not in known else key
            if key in known:
                out[key] = value
            elif key in parts.ties:
                target = state.get(parts.ties[key], state.get(parts.ties[key].split(".", 1)[-1]))
                if isinstance(value, np.ndarray) and target is not None and not np.array_equal(value, target):
                    raise SourceError(f"{origin}: {key} differs from {parts.ties[key]}, which the model ties it to")
            elif key in prefix and prefix[key] not in state:
                out[prefix[key]] = value
            elif key not in parts.buffers and not _LEGACY_BUFFER.search(key):
                out[key] = value
        return out

    def probe(self, stored: np.ndarray | None = None) -> Probe | None:
        """The stored token ids, checked against the vocabulary and the context length."""
        import torch

        if stored is None:
            return None
        limits = {"d_vocab": self.config["vocab_size"], "n_ctx": _context(self.config)}
        return (torch.as_tensor(check_probe(stored, limits, "probe")),)

    def losses(self, forward: Forward, probe: Probe) -> torch.Tensor:
        """Per-sequence mean next-token cross-entropy `(N,)`; their mean is `model(probe, labels=probe).loss`."""
        import torch
        import torch.nn.functional as F

        (tokens,) = probe
        logits = forward(tokens).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        return per_token.reshape(tokens.shape[0], -1).mean(dim=1)


def _context(config: Mapping[str, Any]) -> int:
    for field in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(config.get(field), int):
            return int(config[field])
    return 2**31 - 1


class TransformersFamily:
    """Causal language models of Hugging Face `transformers`, built from their config.json."""

    name = "transformers"

    def recognise(self, run: RunInfo) -> bool:
        if run.config is None or not isinstance(run.config.get("model_type"), str):
            return False
        from transformers import CONFIG_MAPPING

        return run.config["model_type"] in CONFIG_MAPPING

    def from_run(self, run: RunInfo) -> HFModel:
        if run.config is None:
            raise SourceError(f"{run.origin}: no config.json")
        try:
            model = self.model(architecture(run.config, run.origin))
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{run.origin}: transformers cannot build a causal language model from it "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if model._parts.ungrouped:
            warnings.warn(GeostoreWarning(f"{run.origin}: no component group for "
                                          f"{', '.join(model._parts.ungrouped)} (in 'all' only)"), stacklevel=2)
        expected = {key: p.key_shape for p in model.table.parameters for key in p.keys}
        shapes = model.checkpoint_state(dict(run.shapes()), run.origin)
        for key, shape in expected.items():
            if key not in shapes:
                raise SourceError(f"{run.origin}: the checkpoint lacks {key} of the configured model")
            if tuple(shapes[key]) != shape:
                raise SourceError(f"{run.origin}: {key} has shape {tuple(shapes[key])}, the configured model's "
                                  f"is {shape}")
        return model

    def model(self, config: Mapping[str, Any]) -> HFModel:
        arch = architecture(config)
        return HFModel(family=self.name, config=arch, table=_parts(json.dumps(arch, sort_keys=True)).table)

    def task(self, run: RunInfo) -> dict[str, Any]:
        return {"family": self.name}

    def split(self, model: HFModel, train_indices: np.ndarray) -> None:
        return None


TRANSFORMERS = TransformersFamily()
