"""Runs of the reference project's MLP families, written the way its own training scripts write them.

training-dynamics-workbench's scripts/train_2layer_mlp.py and scripts/train_learned_emb_mlp.py: the model
classes below are its `ModuloAddition2LMLP` (one-hot input) and `ModuloAdditionEmbedMLP`, seeded with
`torch.manual_seed(seed)`; the split is `torch.manual_seed(data_seed); torch.randperm(p*p)` cut at
`int(p*p*training_fraction)`; full-batch AdamW on the float64 cross-entropy; checkpoint `e` is the state
dict after epoch `e`'s optimiser step; `train_losses[e]` is the loss before that step, `test_losses[e]` after.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from geostore.family.base import RunInfo


class ModuloAddition2LMLP(nn.Module):
    """The reference's one-hot MLP: `Linear(2p, d_hidden)` -> ReLU -> `Linear(d_hidden, p)`, no biases."""

    def __init__(self, vocab_size: int, d_hidden: int, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.vocab_size = vocab_size
        self.d_hidden = d_hidden
        self.W_in = nn.Linear(2 * vocab_size, d_hidden, bias=False)
        self.relu = nn.ReLU()
        self.W_out = nn.Linear(d_hidden, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_out(self.relu(self.W_in(x)))


class ModuloAdditionEmbedMLP(nn.Module):
    """The reference's learned-embedding MLP: `embed_a(a) + embed_b(b)` -> the same two layers."""

    def __init__(self, vocab_size: int, d_embed: int, d_hidden: int, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.vocab_size = vocab_size
        self.d_embed = d_embed
        self.d_hidden = d_hidden
        self.embed_a = nn.Embedding(vocab_size, d_embed)
        self.embed_b = nn.Embedding(vocab_size, d_embed)
        self.W_in = nn.Linear(d_embed, d_hidden, bias=False)
        self.relu = nn.ReLU()
        self.W_out = nn.Linear(d_hidden, vocab_size, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.W_out(self.relu(self.W_in(self.embed_a(a) + self.embed_b(b))))


def grid(p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(a, b, labels)` over the full grid, row `i` -> `(i // p, i % p)`."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    return a, b, (a + b) % p


def one_hot_grid(p: int) -> torch.Tensor:
    """The reference's analysis dataset of the one-hot MLP: `(p*p, 2p)` float rows `[onehot(a) | onehot(b)]`."""
    a, b, _ = grid(p)
    return torch.cat([nn.functional.one_hot(a, p), nn.functional.one_hot(b, p)], dim=1).float()


def reference_logits(model: nn.Module, p: int, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """Logits of a reference model on grid rows, fed as the reference feeds it (one-hot or index pairs)."""
    if isinstance(model, ModuloAddition2LMLP):
        return model(one_hot_grid(p)[rows])
    a, b, _ = grid(p)
    return model(a[rows], b[rows])


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference scripts' `_loss`: mean float64 negative log-probability of the labels."""
    log_probs = logits.to(torch.float64).log_softmax(dim=-1)
    return -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1).mean()


def reference_model(family: str, p: int, d_hidden: int, d_embed: int, seed: int | None) -> nn.Module:
    """A freshly initialised reference model of `family` (`two_layer_mlp` or `learned_emb_mlp`)."""
    if family == "two_layer_mlp":
        return ModuloAddition2LMLP(p, d_hidden, seed=seed)
    if family == "learned_emb_mlp":
        return ModuloAdditionEmbedMLP(p, d_embed, d_hidden, seed=seed)
    raise ValueError(f"unknown reference MLP family {family!r}")


def write_mlp_run(
    path: Path,
    family: str = "two_layer_mlp",
    *,
    p: int = 11,
    d_hidden: int = 32,
    d_embed: int = 16,
    epochs: Sequence[int] = (0, 5, 10),
    seed: int = 0,
    data_seed: int = 1,
    training_fraction: float = 0.75,
    lr: float = 1e-2,
    weight_decay: float = 1.0,
    model_seed: bool = False,
) -> Path:
    """Train a reference MLP (`family`: `two_layer_mlp` or `learned_emb_mlp`) for `max(epochs) + 1` full-batch
    AdamW steps and write its run into `path` itself: `checkpoints/checkpoint_epoch_{e:05d}.safetensors` for each
    of `epochs`, `config.json` and `metadata.json` as the reference scripts write them. `model_seed` adds the key
    the reference's family classes (not its scripts) put in config.json. The global torch RNG is left as it was.
    """
    with torch.random.fork_rng():
        model = reference_model(family, p, d_hidden, d_embed, seed)
        torch.manual_seed(data_seed)
        indices = torch.randperm(p * p)
    cutoff = int(p * p * training_fraction)
    train_idx, test_idx = indices[:cutoff], indices[cutoff:]
    labels = grid(p)[2]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    train_losses, test_losses = [], []
    for epoch in range(max(epochs) + 1):
        loss = reference_loss(reference_logits(model, p, train_idx), labels[train_idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        train_losses.append(loss.item())
        with torch.inference_mode():
            test_losses.append(reference_loss(reference_logits(model, p, test_idx), labels[test_idx]).item())
        if epoch in epochs:
            save_file(model.state_dict(), str(path / "checkpoints" / f"checkpoint_epoch_{epoch:05d}.safetensors"))
    config: dict[str, object] = {"architecture": family, "vocab_size": p}
    if family == "learned_emb_mlp":
        config["d_embed"] = d_embed
    config.update({"d_hidden": d_hidden, "act_fn": "relu", "prime": p, "seed": seed, "data_seed": data_seed})
    if model_seed:
        config["model_seed"] = seed
    config["training_fraction"] = training_fraction
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "metadata.json").write_text(json.dumps({
        "train_losses": train_losses, "test_losses": test_losses,
        "train_indices": train_idx.tolist(), "test_indices": test_idx.tolist(),
        "checkpoint_epochs": sorted(epochs), "num_epochs": max(epochs) + 1,
    }))
    return path


def checkpoint(path: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The state dict of a run's checkpoint `epoch`."""
    from safetensors.torch import load_file

    return load_file(str(path / "checkpoints" / f"checkpoint_epoch_{epoch:05d}.safetensors"))


def run_info(path: Path, *, config: Mapping[str, object] | bool | None = True) -> RunInfo:
    """A `RunInfo` of a run: its config.json (`True`), none (`None`) or the given dict, and the shapes of its
    first checkpoint."""
    first = sorted((path / "checkpoints").glob("checkpoint_epoch_*.safetensors"))[0]

    def shapes() -> dict[str, tuple[int, ...]]:
        with safe_open(str(first), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118

    if config is True:
        config = json.loads((path / "config.json").read_text())
    return RunInfo(path=path, config=config, shapes=shapes, origin=str(path))
