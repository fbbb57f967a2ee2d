"""The loss of many weight sets at once, for any model family: what flatness, curvature and the Hessian evaluate.

`batched_loss(model, params, probe)` splits one epoch's parameters into the trainable weights (the vector the
analyses perturb, in table order) and the frozen rest, and returns `loss(weights) -> (B,)` for a block of `B`
weight sets. Where the model has a hand-written exact loss (`Model.fast_loss`: modular addition's 1-layer
transformer) it is used; otherwise the generic evaluator swaps each weight set into the family's own torch
model with `torch.func.functional_call`, vectorised over the block with `torch.func.vmap`, on fixed blocks of
`EXAMPLE_BLOCK` probe examples (bounded memory; results never depend on how callers batch), and sums the
per-example losses in float64. `generic_hvp` gives forward-over-reverse Hessian-vector products of the same
loss block by block; `plain_directional_losses` is the reference loop the generic evaluator must equal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from geostore.analysis.flatness import DIRECTION_BLOCK
from geostore.errors import GeostoreError
from geostore.threads import fitted_calls, split_sets

if TYPE_CHECKING:
    from geostore.family.base import Model, Probe

BatchedLoss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""`loss(weights)`: weights `(B, *shape)` by trainable name -> float64 `(B,)` losses."""

# Above this many (probe examples x trainable numbers) an evaluation is compute-bound: vectorising weight sets
# turns its matrix products into batched ones, which ran slower than one set at a time here (a 2-layer LN language
# model, 2048 tokens x 0.8 M parameters: 100 against 63 ms per weight set), so weight sets go one by one; below
# it, per-call overhead dominates and `vmap` wins. A constant of the model and probe, so results never depend on
# timing.
VMAP_WORK = 10**8

# Probe examples per evaluation block: a constant, so the float64 sums never depend on callers. 512 pairs of
# the p=113, d_hidden=512 MLP keep a block of 8 weight sets' hidden activations (8 MB) near the cache.
EXAMPLE_BLOCK = 512


def fast_loss(model: Model, frozen: Mapping[str, torch.Tensor], *, for_derivatives: bool = False
              ) -> BatchedLoss | None:
    """The model's own exact batched loss (its optional `fast_loss`, see `family.base.Model`), or None."""
    method = getattr(model, "fast_loss", None)
    return None if method is None else method(frozen, for_derivatives=for_derivatives)


