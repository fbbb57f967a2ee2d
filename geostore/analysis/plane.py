"""The loss on a plane of weight space: the grid's axes and the losses of its points, pure numerics.

The plane passes through an origin `theta0` (a parameter vector) and is spanned by two directions `u1`, `u2`
(unit PCA components, zero outside their group): `theta(a, b) = theta0 + a u1 + b u2`. `plane_axes` lays the
grid over a trajectory's scores on those directions, with margin; `plane_row` evaluates one row of the grid
(fixed `a`, every `b`) through a batched loss (`geostore.analysis.evaluator.batched_loss`) in fixed blocks of
`DIRECTION_BLOCK` points, the same blocks flatness evaluates its directions in, so a row's values never depend
on which other rows a caller computes or in what order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from geostore.analysis.evaluator import BatchedLoss
from geostore.analysis.flatness import DIRECTION_BLOCK
from geostore.errors import StoreError


def plane_axes(scores: np.ndarray, resolution: int, span: float) -> tuple[np.ndarray, np.ndarray]:
    """`(pc1, pc2)`: `resolution` evenly spaced values along each of the two columns of `scores` `(n, 2)` (the
    trajectory's PC scores), centred on the middle of their range and reaching `span` times its half-width
    either side (`span` 1 touches the extreme epochs; above 1 leaves a margin)."""
    if resolution < 2:
        raise StoreError(f"`resolution` must be at least 2 (points along each axis), got {resolution}")
    if not np.isfinite(span) or span <= 0:
        raise StoreError(f"`span` must be a positive number (times the trajectory's half-range), got {span}")
    axes = []
    for column in np.asarray(scores, dtype=np.float64).T:
        low, high = float(column.min()), float(column.max())
        if not high > low:
            raise StoreError("the trajectory does not move along this component: no plane to span")
        middle, half = (low + high) / 2, span * (high - low) / 2
        axes.append(np.linspace(middle - half, middle + half, resolution))
    return axes[0], axes[1]


def plane_row(loss: BatchedLoss, origin: Mapping[str, torch.Tensor], u1: Mapping[str, torch.Tensor],
              u2: Mapping[str, torch.Tensor], a: float, b_values: Sequence[float], dtype: torch.dtype
              ) -> np.ndarray:
    """Float64 losses of `origin + a u1 + b u2` for each `b` of `b_values`: the three are float64 tensors by
    trainable name on the loss's device; each point is formed in float64 and rounded once to `dtype`, the
    loss's. Evaluated in blocks of `DIRECTION_BLOCK` points."""
    out = []
    with torch.no_grad():
        for start in range(0, len(b_values), DIRECTION_BLOCK):
            b = torch.as_tensor(np.asarray(b_values[start:start + DIRECTION_BLOCK], dtype=np.float64))
            out.append(loss({name: _points(w, u1[name], u2[name], a, b).to(dtype) for name, w in origin.items()}))
    return torch.cat(out).cpu().numpy().astype(np.float64)


def _points(w: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, a: float, b: torch.Tensor) -> torch.Tensor:
    """`(B, *shape)` float64: `w + a d1 + b_k d2` for each `b_k`."""
    return w + a * d1 + b.to(w.device).reshape((-1,) + (1,) * w.dim()) * d2
