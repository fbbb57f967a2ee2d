"""The loss of many weight sets at once, for any model family: what flatness, curvature and the Hessian evaluate.

`batched_loss(model, params, probe)` splits one epoch's parameters into the trainable weights (the vector the
analyses perturb, in table order) and the frozen rest, and returns `loss(weights) -> (B,)` for a block of `B`
weight sets. Where the family has a hand-written exact loss (`registry.fast_loss`: modular addition's 1-layer
transformer) it is used; otherwise the generic evaluator runs the family's own torch model through
`torch.func.functional_call`, vectorised over the block with `torch.func.vmap`, on slices of the probe, and
sums the per-example losses in float64.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from geostore.errors import GeostoreError

if TYPE_CHECKING:
    from geostore.family.base import Model, Probe

BatchedLoss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""`loss(weights)`: weights `(B, *shape)` by trainable name -> float64 `(B,)` losses."""

# Probe examples per vmapped forward: bounds the activations of a block of directions. A constant, so a loss
# never depends on callers.
EXAMPLE_BLOCK = 1024


def batched_loss(model: Model, params: Mapping[str, np.ndarray], probe: Probe | None = None, *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, for_derivatives: bool = False
                 ) -> tuple[dict[str, torch.Tensor], BatchedLoss]:
    """`(weights, loss)`: the trainable parameters of one epoch as tensors (table order) and the batched loss of
    the model around them (frozen parameters fixed at this epoch's values).

    `probe` is the model's probe (`model.probe(...)`); GeostoreError when the family needs one and it is None.
    `for_derivatives` asks for a loss that `torch.func` can differentiate twice (the fast loss has a form for it).
    """
    from geostore.family.registry import fast_loss

    table = model.table
    tensors = {name: torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype) for name in table.names}
    weights = {name: tensors[name] for name in table.trainable}
    frozen = {name: value for name, value in tensors.items() if name not in weights}
    fast = fast_loss(model, frozen, for_derivatives=for_derivatives)
    if fast is not None:
        return weights, fast
    if probe is None:
        probe = model.probe()
    if probe is None:
        raise GeostoreError(f"the {model.family} model's loss needs a probe (token ids): give one with --probe FILE")
    return weights, generic_loss(model, tensors, probe, device=device, dtype=dtype)


def generic_loss(model: Model, tensors: Mapping[str, torch.Tensor], probe: Probe, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> BatchedLoss:
    """The family's mean per-example loss as a batched function of the trainable weights: the model built once
    with this epoch's parameters, the trainable ones swapped in by `functional_call` under `vmap`."""
    from torch.func import functional_call, vmap

    table = model.table
    params = {name: value.detach().cpu().numpy() for name, value in tensors.items()}
    # A family whose model computes in a configured dtype (TransformerLens casts attention patterns to
    # `cfg.dtype`) builds it in that dtype; the plain `Module.to` then moves any other model.
    typed = "dtype" in inspect.signature(model.build).parameters
    module = model.build(params, dtype=dtype) if typed else model.build(params)
    torch.nn.Module.to(module, device=device, dtype=dtype)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    inputs = tuple(t.to(device) for t in probe)
    n_examples = int(inputs[0].shape[0])

    def one(weights: Mapping[str, torch.Tensor], block: tuple[torch.Tensor, ...]) -> torch.Tensor:
        entries = table.state_dict(weights)

        def forward(*args: torch.Tensor) -> torch.Tensor:
            return functional_call(module, entries, args)

        return model.losses(forward, block).to(torch.float64).sum()

    def loss(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for start in range(0, n_examples, EXAMPLE_BLOCK):
            block = tuple(t[start:start + EXAMPLE_BLOCK] for t in inputs)
            part = vmap(one, in_dims=(0, None))(dict(weights), block)
            total = part if total is None else total + part
        return total / n_examples

    return loss
