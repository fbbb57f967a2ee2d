"""Curvature of the loss landscape that one-sided flatness misses: antithetic pairs, Hutchinson's trace and Lanczos.

Away from a minimum the one-sided `L(theta + eps d) - L(theta)` is dominated by the gradient term
`eps g.d`. Evaluating each direction at `-eps` too separates the two: the *curvature part*
`[L(theta + eps d) + L(theta - eps d)] / 2 - L(theta) = eps^2/2 d'Hd + O(eps^4)` (exactly `eps^2/2 d'Hd` for a
quadratic loss) and the *slope part* `[L(theta + eps d) - L(theta - eps d)] / (2 eps) = g.d + O(eps^2)`. For unit
directions uniform on the sphere, `E[d'Hd] = Tr(H) / D`.

The Hessian itself is reached through exact Hessian-vector products (`torch.func`, forward-over-reverse) of
the family's fast loss: Hutchinson's estimator `Tr(H) = E[v'Hv]` over Rademacher vectors `v`, with its
standard error, and the largest eigenvalue by Lanczos with full reorthogonalisation. The estimators take an
`hvp` callable, so they are tested on a quadratic with a known Hessian; `hessian_for_params` binds them to an
epoch's weights. Restricted to a component group's entries, the same probes' products estimate the trace
of that group's Hessian block, and Lanczos on the projected operator its top eigenvalue. Random vectors come
from a CPU `torch.Generator` seeded per call: the same (seed, weights) give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from geostore.family.base import Model, Probe

# Definitions recorded with the stored values (settings attributes).
ANTITHETIC_DEFINITION = (
    "curvature = [L(theta + eps d) + L(theta - eps d)]/2 - L(theta), slope = [L(theta + eps d) - L(theta - eps d)]"
    "/(2 eps), along the flatness directions d; the +eps evaluations are the one-sided delta_losses"
)
PROFILE_DEFINITION = (
    "per epsilon: mean and standard error over the flatness directions of the antithetic curvature, and the "
    "one-sided flatness ratio mean(L(theta + eps d) - L(theta) < threshold * L(theta)); epsilon times the "
    "L2 norm of the trainable parameters when relative"
)
HESSIAN_DEFINITION = (
    "Hessian of the flatness loss over the trainable parameters, exact Hessian-vector products (torch.func "
    "forward-over-reverse, float32); trace: Hutchinson mean of v'Hv over Rademacher v (torch.randint on a CPU "
    "torch.Generator(seed)), standard error std/sqrt(n_probes); top eigenvalue: largest Ritz value of "
    "`iterations` Lanczos steps with full reorthogonalisation started from the first probe, with its residual"
)

HESSIAN_GROUPS_DEFINITION = (
    "per component group g (the groups but `all`, names in `groups`): trace of the Hessian block H_gg, the "
    "Hutchinson mean of v_g'(Hv)_g over the hessian analysis's Rademacher probes v (the same products), with its "
    "standard error; top eigenvalue of H_gg: largest Ritz value of `iterations` Lanczos steps of P_g H P_g (P_g "
    "zeroes the entries outside g) started from the first probe restricted to g, with its residual"
)

Hvp = Callable[[torch.Tensor], torch.Tensor]
"""`hvp(V)`: the Hessian times each row of a `(B, D)` block of vectors, `(B, D)`."""

# Hutchinson probes per batched Hessian-vector product: 4 cost ~0.65x of 4 separate products on the paper's
# model (the primal forward and backward are shared) for ~1.5x the memory (1.2 GB there). A constant, so an
# epoch's numbers never depend on callers.
PROBE_BLOCK = 4


def antithetic_parts(plus: np.ndarray, minus: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """`(curvature, slope)` from the loss changes `plus = L(theta + eps d) - L(theta)` and `minus = L(theta -
    eps d) - L(theta)` (float64, any shape): `(plus + minus) / 2` and `(plus - minus) / (2 eps)`."""
    plus, minus = np.asarray(plus, dtype=np.float64), np.asarray(minus, dtype=np.float64)
    return (plus + minus) / 2, (plus - minus) / (2 * epsilon)


def profile_row(baseline: float, plus: np.ndarray, minus: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """One epoch of the multi-epsilon profile from `plus`/`minus` `(n_epsilon, n_directions)` loss changes at
    `+-eps_k` along the same directions: per epsilon, the mean antithetic curvature, its standard error, and
    the one-sided flatness ratio (`plus < threshold * baseline`, `threshold` itself where the baseline is 0)."""
    curvature = (np.asarray(plus, dtype=np.float64) + np.asarray(minus, dtype=np.float64)) / 2
    limit = threshold if baseline == 0 else threshold * baseline
    return {
        "profile_curvature": curvature.mean(axis=1),
        "profile_curvature_stderr": standard_error(curvature, axis=1),
        "profile_flatness_ratio": (np.asarray(plus) < limit).mean(axis=1),
    }


def standard_error(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Standard error of the mean along `axis`: sample standard deviation (ddof 1) over sqrt(count); NaN for one."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    if n < 2:
        return np.full(np.delete(values.shape, axis), np.nan)
    return values.std(axis=axis, ddof=1) / math.sqrt(n)


def rademacher(n_params: int, n_probes: int, seed: int) -> torch.Tensor:
    """`(n_probes, n_params)` float32 entries +-1: row `i` is the `i`-th `torch.randint(0, 2, (n_params,))` of a
    CPU generator seeded with `seed`, so it does not depend on `n_probes`, threads or device."""
    generator = torch.Generator().manual_seed(int(seed))
    rows = [torch.randint(0, 2, (n_params,), generator=generator, dtype=torch.int8) for _ in range(n_probes)]
    return (torch.stack(rows).to(torch.float32) * 2 - 1) if rows else torch.empty((0, n_params))


def hutchinson_trace(hvp: Hvp, probes: torch.Tensor) -> tuple[float, float, np.ndarray]:
    """`(trace, stderr, quadratic forms)`: Hutchinson's `Tr(H) = mean(v'Hv)` over the rows `v` of `probes`.

    Products are taken `PROBE_BLOCK` rows at a time. The forms are summed in float64; the standard error is
    their sample standard deviation over the square root of the probe count (NaN for one probe). For
    Rademacher probes the variance of one form is `2 (||H||_F^2 - sum_i H_ii^2)`: exact for diagonal `H`.
    """
    forms = hutchinson_forms(hvp, probes)[:, 0]
    return float(forms.mean()), float(standard_error(forms)), forms


def hutchinson_forms(hvp: Hvp, probes: torch.Tensor, groups: Sequence[np.ndarray] = ()) -> np.ndarray:
    """`(n_probes, 1 + len(groups))` float64 quadratic forms of the rows `v` of `probes`: column 0 `v'Hv`,
    column `1 + g` `v_g'(Hv)_g`, restricted to the indices `groups[g]`.

    For Rademacher `v`, `E[v_g'(Hv)_g] = sum_{i in g} sum_j H_ij E[v_i v_j] = Tr(H_gg)`, the trace of the
    group's Hessian block: every group's trace comes from the products the whole trace takes, for free.
    """
    indices = [torch.as_tensor(np.asarray(g, dtype=np.int64)) for g in groups]
    rows = []
    for block in probes.split(PROBE_BLOCK):
        terms = block.double() * hvp(block).double()
        rows.append(torch.stack([terms.sum(dim=1), *(terms[:, i].sum(dim=1) for i in indices)], dim=1))
    return torch.cat(rows).numpy() if rows else np.empty((0, 1 + len(indices)))


def group_mask(indices: np.ndarray, n_params: int) -> torch.Tensor:
    """`(n_params,)` float32: 1 at `indices`, 0 elsewhere (the projection onto a group's entries: exact in any
    precision)."""
    mask = torch.zeros(n_params)
    mask[torch.as_tensor(np.asarray(indices, dtype=np.int64))] = 1.0
    return mask


def lanczos_top_eigenvalue(hvp: Hvp, start: torch.Tensor, iterations: int) -> tuple[float, float]:
    """`(top, residual)`: the largest Ritz value of `iterations` Lanczos steps from `start`, and its residual norm.

    Lanczos (not power iteration) finds the largest *algebraic* eigenvalue, even when a negative one is larger
    in magnitude (a saddle), and converges much faster. The basis is kept in float64 and fully
    reorthogonalised (twice), so it stays orthogonal in `iterations` steps of float32 products. Some eigenvalue
    of the operator lies within `residual = |beta_k s_k|` of `top` (`s_k` the last entry of its Ritz vector);
    the iteration stops early, with residual 0, when the Krylov space is invariant.
    """
    return lanczos_top_eigenvalues(hvp, start[None], iterations)[0]


def lanczos_top_eigenvalues(hvp: Hvp, starts: torch.Tensor, iterations: int,
                            masks: torch.Tensor | None = None) -> list[tuple[float, float]]:
    """`lanczos_top_eigenvalue` from each row of `starts` `(B, D)`, the runs in lockstep: each step takes the
    products of every unfinished run together, `PROBE_BLOCK` at a time (vectorised, cheaper than one by one).

    With `masks` `(B, D)` (see `group_mask`), run `i` is of the block `P_i H P_i`: its vectors are multiplied by
    `masks[i]` before and after the product, so a start inside a group stays inside it and the Ritz values
    are those of the group's Hessian block.
    """
    bases = [[start.double() / torch.linalg.vector_norm(start.double())] for start in starts]
    alphas: list[list[float]] = [[] for _ in bases]
    betas: list[list[float]] = [[] for _ in bases]
    active = list(range(len(bases)))
    for _ in range(iterations):
        if not active:
            break
        block = torch.stack([bases[i][-1] for i in active]).to(starts.dtype)
        mask = None if masks is None else masks[active]
        products = torch.cat([hvp(chunk) for chunk in (block if mask is None else block * mask).split(PROBE_BLOCK)])
        finished = set()
        for i, w in zip(active, products if mask is None else products * mask, strict=True):
            q, w = bases[i][-1], w.double()
            alphas[i].append(float(torch.dot(q, w)))
            stacked = torch.stack(bases[i])
            for _ in range(2):  # classical Gram-Schmidt against the whole basis, twice
                w = w - stacked.T @ (stacked @ w)
            beta = float(torch.linalg.vector_norm(w))
            if beta <= 1e-12 * max(1.0, max(abs(a) for a in alphas[i])):
                betas[i].append(0.0)
                finished.add(i)
                continue
            betas[i].append(beta)
            bases[i].append(w / beta)
        active = [i for i in active if i not in finished]
    return [_top_ritz_value(a, b) for a, b in zip(alphas, betas, strict=True)]


def _top_ritz_value(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """`(top, residual)` of a Lanczos tridiagonal: its largest eigenvalue and `|beta_k s_k|`."""
    k = len(alphas)
    tridiagonal = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    return float(values[-1]), float(abs(betas[k - 1] * vectors[-1, -1]))


def weight_norm(params: Mapping[str, np.ndarray], names: Sequence[str]) -> float:
    """L2 norm of the trainable vector (the parameters `names`), summed in float64 by numpy (thread-independent)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(params[name], dtype=np.float64)))) for name in names))


