"""Any TransformerLens HookedTransformer language model (`hooked_transformer`), and the model object that every
HookedTransformer family shares.

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
from geostore.family import hooked
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

    def fast_loss(self, frozen: Mapping[str, torch.Tensor], *, for_derivatives: bool = False):
        """Modular addition's exact batched loss where it applies (`modular_addition_fast.supports`), else None."""
        from geostore.family import modular_addition_fast

        if not modular_addition_fast.supports(self):
            return None
        return modular_addition_fast.batched(self, frozen, for_derivatives=for_derivatives)

    def build(self, params: Mapping[str, np.ndarray] | None = None, *, seed: int | None = None,
              dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The HookedTransformer holding `params` (stored names), or freshly initialised (seeded when `seed`),
        computing in `dtype` (default float32)."""
        module = hooked.build_module(self.config, seed=seed, dtype=dtype)
        if params is not None:
            hooked.load_stored(module, self.table, params)
        frozen = {key for p in self.table.parameters if not p.trainable for key in p.keys}
        for key, parameter in module.named_parameters():
            parameter.requires_grad_(key not in frozen)
        return module

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
    """The parameter table of an architecture, read off a freshly built HookedTransformer (cached)."""
    config = json.loads(config_json)
    return hooked.table_from_shapes(hooked.module_shapes(hooked.build_module(config)), "model config")


def model_of(family: str, config: Mapping[str, Any], *, loss: str,
             trainable: Callable[[str], bool] = lambda name: True) -> HookedModel:
    """The HookedModel of an architecture dict: its table read off the model TransformerLens builds."""
    table = _table(json.dumps(dict(config), sort_keys=True))
    parameters = tuple(dataclasses.replace(p, trainable=trainable(p.name)) for p in table.parameters)
    table = ParameterTable(parameters, hooked.groups(parameters, int(config["n_layers"])))
    return HookedModel(family=family, config=dict(config), table=table, loss=loss)


def run_architecture(run: RunInfo) -> dict[str, Any]:
    """A run's architecture: its config.json's HookedTransformerConfig fields over what its shapes tell."""
    inferred = hooked.infer_architecture(run.shapes(), run.origin)
    given = {} if run.config is None else {k: v for k, v in run.config.items() if v is not None
                                           or k == "normalization_type"}
    return hooked.architecture({**inferred, **given}, run.origin)


def check_fits(model: HookedModel, run: RunInfo) -> None:
    """SourceError when the run's first checkpoint does not hold exactly this model's parameters."""
    shapes = {k: tuple(v) for k, v in run.shapes().items() if not hooked.is_buffer(k)}
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
    """Whether a run looks like a HookedTransformer: `embed.W_E` in its state dict."""
    try:
        return "embed.W_E" in run.shapes()
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
