"""The modular-addition loss of many weight sets at once, exactly, doing only the work the loss needs.

The loss (`modular_addition.loss`) reads the final position only. There the query is the same for every
pair `(a, b)`, and positions 0 and 1 each see one token, so keys, values and `value @ W_O` are computed per
token (`2p + 1` rows, not `3 p^2`); per pair and head, attention is a softmax over three scores mixing three
per-token vectors (two small batched matmuls). What remains per pair is dense and done as two large matmuls
per weight set, in blocks of grid rows that stay in cache: `r @ [W_in | W_U]` (MLP input and the residual's
logits) and `act(.) @ (W_out @ W_U)` (the MLP output folded into the first `p` unembedding columns).
This is the HookedTransformer forward reassociated, not approximated: with float64 weights it matches the
plain float64 forward to ~1e-13 (tests/test_flatness.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from geostore.errors import GeostoreError
from geostore.family.modular_addition import prime_of

# Pairs per dense block (whole grid rows): the block's `r @ [W_in | W_U]` (~2.5 MB at d_mlp=512) stays in
# cache while each matmul is still large. A constant, so a loss never depends on how callers batch.
BLOCK_PAIRS = 1024

# In place where autograd allows it (relu keeps its output, which the Hessian-vector products differentiate
# through); gelu's backward needs its input, so it allocates.
_ACTIVATIONS = {"relu": torch.relu_, "gelu": F.gelu}


def check_config(config: Mapping[str, object]) -> None:
    """Refuse a config the evaluator does not implement, rather than compute another model's loss."""
    prime_of(config)
    if int(config["n_layers"]) != 1 or config.get("normalization_type") is not None:
        raise GeostoreError("the fast modular-addition loss needs a 1-layer model without normalization, got "
                            f"n_layers={config['n_layers']}, normalization_type={config.get('normalization_type')}")
    if config["act_fn"] not in _ACTIVATIONS:
        raise GeostoreError(f"the fast modular-addition loss supports act_fn {sorted(_ACTIVATIONS)}, "
                            f"got {config['act_fn']!r}")


