"""The modular-addition loss of many weight sets at once, exactly, doing only the work the loss needs.

The loss (`modular_addition.loss`) reads the final position only. There the query is the same for every
pair `(a, b)`, and positions 0 and 1 each see one token, so keys and values are computed per token
(`2p + 1` rows, not `3 p^2`). The final residual of a pair is a mix of per-token vectors (per head, a
softmax over three scores), and everything up to the MLP's nonlinearity is linear in it: so the per-token
head outputs are projected once through `[W_in | W_U]` (MLP input and the residual's own logits; as
`value @ (W_O @ [W_in | W_U])`, d_head wide), and each pair only mixes `2 H + 1` projected rows. The one
large matmul left per weight set is the irreducible one, `act(.) @ (W_out @ W_U)` over all pairs (the MLP
output folded into the first `p` unembedding columns), in blocks of grid rows that stay in cache.
The rest is memory-bound, so a block is written as few times as possible: its pre-activations and logits in
two contiguous buffers, each by two batched matmuls (token a's into the transposed buffer, token b's
accumulated onto it), the activation in place, the MLP output accumulated onto the logits in place, then the
cross-entropy. `torch.compile` (inductor, CPU) of the mixing or the cross-entropy measured slower than these
calls at 1 thread (28 against 24.5 ms per weight set, p=113) and took 8-28 s to compile, so it is not used.
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

# Pairs per dense block (whole grid rows): the block's pre-activations (~2.5 MB at d_mlp=512) stay in
# cache while each matmul is still large. A constant, so a loss never depends on how callers batch.
BLOCK_PAIRS = 1024
# Largest logit gap `l_j - l_y` whose exponential is summed directly: 112 terms of exp(80) stay finite in float32.
EXP_LIMIT = 80.0

# Activations in place, for evaluation (flatness), and out of place, for the derivatives torch.func takes.
_ACTIVATIONS = {"relu": torch.relu_, "gelu": lambda x: x.copy_(F.gelu(x))}
_PURE_ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu}


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
    tokens = 2 * p + 1
    per_token = 2 * h * dh * d * (1 + 2 * tokens)  # q; k, v of every token
    project = 2 * h * dh * d * (m + p) + 2 * tokens * h * dh * (m + p) + 2 * d * (m + p)  # W_O @ [W_in | W_U];
    # every token's values through it; the constant @ [W_in | W_U]
    fold = 2 * m * d * p + 2 * d * p  # W_out @ W_U and b_out @ W_U
    mix = 2 * p * p * (2 * h + 1) * (m + p)  # per pair: 2 H projected rows and the constant row
    dense = 2 * p * p * m * p  # act(.) @ (W_out @ W_U)
    return per_token + project + fold + mix + dense


def losses(weights: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor],
           config: Mapping[str, object], *, for_derivatives: bool = False) -> torch.Tensor:
    """The family loss for each of `B` weight sets: `weights` holds the 9 matrices stacked `(B, *shape)`,
    `biases` the shared biases by short name. Returns float64 `(B,)`; the per-pair cross-entropies are
    summed in float64, everything else runs in the weights' dtype on their device.

    Every block writes into one buffer allocated once per call: a dask worker's allocator returns freed memory
    to the system at once (`MALLOC_TRIM_THRESHOLD_=65536`), and fresh multi-MB blocks per step then cost
    page faults that doubled the time per direction.

    `for_derivatives` takes the cross-entropy in a form whose second derivatives stay finite in float32
    (`_smooth_cross_entropy_sum`: the same function, rounded differently) and works out of place, for
    Hessian-vector products through `torch.func`; flatness keeps the default, so stored losses do not
    depend on it.
    """
    check_config(config)
    p = prime_of(config)
    m = int(config["d_mlp"])
    act, pure_act = _ACTIVATIONS[str(config["act_fn"])], _PURE_ACTIVATIONS[str(config["act_fn"])]
    scale = math.sqrt(int(config["d_head"]))
    rows = max(1, BLOCK_PAIRS // p)
    grid = torch.arange(p, device=weights["W_E"].device)
    labels = [((grid[:, None] + grid[a0:a0 + rows]) % p).reshape(-1) for a0 in range(0, p, rows)]  # pairs (b, a)
    work = None if for_derivatives else weights["W_E"].new_empty(rows * p * (m + p))  # every block's output
    totals = []
    for i in range(len(weights["W_E"])):
        w = {name: value[i] for name, value in weights.items()}
        mixer = _Mixer(w, biases, p, scale)
        fold = w["W_out"] @ w["W_U"][:, :p]  # (m, p)
        total = torch.zeros((), dtype=torch.float64, device=grid.device)
        for block, a0 in zip(labels, range(0, p, rows), strict=True):
            hidden, direct = mixer.preactivations(a0, len(block) // p, m, work)
            if for_derivatives:
                logits = torch.addmm(direct, pure_act(hidden), fold)
                total = total + _smooth_cross_entropy_sum(logits, block)
            else:
                logits = direct.addmm_(act(hidden), fold)  # onto the residual's logits, in place
                total += _cross_entropy_sum_(logits, block)
        totals.append(total / (p * p))
    return torch.stack(totals)


def _cross_entropy_sum_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float64 sum of the rows' cross-entropies, each as `log1p(sum over j != y of exp(l_j - l_y))`;
    overwrites `logits`.

    Mathematically `logsumexp(l) - l_y`, but `1 + rest` is never rounded to float32: near zero loss (after
    grokking) each pair's loss keeps its relative precision instead of being quantized to ~6e-8. A block with
    a gap above EXP_LIMIT (exp would overflow) takes `logsumexp` of the gaps, accurate at such losses.
    """
    gaps = logits.sub_(logits.gather(1, labels[:, None]))  # l_j - l_y: 0 at the label
    if bool(gaps.amax() > EXP_LIMIT):
        return torch.logsumexp(gaps, dim=1).sum(dtype=torch.float64)
    rest = gaps.scatter_(1, labels[:, None], -math.inf).exp_().sum(dim=1)
    return torch.log1p(rest).sum(dtype=torch.float64)


