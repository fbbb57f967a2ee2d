"""Any TransformerLens HookedTransformer language model (`hooked_transformer`), and the model object that every
HookedTransformer family shares.

Runs are read in either TransformerLens layout (HookedTransformer's `embed.W_E`, or TransformerBridge's
`embed.weight`, converted on load) and stored in the HookedTransformer one; the model built is the installed
version's (`geostore.family.tl_compat`).

The landscape loss of a language model is the mean next-token cross-entropy over a probe of token ids
`(batch, seq)` that the user gives (`--probe FILE`), equal to TransformerLens'
`model(tokens, return_type="loss")`; the store keeps the probe, so later analyses need nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geostore.errors import SourceError
from geostore.family import hooked, tl_compat
from geostore.family.base import Forward, ParameterTable, Probe, RunInfo

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class HookedModel:
    """A HookedTransformer architecture of one family: its table, exact rebuild, probe and per-example loss.

    `loss` is `"next_token"` (language models: per sequence, the mean next-token cross-entropy) or
    `"final_position"` (modular addition: cross-entropy of the last position's first `p` logits against
    the probe's labels).
    """

    family: str
    config: dict[str, Any]
    table: ParameterTable
    loss: str = "next_token"

    @property
    def needs_probe(self) -> bool:
        return self.loss == "next_token"

    def is_buffer(self, key: str) -> bool:
        """Whether a checkpoint's state-dict key is a HookedTransformer buffer (mask, IGNORE, rotary tables)."""
        return hooked.is_buffer(key)

    def fast_loss(self, frozen: Mapping[str, torch.Tensor], *, for_derivatives: bool = False):
        """Modular addition's exact batched loss where it applies (`modular_addition_fast.supports`), else None."""
        from geostore.family import modular_addition_fast

        if not modular_addition_fast.supports(self):
            return None
        return modular_addition_fast.batched(self, frozen, for_derivatives=for_derivatives)

    def build(self, params: Mapping[str, np.ndarray] | None = None, *, seed: int | None = None,
              dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The installed TransformerLens' model (HookedTransformer on 3.x, TransformerBridge on 4.x) holding
        `params` (stored names), or geostore's initialisation (`hooked.initial_params`, seeded when `seed`: the
        same weights on every version), computing in `dtype` (default float32); frozen parameters do not
        require grad."""
        if params is None:
            params = hooked.initial_params(self.table, self.config, seed)
        module = hooked.build_module(self.config, dtype=dtype)
        hooked.load_stored(module, self.table, params)
        tl_compat.set_trainable(module, {key for p in self.table.parameters if not p.trainable for key in p.keys})
        return module

    def module_state(self, module: torch.nn.Module) -> Callable[[Mapping[str, torch.Tensor]], dict]:
        """How the table's state-dict entries reach a built module: renamed and reshaped to its own attribute
        paths and layouts (TransformerLens 4's bridge), for `torch.func.functional_call` and in-place copies."""
        return tl_compat.to_module(module)

    def stored(self, module: torch.nn.Module) -> dict[str, np.ndarray]:
        """A built module's parameters as stored arrays (float32 copies, this table's names and layout)."""
        state = {key: value.detach().cpu().numpy().copy() for key, value in tl_compat.hooked_state(module).items()}
        return self.table.stored(state, "model")

    def checkpoint_state(self, state: Mapping[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
        """A checkpoint's parameters in the table's layout: a TransformerBridge state dict converted, a
        HookedTransformer one without its buffers (attention masks: no version's model needs them loaded)."""
        if tl_compat.is_bridge_layout(state):
            return tl_compat.to_hooked(state, int(self.config["n_heads"]), origin)
        return {key: value for key, value in state.items() if not hooked.is_buffer(key)}

    def probe(self, stored: np.ndarray | None = None) -> Probe | None:
        """Final-position models: the grid of `modular_addition.probe`; language models: the stored token ids."""
        import torch

        if self.loss == "final_position":
            from geostore.family.modular_addition import probe

            return probe(int(self.config["d_vocab"]) - 1)
        if stored is None:
            return None
        return (torch.as_tensor(check_probe(stored, self.config, "probe")),)

    def losses(self, forward: Forward, probe: Probe) -> torch.Tensor:
        """Per-example losses `(N,)` (float32; float64 for a float64 model) whose mean is the family's loss."""
        import torch.nn.functional as F

        if self.loss == "final_position":
            tokens, labels = probe
            p = int(self.config["d_vocab"]) - 1
            return F.cross_entropy(_at_least_float32(forward(tokens)[:, -1, :p]), labels, reduction="none")
        (tokens,) = probe
        logits = _at_least_float32(forward(tokens)[:, :-1])
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        return per_token.reshape(tokens.shape[0], -1).mean(dim=1)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or float64 when the model computes in float64 (half precision never reaches the loss)."""
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def check_probe(tokens: object, config: Mapping[str, Any], origin: str) -> np.ndarray:
    """Token ids `(batch, seq)` as int64, checked against the model's vocabulary and context; SourceError else."""
    array = np.asarray(tokens)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 2:
        raise SourceError(f"{origin}: a probe is integer token ids of shape (batch, seq >= 2), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise SourceError(f"{origin}: probe tokens must be integers, got {array.dtype}")
    if array.min() < 0 or array.max() >= int(config["d_vocab"]):
        raise SourceError(f"{origin}: probe token ids must lie in [0, {config['d_vocab']}), got "
                          f"{array.min()}..{array.max()}")
    if array.shape[1] > int(config["n_ctx"]):
        raise SourceError(f"{origin}: probe sequences of {array.shape[1]} tokens exceed the model's n_ctx "
                          f"{config['n_ctx']}")
    return array.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _table(config_json: str) -> ParameterTable:
    """The parameter table of an architecture (cached): from its config alone where `hooked.plain_shapes` knows it
    (no TransformerLens import on the CLI's path), else read off a freshly built model."""
    config = json.loads(config_json)
    shapes = hooked.plain_shapes(config) or hooked.module_shapes(hooked.build_module(config))
    return hooked.table_from_shapes(shapes, "model config")


def model_of(family: str, config: Mapping[str, Any], *, loss: str,
             trainable: Callable[[str], bool] = lambda name: True) -> HookedModel:
    """The HookedModel of an architecture dict: its table read off the model TransformerLens builds."""
    table = _table(json.dumps(dict(config), sort_keys=True))
    parameters = tuple(dataclasses.replace(p, trainable=trainable(p.name)) for p in table.parameters)
    table = ParameterTable(parameters, hooked.groups(parameters, int(config["n_layers"])))
    return HookedModel(family=family, config=dict(config), table=table, loss=loss)


def hooked_shapes(run: RunInfo) -> dict[str, tuple[int, ...]]:
    """A run's first checkpoint's key -> shape in the HookedTransformer layout (a bridge-layout run converted: its
    config.json must give `n_heads` or `d_head`, which its flat attention matrices do not tell), buffers left out."""
    shapes = run.shapes()
    if not tl_compat.is_bridge_layout(shapes):
        return {k: tuple(v) for k, v in shapes.items() if not hooked.is_buffer(k)}
    config = run.config or {}
    if config.get("n_heads") is not None:
        n_heads = int(config["n_heads"])
    elif config.get("d_head") is not None and "blocks.0.attn.q.weight" in shapes:
        n_heads = shapes["blocks.0.attn.q.weight"][0] // int(config["d_head"])
    else:
        raise SourceError(f"{run.origin}: a TransformerBridge-layout checkpoint needs n_heads (or d_head) in its "
                          "config.json: its flat attention matrices do not tell the heads apart")
    return tl_compat.to_hooked_shapes(shapes, n_heads, run.origin)


def run_architecture(run: RunInfo) -> dict[str, Any]:
    """A run's architecture: its config.json's HookedTransformerConfig fields over what its shapes tell."""
    inferred = hooked.infer_architecture(hooked_shapes(run), run.origin)
    given = {} if run.config is None else {k: v for k, v in run.config.items() if v is not None
                                           or k == "normalization_type"}
    return hooked.architecture({**inferred, **given}, run.origin)


def check_fits(model: HookedModel, run: RunInfo) -> None:
    """SourceError when the run's first checkpoint does not hold exactly this model's parameters."""
    shapes = hooked_shapes(run)
    expected = {key: p.key_shape for p in model.table.parameters for key in p.keys}
    for key, shape in expected.items():
        if key not in shapes:
            raise SourceError(f"{run.origin}: missing parameter {key} of the configured model")
        if shapes[key] != shape:
            raise SourceError(f"{run.origin}: {key} has shape {shapes[key]}, the configured model's is {shape}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise SourceError(f"{run.origin}: parameters {', '.join(extra[:5])} are not in the configured model")


def looks_hooked(run: RunInfo) -> bool:
    """Whether a run looks like a TransformerLens model: `embed.W_E` (HookedTransformer) or `embed.weight` with
    TransformerBridge attention (`blocks.0.attn.q.weight`) in its state dict."""
    try:
        shapes = run.shapes()
        return "embed.W_E" in shapes or (tl_compat.is_bridge_layout(shapes) and "blocks.0.attn.q.weight" in shapes)
    except SourceError:
        return False


class HookedTransformerFamily:
    """Any HookedTransformer language model: every parameter trainable, loss over a user-given probe."""

    name = "hooked_transformer"

    def recognise(self, run: RunInfo) -> bool:
        return looks_hooked(run)

    def from_run(self, run: RunInfo) -> HookedModel:
        model = self.model(run_architecture(run))
        check_fits(model, run)
        return model

    def model(self, config: Mapping[str, Any]) -> HookedModel:
        return model_of(self.name, hooked.architecture(config, "model config"), loss="next_token")

    def task(self, run: RunInfo) -> dict[str, Any]:
        seeds = {k: run.config[k] for k in ("seed", "model_seed", "data_seed") if run.config and k in run.config}
        return {"family": self.name, **seeds}

    def split(self, model: HookedModel, train_indices: np.ndarray) -> None:
        return None


HOOKED_TRANSFORMER = HookedTransformerFamily()