def batched_loss(model: Model, params: Mapping[str, np.ndarray], probe: Probe | None = None, *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, for_derivatives: bool = False
                 ) -> tuple[dict[str, torch.Tensor], BatchedLoss]:
    """`(weights, loss)`: the trainable parameters of one epoch as tensors (table order) and the batched loss of
    the model around them (frozen parameters fixed at this epoch's values).

    `probe` defaults to the model's own (`model.probe()`); GeostoreError when the family needs one and there is
    none. `for_derivatives` asks for a loss that `torch.func` can differentiate twice (the fast loss has a form
    for it; the generic one always is). A loss that evaluates weight sets one at a time (compute-bound: a large
    model) has `block = 1`: its callers build one perturbed weight set at a time, not a block of copies of
    the weights (8 x 0.65 GB for GPT-2 small), with the same results.
    """
    table = model.table
    tensors = {name: torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype) for name in table.names}
    weights = {name: tensors[name] for name in table.trainable}
    fast = fast_loss(model, {n: v for n, v in tensors.items() if n not in weights}, for_derivatives=for_derivatives)
    # Evaluations run on the threads free at each call (`geostore.threads`): their values do not depend on the
    # count. Derivatives do in their last bits (backward reductions), so they keep torch's count. The fast loss is
    # a pure function of each weight set: its sets are shared among single-threaded workers.
    fit = (lambda fn: fn) if for_derivatives else fitted_calls
    if fast is not None:
        return weights, fast if for_derivatives else split_sets(fast)
    module, probe = _setup(model, params, _probe(model, probe), device, dtype)
    n_examples = len(probe[0])
    swapped = _swapped(model, module)

    def summed(w: dict[str, torch.Tensor], block: Probe) -> torch.Tensor:
        return model.losses(lambda *inputs: swapped(w, inputs), block).sum(dtype=torch.float64)

    def loss(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        keyed = table.state_dict(batch, batched=True)
        if n_examples * table.n_trainable() > VMAP_WORK:  # compute-bound: one weight set at a time, in blocks of
            # as many examples as a vectorised block of weight sets holds (the same activation memory)
            sets = [{key: value[i] for key, value in keyed.items()} for i in range(len(next(iter(keyed.values()))))]
            wide = EXAMPLE_BLOCK * DIRECTION_BLOCK
            return torch.stack([sum(summed(w, block) for block in _blocks(probe, wide)) for w in sets]) / n_examples
        return sum(vmap(summed, in_dims=(0, None))(keyed, block) for block in _blocks(probe)) / n_examples

    if n_examples * table.n_trainable() > VMAP_WORK:
        loss.block = 1  # type: ignore[attr-defined]  # callers may pass one set at a time: the same numbers
    return weights, fit(loss)  # (functools.wraps keeps `block`)


def generic_hvp(params: Mapping[str, np.ndarray], model: Model, probe: Probe | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """`(hvp, D)`: exact Hessian-vector products of the generic mean probe loss at `params`, over the flat
    trainable vector (table order), by forward-over-reverse differentiation in `dtype`, vectorised over a
    `(B, D)` block of vectors. The Hessian of a mean is the sum of the probe blocks' Hessians, so products are
    taken block by block (bounded memory) and summed in float64; `hvp` returns float64 `(B, D)` on the CPU."""
    module, probe = _setup(model, params, _probe(model, probe), device, dtype)
    swapped = _swapped(model, module)
    names = model.table.trainable
    weights = {name: torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype) for name in names}
    sizes = [w.numel() for w in weights.values()]
    n = len(probe[0])

    def product(tangent: dict[str, torch.Tensor], block: Probe) -> torch.Tensor:
        def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
            forward = lambda *inputs: swapped(model.table.state_dict(w), inputs)  # noqa: E731
            return model.losses(forward, block).sum(dtype=torch.float64) / n
        out = jvp(grad(loss), (weights,), (tangent,))[1]
        return torch.cat([out[name].reshape(-1) for name in names]).double()

    def hvp(vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.to(device=device, dtype=dtype)
        tangents = {name: part.reshape(len(vectors), *weights[name].shape)
                    for name, part in zip(names, vectors.split(sizes, dim=1), strict=True)}
        total = torch.zeros(vectors.shape, dtype=torch.float64, device=device)
        for block in _blocks(probe):
            total += vmap(product, in_dims=(0, None))(tangents, block)  # the primal computed once per block
        return total.cpu()

    return hvp, sum(sizes)


def plain_directional_losses(
    params: Mapping[str, np.ndarray],
    model: Model,
    probe: Probe | None = None,
    *,
    n_directions: int,
    scales: Sequence[float],
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, np.ndarray]:
    """`flatness.directional_losses` the plain way (the seed's loop): build the module once; for each scale and
    direction copy the perturbed weights into its parameters, forward the whole probe, take the mean loss
    (float64), and restore the original weights, bit for bit (also when a forward raises)."""
    from geostore.analysis.flatness import draw_directions, perturbed

    module, probe = _setup(model, params, _probe(model, probe), device, dtype)
    weights = {name: torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype)
               for name in model.table.trainable}
    directions = draw_directions(model.table.n_trainable(), n_directions, seed)
    to_module = getattr(model, "module_state", lambda module: dict)(module)
    tensors = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    targets = {key: tensors[key] for key in to_module(model.table.state_dict(weights))}
    original = {key: value.detach().clone() for key, value in targets.items()}

    def mean_loss() -> torch.Tensor:
        return model.losses(module, probe).sum(dtype=torch.float64) / len(probe[0])

    deltas = np.empty((len(scales), n_directions), dtype=np.float64)
    try:
        with torch.no_grad():
            baseline = mean_loss()
            for row, scale in enumerate(scales):
                for i in range(n_directions):
                    moved = perturbed(weights, directions[i:i + 1].to(device), scale)
                    for key, value in to_module(model.table.state_dict({n: w[0] for n, w in moved.items()})).items():
                        targets[key].copy_(value)
                    deltas[row, i] = float(mean_loss() - baseline)
                    for key, value in targets.items():
                        value.copy_(original[key])
    finally:
        with torch.no_grad():
            for key, value in targets.items():
                value.copy_(original[key])
    return float(baseline), deltas


def _probe(model: Model, probe: Probe | None) -> Probe:
    """The probe given, else the model's own; GeostoreError naming `--probe` when the family needs one."""
    if probe is None:
        probe = model.probe()
    if probe is None:
        raise GeostoreError(f"the {model.family} model's loss needs a probe (token ids): give one with --probe FILE")
    return probe


def _swapped(model: Model, module: torch.nn.Module) -> Callable[[Mapping[str, torch.Tensor], tuple], torch.Tensor]:
    """`forward(state, inputs)`: `module` on `inputs` with the table's state-dict entries `state` swapped in.

    A family whose module holds its parameters under other paths and layouts converts them (`Model.module_state`,
    e.g. TransformerLens 4's bridge); those paths are exact, so they are swapped as given (`tie_weights=False`:
    the bridge reaches each block under two paths, and torch's untying would swap one object twice and restore
    a swapped-in tensor). Table keys are state-dict keys, whose tied aliases torch swaps along."""
    convert = getattr(model, "module_state", None)
    if convert is None:
        return lambda state, inputs: functional_call(module, state, inputs)
    to_module = convert(module)
    return lambda state, inputs: functional_call(module, to_module(state), inputs, tie_weights=False)


def _setup(model: Model, params: Mapping[str, np.ndarray], probe: Probe, device: str, dtype: torch.dtype
           ) -> tuple[torch.nn.Module, Probe]:
    """The module of `params` in eval mode on `device` computing in `dtype`, every parameter a constant of the loss
    (weights are swapped in by `functional_call`), and the probe on `device`.

    A family whose model computes in a configured dtype (TransformerLens casts attention patterns to `cfg.dtype`)
    builds it in that dtype (`build(params, dtype=...)`); the plain `Module.to` then moves any other model."""
    typed = "dtype" in inspect.signature(model.build).parameters
    module = model.build(params, dtype=dtype) if typed else model.build(params)
    module = torch.nn.Module.to(module.eval().requires_grad_(False), device=device, dtype=dtype)
    return module, tuple(t.to(device) for t in probe)


def _blocks(probe: Probe, size: int = EXAMPLE_BLOCK) -> Iterator[Probe]:
    """The probe in consecutive blocks of `size` examples."""
    for start in range(0, len(probe[0]), size):
        yield tuple(t[start:start + size] for t in probe)