def loss_hvp(params: Mapping[str, np.ndarray], model: Model, probe: Probe | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[Hvp, int]:
    """`(hvp, D)`: exact Hessian-vector products of the model's loss at these weights, over the flat trainable
    vector of length `D` (table order), by forward-over-reverse differentiation in `dtype`, vectorised over a
    block of vectors (`torch.func.vmap`).

    The loss is the one flatness evaluates: a family's fast loss in its form made for derivatives (for modular
    addition, the HookedTransformer forward reassociated, whose float64 HVP matches the plain model's double
    backward to ~1e-15), else the generic evaluator's (`evaluator.generic_hvp`, block by block over the probe).
    """
    from torch.func import grad, jvp, vmap

    from geostore.analysis.evaluator import batched_loss, fast_loss, generic_hvp

    if fast_loss(model, {}) is None:
        return generic_hvp(params, model, probe, device, dtype)
    weights, batched = batched_loss(model, params, probe, device=device, dtype=dtype, for_derivatives=True)
    sizes = [w.numel() for w in weights.values()]

    def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return batched({name: value[None] for name, value in w.items()})[0]

    def product(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return jvp(grad(loss), (weights,), (tangent,))[1]

    def hvp(block: torch.Tensor) -> torch.Tensor:
        n = len(block)
        tangents = {name: part.reshape(n, *w.shape) for (name, w), part in
                    zip(weights.items(), block.to(device=device, dtype=dtype).split(sizes, dim=1), strict=True)}
        products = vmap(product)(tangents)  # the tangents batched, the primal computed once
        return torch.cat([products[name].reshape(n, -1) for name in weights], dim=1).cpu()

    return hvp, sum(sizes)


def hessian_for_params(
    params: Mapping[str, np.ndarray],
    model: Model,
    probe: Probe | None = None,
    *,
    n_probes: int,
    iterations: int,
    seed: int,
    device: str = "cpu",
    groups: Mapping[str, np.ndarray] | None = None,
    total: bool = True,
) -> dict[str, float | np.ndarray]:
    """Hessian trace (Hutchinson, `n_probes` Rademacher probes), its standard error, and the top eigenvalue
    (`iterations` Lanczos steps from the first probe) with its residual, for one epoch's stored parameters.

    With `groups` (name -> indices into the trainable vector, see `ParameterTable.flat_indices`), also the same
    four numbers of each group's Hessian block as `(n_groups,)` arrays (`group_hessian_trace`, ...): traces from
    the same probes' products, top eigenvalues from Lanczos on the block, started from the first probe
    restricted to the group. `total=False` leaves out the whole vector's four (adding the groups to a store
    that holds them). Costs `n_probes + iterations` Hessian-vector products, each about ten evaluations of the
    loss, plus `iterations` per group (taken together, `PROBE_BLOCK` groups per vectorised product).
    """
    hvp, n_params = loss_hvp(params, model, probe, device)
    probes = rademacher(n_params, n_probes, seed)
    indices = list((groups or {}).values())
    forms = hutchinson_forms(hvp, probes, indices)
    out: dict[str, float | np.ndarray] = {}
    if total:
        top, residual = lanczos_top_eigenvalue(hvp, probes[0], iterations)
        out.update(hessian_trace=float(forms[:, 0].mean()), hessian_trace_stderr=float(standard_error(forms[:, 0])),
                   top_eigenvalue=top, top_eigenvalue_residual=residual)
    if groups is not None:
        masks = torch.stack([group_mask(g, n_params) for g in indices])
        blocks = lanczos_top_eigenvalues(hvp, probes[0] * masks, iterations, masks)
        out.update(group_hessian_trace=forms[:, 1:].mean(axis=0),
                   group_hessian_trace_stderr=standard_error(forms[:, 1:], axis=0),
                   group_top_eigenvalue=np.array([b[0] for b in blocks]),
                   group_top_eigenvalue_residual=np.array([b[1] for b in blocks]))
    return out
