"""Loss-landscape flatness (REQ_031): the loss change along seeded random unit directions in weight space.

Directions are standard normal over the model's trainable vector (its family's trainable parameters,
flattened and concatenated in parameter-table order: one vector, not one per matrix), each normalised to
unit L2 norm, and drawn on the CPU from `torch.Generator().manual_seed(seed)`, one direction after the
other, so direction `i` depends only on the seed, the parameter count and `i`: every epoch, device and
caller sees the same directions (common random numbers across epochs). For each,
`delta_loss = L(theta + epsilon d) - L(theta)` with `L` the family's loss on its probe.

`compute_landscape_flatness` is the reference (REQ_031's contract): it perturbs a torch model in place and
calls the family's loss function. `directional_losses` is what ingest uses: the same directions and
perturbed weights, evaluated in blocks by the model's batched loss (`geostore.analysis.evaluator`: a fast
exact evaluator where the family has one, else `vmap(functional_call)` of the family's loss).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from geostore.errors import GeostoreError
from geostore.threads import fitted_calls

if TYPE_CHECKING:
    from geostore.family.base import Model, Probe

# Directions per call of the fast evaluator: a constant, so an epoch's result never depends on callers.
DIRECTION_BLOCK = 8

# Directions up to this size are drawn once for all of them and cached (every epoch reuses them); larger ones (a
# GPT-2-sized model's is 0.5-0.65 GB) are drawn block by block for each epoch, the same numbers, one block in memory.
CACHED_DIRECTION_BYTES = 2**25

# Values of a direction squared in float64 at once when normalising it (see `_sum_squares`).
_SQUARES_CHUNK = 2**20


def draw_directions(n_params: int, n_directions: int, seed: int) -> torch.Tensor:
    """`(n_directions, n_params)` float32 unit rows (norm taken in float64), drawn on the CPU from `seed`.

    Row `i` is the `i`-th draw of `torch.randn(n_params)` from a generator seeded with `seed`: it does
    not depend on `n_directions`, the thread count or the device the caller runs on. A fresh copy.
    """
    return _directions(int(n_params), int(n_directions), int(seed)).clone()


@functools.lru_cache(maxsize=2)
def _directions(n_params: int, n_directions: int, seed: int) -> torch.Tensor:
    """Cached `draw_directions` (45 MB for the paper's model and 50 directions); callers must not modify it."""
    return torch.from_numpy(_draw(torch.Generator().manual_seed(seed), n_params, n_directions))


def direction_blocks(n_params: int, n_directions: int, seed: int, block: int) -> Iterator[tuple[int, torch.Tensor]]:
    """`(start, rows)`: the rows of `draw_directions` in consecutive blocks of `block`, bit-identical to it; drawn
    once and cached where a direction is at most CACHED_DIRECTION_BYTES, else drawn block by block."""
    if cached_directions(n_params):
        directions = _directions(n_params, n_directions, seed)
        for start in range(0, n_directions, block):
            yield start, directions[start:start + block]
        return
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n_directions, block):
        yield start, torch.from_numpy(_draw(generator, n_params, min(block, n_directions - start)))


def cached_directions(n_params: int) -> bool:
    """Whether the directions of `n_params` trainable numbers are drawn once and cached (all in memory)."""
    return n_params * 4 <= CACHED_DIRECTION_BYTES


def _draw(generator: torch.Generator, n_params: int, count: int) -> np.ndarray:
    """The next `count` unit rows of `generator`: `torch.randn(n_params)` each, normalised in float64."""
    rows = np.empty((count, n_params), dtype=np.float32)
    for row in rows:
        torch.randn(n_params, generator=generator, dtype=torch.float32, out=torch.from_numpy(row))
        norm = math.sqrt(_sum_squares(row))
        for start in range(0, n_params, _SQUARES_CHUNK):  # float64 division, then float32, chunk by chunk, in place
            row[start:start + _SQUARES_CHUNK] = row[start:start + _SQUARES_CHUNK].astype(np.float64) / norm
    return rows


def _sum_squares(row: np.ndarray, chunk: int | None = None) -> float:
    """`np.sum(row.astype(np.float64) ** 2)` bit for bit, without a float64 copy of the whole row.

    numpy sums a contiguous array pairwise, halving it (at multiples of 8) down to blocks of 128 values: the
    halvings above `chunk` values (default _SQUARES_CHUNK; at least 128) are done here, the rest by numpy, so
    the additions are the same (a direction's values are thread-independent and equal to those drawn before).
    """
    if row.size <= max(128, _SQUARES_CHUNK if chunk is None else chunk):  # numpy halves only above 128
        part = row.astype(np.float64)
        return float(np.sum(part * part))
    half = row.size // 2
    half -= half % 8
    return _sum_squares(row[:half], chunk) + _sum_squares(row[half:], chunk)


