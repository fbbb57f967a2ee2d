"""Modular addition `(a + b) mod p` (Nanda et al. 2023): model config, probe grid, loss, split.

Everything derives from the model config: `p = d_vocab - 1` (the `=` token has id p), the probe is
the full `p * p` grid of `[a, b, =]` inputs, and the loss is the cross-entropy at the final
position over the first `p` logits (the ARENA run has `d_vocab_out = p + 1`; its extra logit is
ignored). Torch is imported here; import this module only where a model is needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from geostore.errors import SourceError
from geostore.family.base import RunInfo

NAME = "modular_addition"

# The 9 weight matrices of the 1-layer model without normalisation: biases are frozen at zero, as in the
# reference implementation.
TRAINABLE = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U")


def model_config(
    p: int,
    *,
    d_model: int = 128,
    n_heads: int = 4,
    d_head: int | None = None,
    d_mlp: int | None = None,
    act_fn: str = "relu",
) -> dict[str, object]:
    """The 1-layer HookedTransformer config of the task for prime `p` (paper: p=113, d_model=128)."""
    if p < 2:
        raise ValueError(f"p must be at least 2, got {p}")
    if d_head is None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        d_head = d_model // n_heads
    return {
        "n_layers": 1,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": 4 * d_model if d_mlp is None else d_mlp,
        "d_vocab": p + 1,
        "d_vocab_out": p,
        "n_ctx": 3,
        "act_fn": act_fn,
        "normalization_type": None,
    }


def prime_of(config: Mapping[str, object]) -> int:
    """The modulus p of a model config: `d_vocab - 1`, checked against `d_vocab_out` and `n_ctx`."""
    p = int(config["d_vocab"]) - 1
    if int(config["d_vocab_out"]) not in (p, p + 1) or int(config["n_ctx"]) != 3:
        raise SourceError(
            f"config is not a modular-addition model: d_vocab={config['d_vocab']}, "
            f"d_vocab_out={config['d_vocab_out']}, n_ctx={config['n_ctx']}"
        )
    return p


def probe(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full grid: tokens `(p*p, 3)` rows `[a, b, p]` in order `idx = a*p + b`, and labels `(a+b) % p`."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def loss(logits: torch.Tensor, labels: torch.Tensor, p: int) -> torch.Tensor:
    """Mean float32 cross-entropy at the final position over the first `p` logits."""
    return F.cross_entropy(logits[:, -1, :p].float(), labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, p: int) -> float:
    """Fraction of rows whose argmax over the first `p` final-position logits is the label."""
    return (logits[:, -1, :p].argmax(dim=-1) == labels).float().mean().item()


def loss_fn(model: torch.nn.Module, probe_data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The family's loss of `model` on a probe `(tokens, labels)`: the one flatness is measured with."""
    tokens, labels = probe_data
    p = int(model.cfg.d_vocab) - 1
    return loss(model(tokens), labels, p)


def split(p: int, train_fraction: float, data_seed: int) -> np.ndarray:
    """Sorted flat grid indices (`a*p + b`) of the training set, a seeded random `train_fraction` of the grid."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train fraction must lie in (0, 1), got {train_fraction}")
    generator = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(p * p, generator=generator).numpy()
    n_train = round(train_fraction * p * p)
    return np.sort(order[:n_train]).astype(np.int64)


# ------------------------------------------------------------------------------------------------ the family
# config.json fields that describe the task, and their names in a store's `task`.
TASK_FIELDS = {"seed": "seed", "model_seed": "model_seed", "data_seed": "data_seed", "train_fraction": "train_fraction",
               "training_fraction": "train_fraction", "frac_train": "train_fraction"}


def trainable(name: str) -> bool:
    """Weight matrices and normalisation weights train; biases are frozen at zero, as in the reference project."""
    return not name.startswith("b_")


def _prime_in(run: RunInfo) -> int | None:
    """The modulus a config.json records as `p` or `prime`, if any."""
    for key in ("p", "prime"):
        if run.config and run.config.get(key) is not None:
            try:
                return int(run.config[key])
            except (TypeError, ValueError):
                raise SourceError(f"{run.origin}: {key}={run.config[key]!r} is not an integer") from None
    return None


def grid_split(p: int, train_indices: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """The train split as a `(p, p)` boolean grid `[a, b]` from flat indices `a*p + b`, with its dimension names."""
    indices = np.asarray(train_indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= p * p):
        raise SourceError(f"train indices must lie in [0, {p * p}) for p={p}")
    mask = np.zeros(p * p, dtype=bool)
    mask[indices] = True
    return mask.reshape(p, p), ("a", "b")


def task_fields(run: RunInfo) -> dict[str, object]:
    """Seeds and the training fraction a run's config.json records, under their `task` names."""
    config = run.config or {}
    return {name: config[key] for key, name in TASK_FIELDS.items() if config.get(key) is not None}


class ModularAdditionFamily:
    """Modular addition on HookedTransformers of any depth, normalisation and activation: inputs `[a, b, =]`, the
    loss at the final position over the first p logits on the full p x p grid."""

    name = NAME

    def recognise(self, run: RunInfo) -> bool:
        from geostore.family.transformer import hooked_shapes, looks_hooked

        if not looks_hooked(run):
            return False
        if _prime_in(run) is not None:
            return True
        try:
            shapes = hooked_shapes(run)
        except SourceError:
            return False  # the generic family names what is missing
        d_vocab = shapes["embed.W_E"][0]
        n_ctx = shapes.get("pos_embed.W_pos", (None,))[0]
        d_vocab_out = shapes.get("unembed.W_U", (None, None))[-1]
        return n_ctx == 3 and d_vocab_out in (d_vocab - 1, d_vocab)

    def from_run(self, run: RunInfo):
        from geostore.family.transformer import check_fits, run_architecture

        architecture = run_architecture(run)
        p = _prime_in(run)
        if p is not None and int(architecture["d_vocab"]) != p + 1:
            raise SourceError(f"{run.origin}: prime={p} does not fit d_vocab={architecture['d_vocab']} "
                              f"(expected {p + 1})")
        try:
            prime_of(architecture)
        except SourceError as exc:
            raise SourceError(f"{run.origin}: {exc}") from None
        model = self.model(architecture)
        check_fits(model, run)
        return model

    def model(self, config: Mapping[str, object]):
        from geostore.family import hooked
        from geostore.family.transformer import model_of

        return model_of(self.name, hooked.architecture(config, "model config"), loss="final_position",
                        trainable=trainable)

    def task(self, run: RunInfo) -> dict[str, object]:
        from geostore.family.transformer import hooked_shapes

        architecture = run.config or {}
        p = _prime_in(run)
        if p is None:
            p = int(architecture.get("d_vocab") or hooked_shapes(run)["embed.W_E"][0]) - 1
        return {"family": self.name, "p": p, **task_fields(run)}

    def split(self, model, train_indices: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
        return grid_split(prime_of(model.config), train_indices)


MODULAR_ADDITION = ModularAdditionFamily()
