"""The landscape losses of any family's `Model`: directional losses and exact Hessian-vector products.

Works through the family's contract alone: the trainable vector is the table's trainable parameters in
table order, flattened and concatenated; a weight set is swapped into the module built once from the stored
parameters with `torch.func.functional_call` (frozen parameters and buffers stay the module's), and the
loss is the mean of `model.losses` over the probe, summed in float64. `directional_losses` evaluates a
block of `DIRECTION_BLOCK` perturbed weight sets at once (`torch.func.vmap`) on fixed blocks of
`EXAMPLE_BLOCK` probe examples, so memory stays bounded and a result never depends on how callers batch;
`plain_directional_losses` is the reference loop it must equal (perturb in place, forward, restore).
`loss_hvp` gives forward-over-reverse Hessian-vector products of the same loss for `curvature`'s
`hutchinson_trace` and `lanczos_top_eigenvalue`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from geostore.analysis.curvature import Hvp
from geostore.analysis.flatness import DIRECTION_BLOCK, draw_directions
from geostore.family.base import Model, Probe

# Probe examples per evaluation block: a constant, so the float64 sums never depend on callers. 512 pairs of
# the p=113, d_hidden=512 MLP keep a block of 8 weight sets' hidden activations (8 MB) near the cache.
EXAMPLE_BLOCK = 512


def perturbed(weights: Mapping[str, torch.Tensor], names: Sequence[str], directions: torch.Tensor, scale: float
              ) -> dict[str, torch.Tensor]:
    """The parameters `names` (in this order: the trainable vector's) moved by `scale` along each row of
    `directions` `(B, D)`: `(B, *shape)` each, `w + scale * step` as `flatness.perturbed` computes it."""
    out, offset = {}, 0
    for name in names:
        w = weights[name]
        step = directions[:, offset:offset + w.numel()].reshape(-1, *w.shape)
        out[name] = w + scale * step
        offset += w.numel()
    if offset != directions.shape[1]:
        raise ValueError(f"directions have {directions.shape[1]} entries, the trainable parameters {offset}")
    return out


def directional_losses(
    model: Model,
    params: Mapping[str, np.ndarray],
    probe: Probe,
    *,
    n_directions: int,
    scales: Sequence[float],
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, np.ndarray]:
    """`(baseline_loss, deltas (len(scales), n_directions) float64)`: `L(theta + s d) - L(theta)` for each scale
    `s` and seeded unit direction `d` (`flatness.draw_directions` over the trainable vector), with `L` the mean
    of `model.losses` on `probe`, for the stored parameters `params` (table names).

    Directions are evaluated `DIRECTION_BLOCK` at a time, each scale on its own, so a scale's row is
    bit-identical whatever other scales are asked for. `dtype` float64 evaluates the same perturbed weights in
    float64, to check the float32 numbers against.
    """
    module, weights, probe = _setup(model, params, probe, device, dtype)
    names = model.table.trainable
    directions = draw_directions(model.table.n_trainable(), n_directions, seed)

    def mean_losses(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss `(B,)` float64 of a batch of weight sets (stored names, `(B, *shape)`)."""
        keyed = model.table.state_dict(batch, batched=True)
        total = 0
        for block in _blocks(probe):
            def losses(w: dict[str, torch.Tensor], block: Probe = block) -> torch.Tensor:
                return model.losses(lambda *inputs: functional_call(module, w, inputs), block)
            total = total + vmap(losses)(keyed).sum(dim=1, dtype=torch.float64)
        return total / len(probe[0])

    rows = []
    with torch.no_grad():
        baseline = mean_losses({name: w[None] for name, w in weights.items()})[0]
        for scale in scales:
            rows.append(torch.cat([
                mean_losses(perturbed(weights, names, directions[i:i + DIRECTION_BLOCK].to(device), scale))
                - baseline for i in range(0, n_directions, DIRECTION_BLOCK)]))
    deltas = torch.stack(rows) if rows else torch.empty((0, n_directions), dtype=torch.float64)
    return float(baseline), deltas.cpu().numpy()


def plain_directional_losses(
    model: Model,
    params: Mapping[str, np.ndarray],
    probe: Probe,
    *,
    n_directions: int,
    scales: Sequence[float],
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, np.ndarray]:
    """`directional_losses` the plain way (the seed's loop): build the module once; for each scale and direction
    copy the perturbed weights into its parameters, forward the whole probe, take the mean loss (float64), and
    restore the original weights, bit for bit (also when a forward raises)."""
    module, weights, probe = _setup(model, params, probe, device, dtype)
    names = model.table.trainable
    directions = draw_directions(model.table.n_trainable(), n_directions, seed)
    targets = {key: module.get_parameter(key) for key in model.table.state_dict(weights)}
    original = {key: value.detach().clone() for key, value in targets.items()}

    def mean_loss() -> torch.Tensor:
        return model.losses(module, probe).sum(dtype=torch.float64) / len(probe[0])

    deltas = np.empty((len(scales), n_directions), dtype=np.float64)
    try:
        with torch.no_grad():
            baseline = mean_loss()
            for row, scale in enumerate(scales):
                for i in range(n_directions):
                    moved = perturbed(weights, names, directions[i:i + 1].to(device), scale)
                    for key, value in model.table.state_dict(moved, batched=True).items():
                        targets[key].copy_(value[0])
                    deltas[row, i] = float(mean_loss() - baseline)
                    for key, value in targets.items():
                        value.copy_(original[key])
    finally:
        with torch.no_grad():
            for key, value in targets.items():
                value.copy_(original[key])
    return float(baseline), deltas


def loss_hvp(model: Model, params: Mapping[str, np.ndarray], probe: Probe, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[Hvp, int]:
    """`(hvp, D)`: exact Hessian-vector products of the mean probe loss at the stored parameters, over the flat
    trainable vector of length `D` (table order), by forward-over-reverse differentiation in `dtype`,
    vectorised over a `(B, D)` block of vectors (`torch.func.vmap`).

    The Hessian of a mean is the sum of the probe blocks' Hessians (each block's loss sum divided by the
    probe size), so the products are taken block by block (`EXAMPLE_BLOCK` examples: bounded memory) and
    summed in float64; `hvp` returns them as float64 `(B, D)` on the CPU.
    """
    module, weights, probe = _setup(model, params, probe, device, dtype)
    names = model.table.trainable
    sizes = [w.numel() for w in weights.values()]
    n = len(probe[0])

    def product(tangent: dict[str, torch.Tensor], block: Probe) -> torch.Tensor:
        def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
            forward = lambda *inputs: functional_call(module, model.table.state_dict(w), inputs)  # noqa: E731
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


def _setup(model: Model, params: Mapping[str, np.ndarray], probe: Probe, device: str, dtype: torch.dtype
           ) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Probe]:
    """The module of `params` in eval mode on `device` in `dtype`, its trainable weights by stored name (the
    module's own tensors are left alone), and the probe on `device`.

    The module moves through its own `to`, one argument at a time and only when it must (HookedTransformer's
    `to` takes one argument and updates its config, which its forward reads)."""
    module = model.build(params).eval().requires_grad_(False)  # frozen parameters stay constants of the loss
    first = next(module.parameters())
    if first.device != torch.device(device):
        module = module.to(torch.device(device))
    if first.dtype != dtype:
        module = module.to(dtype)
    weights = {name: torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype)
               for name in model.table.trainable}
    return module, weights, tuple(t.to(device) for t in probe)


def _blocks(probe: Probe) -> Iterator[Probe]:
    """The probe in consecutive blocks of `EXAMPLE_BLOCK` examples."""
    for start in range(0, len(probe[0]), EXAMPLE_BLOCK):
        yield tuple(t[start:start + EXAMPLE_BLOCK] for t in probe)