def perturbed(weights: Mapping[str, torch.Tensor], directions: torch.Tensor, epsilon: float
              ) -> dict[str, torch.Tensor]:
    """The trainable `weights` (in trainable-vector order) moved by `epsilon` along each row of `directions`
    `(B, D)`: `(B, *shape)` each.

    Every flatness path builds perturbed weights here, so they evaluate bit-identical weights.
    """
    out, offset = {}, 0
    for name, w in weights.items():
        step = directions[:, offset:offset + w.numel()].reshape(-1, *w.shape)
        out[name] = w + epsilon * step
        offset += w.numel()
    if offset != directions.shape[1]:
        raise ValueError(f"directions have {directions.shape[1]} entries, the trainable parameters {offset}")
    return out


def compute_landscape_flatness(
    model: torch.nn.Module,
    probe: object,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor] | None,
    n_directions: int = 50,
    epsilon: float = 0.1,
    seed: int | None = None,
    *,
    trainable: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Flatness of `model` the plain way: perturb its weights in place, call `loss_fn(model, probe)`, restore.

    Returns REQ_031's arrays: `baseline_loss` (0-d float64), `delta_losses` (float64 `(n_directions,)`,
    differences of the float32 losses) and `epsilon` (0-d float64). The weights are bit-identical afterwards,
    also when `loss_fn` raises. `seed=None` draws a fresh seed. `loss_fn` must come from the model family:
    without one this raises, never guesses. The directions span `trainable` (parameter keys, in that order;
    default: every parameter with `requires_grad`, in `named_parameters()` order, as geostore's families mark them).
    """
    if loss_fn is None:
        raise GeostoreError("flatness needs the model family's loss function (loss_fn is None), e.g. the mean of a "
                            "geostore Model's `losses`; no default loss is assumed")
    keys = trainable if trainable is not None else [k for k, p in model.named_parameters() if p.requires_grad]
    params = {key: model.get_parameter(key) for key in keys}
    original = {name: param.detach().clone() for name, param in params.items()}
    n_params = sum(w.numel() for w in original.values())
    directions = _directions(n_params, n_directions, secrets.randbits(63) if seed is None else seed)
    device = next(iter(original.values())).device
    deltas = np.empty(n_directions, dtype=np.float64)
    loss_fn = fitted_calls(loss_fn)
    try:
        with torch.no_grad():
            baseline = float(loss_fn(model, probe))
            for i in range(n_directions):
                moved = perturbed(original, directions[i:i + 1].to(device), epsilon)
                for name, param in params.items():
                    param.copy_(moved[name][0])
                deltas[i] = float(loss_fn(model, probe)) - baseline
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(original[name])
    return {"baseline_loss": np.asarray(baseline, dtype=np.float64), "delta_losses": deltas,
            "epsilon": np.asarray(epsilon, dtype=np.float64)}


def flatness_for_params(
    params: Mapping[str, np.ndarray],
    model: Model,
    probe: Probe | None = None,
    *,
    n_directions: int,
    epsilon: float,
    seed: int,
    device: str = "cpu",
) -> tuple[float, np.ndarray]:
    """`(baseline_loss, delta_losses)` of one epoch's parameters (the model's table names, numpy).

    The same directions and perturbed weights as `compute_landscape_flatness`; the losses come from the
    model's batched evaluator (see `directional_losses`). The result is float64 and depends only on
    (seed, n_directions, epsilon, these weights, the probe): not on which epochs a caller processes, in what
    order, or in which process. Torch threads: 1 and 2 give bit-identical results here (MKL on an AMD EPYC;
    benchmarks/flatness.py checks it), but BLAS kernels may round differently on another CPU, BLAS version or
    on CUDA, so a run that must match bitwise keeps one machine type, thread count and device.
    """
    baseline, deltas = directional_losses(params, model, probe, n_directions=n_directions, scales=[epsilon],
                                          seed=seed, device=device)
    return baseline, deltas[0]


def directional_losses(
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
    """`(baseline_loss, deltas (len(scales), n_directions))`: `L(theta + s d) - L(theta)` for each scale `s`
    (any sign) and seeded direction `d`, as `flatness_for_params` computes them.

    Directions are evaluated in fixed blocks of `DIRECTION_BLOCK` by `evaluator.batched_loss` (the family's
    fast exact loss where it has one, else the generic `vmap(functional_call)` evaluator). Each scale's row is
    computed exactly as the one-sided flatness at `epsilon = s`, so the row of a scale equal to the flatness
    epsilon is bit-identical to the stored `delta_losses`, whatever other scales are asked for (the antithetic
    and multi-epsilon measurements build on this). `dtype` float64 evaluates the same directions in float64,
    to check the float32 numbers against.
    """
    from geostore.analysis.evaluator import batched_loss

    weights, loss = batched_loss(model, params, probe, device=device, dtype=dtype)
    n_params = sum(w.numel() for w in weights.values())
    deltas = torch.empty((len(scales), n_directions), dtype=torch.float64)
    with torch.no_grad():
        baseline = loss({name: w[None] for name, w in weights.items()})[0]
        # blocks of the weight sets the loss evaluates at once: one set of a model too large to vectorise
        for start, rows in direction_blocks(n_params, n_directions, seed, getattr(loss, "block", DIRECTION_BLOCK)):
            rows = rows.to(device)
            for k, scale in enumerate(scales):
                deltas[k, start:start + len(rows)] = (loss(perturbed(weights, rows, scale)) - baseline).cpu()
    return float(baseline), deltas.numpy()
