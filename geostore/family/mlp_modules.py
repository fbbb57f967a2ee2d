"""The torch modules of the reference project's two MLP families, with its state-dict names.

`TwoLayerMLP` is training-dynamics-workbench's `ModuloAddition2LMLP` (`W_in`: `Linear(2p, d_hidden)`, ReLU,
`W_out`: `Linear(d_hidden, p)`, no biases) and `LearnedEmbMLP` its `ModuloAdditionEmbedMLP` (`embed_a`,
`embed_b`: `Embedding(p, d_embed)`, summed, then the same two layers). Both take integer inputs `(a, b)`.
The reference feeds the 2-layer MLP one-hot rows `[onehot(a) | onehot(b)]`; a one-hot row times `W_in^T`
adds exactly the two selected columns (every other product is an exact zero), so `TwoLayerMLP` adds those
columns directly: the same numbers without the `2p`-wide matmul. Kept apart from `mlp.py` so importing the
family stays torch-free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoLayerMLP(nn.Module):
    """One-hot `(a, b)` -> `Linear(2p, d_hidden)` -> ReLU -> `Linear(d_hidden, p)`, no biases; `forward(a, b)`."""

    def __init__(self, p: int, d_hidden: int) -> None:
        super().__init__()
        self.p = p
        self.W_in = nn.Linear(2 * p, d_hidden, bias=False)
        self.relu = nn.ReLU()
        self.W_out = nn.Linear(d_hidden, p, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits `(N, p)` of integer pairs `a`, `b` `(N,)`: `W_in` applied to `[onehot(a) | onehot(b)]`."""
        columns = self.W_in.weight.T.contiguous()  # 2p rows, gathered by pair
        return self.W_out(self.relu(F.embedding(a, columns) + F.embedding(self.p + b, columns)))


class LearnedEmbMLP(nn.Module):
    """`embed_a(a) + embed_b(b)` -> `Linear(d_embed, d_hidden)` -> ReLU -> `Linear(d_hidden, p)`, no biases."""

    def __init__(self, p: int, d_embed: int, d_hidden: int) -> None:
        super().__init__()
        self.embed_a = nn.Embedding(p, d_embed)
        self.embed_b = nn.Embedding(p, d_embed)
        self.W_in = nn.Linear(d_embed, d_hidden, bias=False)
        self.relu = nn.ReLU()
        self.W_out = nn.Linear(d_hidden, p, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits `(N, p)` of integer pairs `a`, `b` `(N,)`."""
        return self.W_out(self.relu(self.W_in(self.embed_a(a) + self.embed_b(b))))