def _smooth_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`_cross_entropy_sum_` as `softplus(m + log sum over j != y of exp(l_j - l_y - m))`, `m` the largest
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
    """The final position's MLP input and direct logits of one weight set, for any block of grid rows `a`."""

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
        # Everything up to the nonlinearity is linear in the residual: project each token's head outputs (and
        # the residual's constant part x_= + b_O) through [W_in | W_U] once, and mix projected rows per pair.
        # Per head the three weights sum to 1, so the `=` token's rows join the constant and each pair mixes
        # `2 H + 1` rows (a and b relative to `=`, then the constant). A head's output is `value @ W_O`, so its
        # projection is `value @ (W_O @ project)`: d_head wide instead of d_model.
        w_u = w["W_U"][:, :p]
        project = torch.cat([w["W_in"], w_u], dim=1)  # (d, m + p)
        head_project = w["W_O"] @ project  # (H, dh, m + p)
        relative = ((values[:, :2 * p] - values[:, -1:]) @ head_project).transpose(0, 1)  # (2p, H, m + p)
        const = ((x[-1] + biases["b_O"]) @ project + (values[:, -1:] @ head_project).sum(dim=0)[0]
                 + torch.cat([biases["b_in"], biases["b_out"] @ w_u + biases["b_U"][:p]]))
        # Token a and the constant: per a, one matmul of [weights, 1] by [rows, const].
        self.coef = torch.cat([e_a / norm, norm.new_ones(p, p, 1)], dim=-1)  # (a, b, H + 1)
        self.rows = torch.cat([relative[:p], const.expand(p, 1, -1)], dim=1)  # (a, H + 1, m + p)
        # Token b: per b, one matmul, accumulated into the same output.
        self.coef_b = (e_b / norm).transpose(0, 1).contiguous()  # (b, a, H)
        self.rows_b = relative[p:].contiguous()  # (b, H, m + p)

    def preactivations(self, a0: int, n_a: int, m: int, work: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(hidden, logits)`, `(p * n_a, m)` and `(p * n_a, p)`: the MLP pre-activations and the residual's logits
        (biases included) of the pairs `(a, b)` with `a` in `[a0, a0 + n_a)`, row `b * n_a + a - a0`. Written
        into `work` (two contiguous blocks, each in two passes: token a's matmul into the transposed output,
        token b's accumulated onto it), or into new tensors (out of place, as autograd needs) without one."""
        p, width = self.rows_b.shape[0], self.rows_b.shape[-1]
        coef, rows, coef_b = self.coef[a0:a0 + n_a], self.rows[a0:a0 + n_a], self.coef_b[:, a0:a0 + n_a]
        if work is None:
            pre = torch.baddbmm(torch.bmm(coef, rows).transpose(0, 1), coef_b, self.rows_b).view(-1, width)
            return pre[:, :m], pre[:, m:]
        outs = []
        for start, stop in ((0, m), (m, width)):
            out = work[p * n_a * start: p * n_a * stop].view(p, n_a, stop - start)
            torch.bmm(coef, rows[..., start:stop], out=out.transpose(0, 1))
            outs.append(out.baddbmm_(coef_b, self.rows_b[..., start:stop]).view(p * n_a, -1))
        return outs[0], outs[1]


# The HookedTransformerConfig fields the fast loss reads; every other architecture field must keep its default.
_READ_FIELDS = {"n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn",
                "normalization_type"}


def supports(model: object) -> bool:
    """Whether the fast loss computes `model`'s loss exactly: the modular-addition family's 1-layer model without
    normalisation, relu or gelu, biases frozen, every other architecture field at TransformerLens' default."""
    from geostore.family import hooked
    from geostore.family.modular_addition import NAME, TRAINABLE

    config = getattr(model, "config", {})
    if getattr(model, "family", None) != NAME or set(model.table.trainable) != set(TRAINABLE):
        return False
    try:
        check_config(config)
    except (GeostoreError, KeyError, ValueError):
        return False
    return all(value == hooked.ARCHITECTURE_DEFAULTS.get(key) for key, value in config.items()
               if key not in _READ_FIELDS)


def batched(model: object, frozen: Mapping[str, torch.Tensor], *, for_derivatives: bool = False):
    """The fast loss of a supported model as `loss(weights) -> (B,)`: `weights` its trainable parameters
    `(B, *shape)` under the model's table names, `frozen` the others (one epoch's values)."""
    table = model.table  # type: ignore[attr-defined]
    config = model.config  # type: ignore[attr-defined]
    layered = {p.name for p in table.parameters if p.layered}
    biases = {name: value[0] if name in layered else value for name, value in frozen.items()}

    def loss(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        flat = {name: w[:, 0] if name in layered else w for name, w in weights.items()}
        return losses(flat, biases, config, for_derivatives=for_derivatives)

    return loss