def flops_per_weight_set(config: Mapping[str, object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls `losses` does per weight set; elementwise work not counted."""
    p = prime_of(config)
    d, m, h, dh = (int(config[k]) for k in ("d_model", "d_mlp", "n_heads", "d_head"))
    per_token = 2 * h * dh * d * (1 + 2 * (2 * p + 1) + 2 * p + 1)  # q; k, v of 2p+1 tokens; value @ W_O
    mix = 2 * p * p * (3 * h + 1) * (d + 1)  # the attention mix of every pair (and its bias column)
    fold = 2 * m * d * p + 2 * d * p  # W_out @ W_U and b_out @ W_U
    dense = 2 * p * p * ((d + 1) * (m + p) + m * p)  # [r, 1] @ [W_in | W_U; biases], act(.) @ (W_out @ W_U)
    return per_token + mix + fold + dense


def losses(weights: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor],
           config: Mapping[str, object], *, for_derivatives: bool = False) -> torch.Tensor:
    """The family loss for each of `B` weight sets: `weights` holds the 9 matrices stacked `(B, *shape)`,
    `biases` the shared biases by short name. Returns float64 `(B,)`; the per-pair cross-entropies are
    summed in float64, everything else runs in the weights' dtype on their device.

    `for_derivatives` takes the cross-entropy in a form whose second derivatives stay finite in float32
    (`_smooth_cross_entropy_sum`: the same function, rounded differently) for Hessian-vector products;
    flatness keeps the default, so stored losses do not depend on it.
    """
    check_config(config)
    cross_entropy_sum = _smooth_cross_entropy_sum if for_derivatives else _cross_entropy_sum
    p = prime_of(config)
    act = _ACTIVATIONS[str(config["act_fn"])]
    scale = math.sqrt(int(config["d_head"]))
    rows = max(1, BLOCK_PAIRS // p)
    grid = torch.arange(p, device=weights["W_E"].device)
    labels = [((grid[a0:a0 + rows, None] + grid) % p).reshape(-1) for a0 in range(0, p, rows)]
    totals = []
    for i in range(len(weights["W_E"])):
        w = {name: value[i] for name, value in weights.items()}
        mixer = _Mixer(w, biases, p, scale)
        w_u = w["W_U"][:, :p]
        fold = w["W_out"] @ w_u  # (m, p)
        # The residual's last column is 1, so the bias rows below add the biases inside the matmuls.
        w_in = torch.cat([w["W_in"], biases["b_in"][None]])  # (d + 1, m)
        w_u = torch.cat([w_u, (biases["b_out"] @ w_u + biases["b_U"][:p])[None]])  # (d + 1, p)
        total = torch.zeros((), dtype=torch.float64, device=grid.device)
        for block, a0 in zip(labels, range(0, p, rows), strict=True):
            resid = mixer.residual(a0, len(block) // p)  # (pairs, d + 1)
            logits = (resid @ w_u).addmm_(act(resid @ w_in), fold)
            total += cross_entropy_sum(logits, block)
        totals.append(total / (p * p))
    return torch.stack(totals)


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float64 sum of the rows' cross-entropies, each as `log1p(sum over j != y of exp(l_j - l_y))`.

    Mathematically `logsumexp(l) - l_y`, but `1 + rest` is never rounded to float32: near zero loss (after
    grokking) each pair's loss keeps its relative precision instead of being quantized to ~6e-8. A block with
    a logit ~88 above its label's (exp overflows) takes the usual form, accurate at such losses.
    """
    label = logits.gather(1, labels[:, None])
    rest = (logits - label).scatter_(1, labels[:, None], -math.inf).exp_().sum(dim=1)
    if not bool(torch.isfinite(rest).all()):
        return (torch.logsumexp(logits, dim=1) - label[:, 0]).sum(dtype=torch.float64)
    return torch.log1p(rest).sum(dtype=torch.float64)


def _smooth_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`_cross_entropy_sum` as `softplus(m + log sum over j != y of exp(l_j - l_y - m))`, `m` the largest
    `l_j - l_y`: as precise near zero loss, and twice differentiable without overflow at any logit gap (the
    second derivatives of `log1p(rest)` hold products of order `rest^2`, which overflow float32 past a gap
    of ~44: Hessian-vector products of a trained checkpoint came out NaN; softplus is linear past 40, where
    it differs from the exact value by less than 1e-17, so its derivatives never square more than exp(40)).
    Out of place and without data-dependent branches, as `torch.func` needs."""
    label = logits.gather(1, labels[:, None])
    others = (logits - label).scatter(1, labels[:, None], -math.inf)
    top = others.amax(dim=1, keepdim=True)
    gap = top[:, 0] + torch.log((others - top).exp().sum(dim=1))
    return F.softplus(gap, threshold=40.0).sum(dtype=torch.float64)


class _Mixer:
    """The final-position residual after attention of one weight set, for any block of grid rows `a`."""

    def __init__(self, w: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor], p: int, scale: float):
        embed, pos = w["W_E"], w["W_pos"]
        x = torch.cat([embed[:p] + pos[0], embed[:p] + pos[1], embed[p:p + 1] + pos[2]])  # tokens a, b, then =
        query = x[-1] @ w["W_Q"] + biases["b_Q"]  # (H, dh)
        keys = x @ w["W_K"] + biases["b_K"][:, None]  # (H, 2p + 1, dh)
        values = x @ w["W_V"] + biases["b_V"][:, None]
        scores = (keys @ query[..., None])[..., 0].T / scale  # (2p + 1, H)
        s_a, s_b, s_eq = scores[:p, None], scores[None, p:2 * p], scores[-1]
        top = torch.maximum(torch.maximum(s_a, s_b), s_eq)  # softmax over the 3 positions of each pair and head
        e_a, e_b, e_eq = (s_a - top).exp_(), (s_b - top).exp_(), (s_eq - top).exp_()  # (p, p, H) each
        norm = e_a + e_b + e_eq
        sources = F.pad(values @ w["W_O"], (0, 1)).transpose(0, 1)  # (2p + 1, H, d + 1): value @ W_O, then 0
        const = F.pad(x[-1] + biases["b_O"], (0, 1), value=1.0)  # x_= + b_O, then 1: the same for every pair
        # Token a and `=`, and the constant: per a, one matmul of [weights, 1] by [vectors, const].
        self.coef = torch.cat([e_a / norm, e_eq / norm, norm.new_ones(p, p, 1)], dim=-1)  # (a, b, 2H + 1)
        self.vecs = torch.cat([sources[:p], sources[-1:].expand(p, -1, -1), const.expand(p, 1, -1)], dim=1)
        # Token b: per b, one matmul, added transposed.
        self.coef_b = (e_b / norm).transpose(0, 1).contiguous()  # (b, a, H)
        self.vecs_b = sources[p:2 * p].contiguous()  # (b, H, d + 1)

    def residual(self, a0: int, n_a: int) -> torch.Tensor:
        """`(n_a * p, d + 1)`, last column 1: pairs `(a, b)`, `a` in `[a0, a0 + n_a)`, row `(a - a0) * p + b`."""
        resid = torch.bmm(self.coef[a0:a0 + n_a], self.vecs[a0:a0 + n_a])  # (n_a, p, d + 1)
        resid += torch.bmm(self.coef_b[:, a0:a0 + n_a], self.vecs_b).transpose(0, 1)
        return resid.view(-1, resid.shape[-1])
