"""The reference project's MLP families on modular addition: `modulo_addition_2layer_mlp` and
`modulo_addition_learned_emb_mlp` (training-dynamics-workbench, scripts/train_2layer_mlp.py and
scripts/train_learned_emb_mlp.py).

Their runs hold the plain torch `state_dict` (`W_in.weight`, `W_out.weight`, and `embed_a.weight`,
`embed_b.weight` for the learned embedding), stored here under those same names, all trainable. The
config.json the reference writes has `architecture` (`two_layer_mlp` / `learned_emb_mlp`), `vocab_size`,
`d_hidden`, `act_fn` (always `relu`), `prime`, `seed`, `data_seed`, `training_fraction` (and `d_embed`);
`model_seed` only where its family class wrote the config. The probe is the full `p x p` grid of pairs
`(a, b)`, the loss the cross-entropy of `(a + b) mod p` over the `p` logits. Torch is imported only where a
module, probe or loss is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geostore.errors import SourceError
from geostore.family.base import Forward, Parameter, ParameterTable, Probe, RunInfo
from geostore.family.modular_addition import grid_split, task_fields

if TYPE_CHECKING:
    import torch

def check_shapes(table: ParameterTable, shapes: Mapping[str, tuple[int, ...]], origin: str) -> None:
    """One-line SourceError naming `origin` unless the state-dict key -> shape map holds exactly the table's keys
    with their shapes."""
    expected = {key: p.key_shape for p in table.parameters for key in p.keys}
    unexpected = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if unexpected or missing:
        raise SourceError(f"{origin}: state-dict keys {', '.join(unexpected) or 'none'} unexpected and "
                          f"{', '.join(missing) or 'none'} missing for this model ({', '.join(expected)})")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise SourceError(f"{origin}: {key} has shape {tuple(shapes[key])}, expected {shape}")


@dataclass(frozen=True)
class MLPModel:
    """One MLP of a family: `config` holds `p`, `d_hidden`, `act_fn` and, with learned embeddings, `d_embed`."""

    family: str
    config: dict[str, Any]
    table: ParameterTable
    needs_probe: bool = False

    def build(self, params: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module:
        """The reference module in eval mode, holding `params` (stored names) or, for None, a fresh initialisation."""
        import torch

        from geostore.family import mlp_modules

        c = self.config
        if "d_embed" in c:
            module = mlp_modules.LearnedEmbMLP(c["p"], c["d_embed"], c["d_hidden"])
        else:
            module = mlp_modules.TwoLayerMLP(c["p"], c["d_hidden"])
        if params is not None:
            stored = {name: torch.as_tensor(np.asarray(params[name])) for name in self.table.names}
            module.load_state_dict(self.table.state_dict(stored), strict=True)
        return module.eval()

    def probe(self, stored: np.ndarray | None = None) -> Probe:
        """`(a, b, labels)`, each `(p*p,)` int64, over the full grid in order `idx = a*p + b`."""
        from geostore.family.modular_addition import probe

        tokens, labels = probe(self.config["p"])
        return tokens[:, 0], tokens[:, 1], labels

    def losses(self, forward: Forward, probe: Probe) -> torch.Tensor:
        """Per-pair cross-entropy `(N,)` of `forward(a, b)`, in float32 (float64 for float64 logits)."""
        import torch
        import torch.nn.functional as F

        a, b, labels = probe
        logits = forward(a, b)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                               reduction="none")


@dataclass(frozen=True)
class MLPFamily:
    """A reference-project MLP family: `architecture` is its config.json value, `embedded` whether it learns
    `embed_a`/`embed_b` (else it reads one-hot pairs)."""

    name: str
    architecture: str
    embedded: bool

    @property
    def keys(self) -> frozenset[str]:
        """The state-dict keys of this family's checkpoints."""
        embeddings = {"embed_a.weight", "embed_b.weight"} if self.embedded else set()
        return frozenset({"W_in.weight", "W_out.weight", *embeddings})

    def recognise(self, run: RunInfo) -> bool:
        if run.config is not None:
            return run.config.get("architecture") == self.architecture
        return set(run.shapes()) == self.keys

    def from_run(self, run: RunInfo) -> MLPModel:
        origin = run.origin or str(run.path)
        shapes = {key: tuple(shape) for key, shape in run.shapes().items()}
        if run.config is not None:
            config = self._config_of_json(run.config, origin)
        else:
            config = self._config_of_shapes(shapes, origin)
        try:
            model = self.model(config)
        except SourceError as exc:
            raise SourceError(f"{origin}: {exc}") from None
        check_shapes(model.table, shapes, origin)
        return model

    def model(self, config: Mapping[str, Any]) -> MLPModel:
        dims = ("p", "d_hidden", "d_embed") if self.embedded else ("p", "d_hidden")
        sizes = {}
        for dim in dims:
            value = config.get(dim)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SourceError(f"{self.name}: {dim} must be a positive integer, got {value!r}")
            sizes[dim] = value
        if sizes["p"] < 2:
            raise SourceError(f"{self.name}: p must be at least 2, got {sizes['p']}")
        act_fn = config.get("act_fn", "relu")
        if act_fn != "relu":
            raise SourceError(f"{self.name}: act_fn {act_fn!r} is not supported (the reference MLPs use relu)")
        return MLPModel(family=self.name, config={**sizes, "act_fn": act_fn}, table=self._table(sizes))

    def task(self, run: RunInfo) -> dict[str, Any]:
        return {"family": self.name, "p": self.from_run(run).config["p"], **task_fields(run)}

    def split(self, model: MLPModel, train_indices: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
        return grid_split(model.config["p"], train_indices)

    # ------------------------------------------------------------------------------------------ helpers
    def _table(self, sizes: Mapping[str, int]) -> ParameterTable:
        p, h = sizes["p"], sizes["d_hidden"]
        w_in = (("W_in.weight", (h, sizes["d_embed"]), ("d_hidden", "d_embed")) if self.embedded
                else ("W_in.weight", (h, 2 * p), ("d_hidden", "d_input")))
        mlp = (w_in, ("W_out.weight", (p, h), ("d_vocab_out", "d_hidden")))
        embeddings = tuple((key, (p, sizes["d_embed"]), ("d_vocab", "d_embed"))
                           for key in ("embed_a.weight", "embed_b.weight") if self.embedded)
        groups = {"embedding": tuple(key for key, _, _ in embeddings), "mlp": ("W_in.weight", "W_out.weight")}
        return ParameterTable(tuple(Parameter(key, shape, dims, (key,)) for key, shape, dims in embeddings + mlp),
                              {group: names for group, names in groups.items() if names})

    def _config_of_json(self, raw: Mapping[str, Any], origin: str) -> dict[str, Any]:
        """The model config of a config.json; SourceError for another architecture or a prime that disagrees."""
        if raw.get("architecture") != self.architecture:
            raise SourceError(f"{origin}: config.json architecture {raw.get('architecture')!r} is not "
                              f"{self.architecture!r} ({self.name})")
        if "prime" in raw and "vocab_size" in raw and raw["prime"] != raw["vocab_size"]:
            raise SourceError(f"{origin}: config.json prime {raw['prime']!r} differs from vocab_size "
                              f"{raw['vocab_size']!r}")
        config = {"p": raw.get("prime", raw.get("vocab_size")), "d_hidden": raw.get("d_hidden"),
                  "act_fn": raw.get("act_fn", "relu")}
        if self.embedded:
            config["d_embed"] = raw.get("d_embed")
        return config

    def _config_of_shapes(self, shapes: Mapping[str, tuple[int, ...]], origin: str) -> dict[str, Any]:
        """The model config the checkpoint's shapes imply (no config.json): `p` and `d_hidden` from `W_out.weight`,
        `d_embed` from `embed_a.weight`; `check_shapes` then checks the rest."""
        needed = ("W_out.weight", "embed_a.weight") if self.embedded else ("W_out.weight",)
        if any(len(shapes.get(key, ())) != 2 for key in needed):
            raise SourceError(f"{origin}: no config.json, and the checkpoint's {' and '.join(needed)} are not "
                              f"matrices (keys: {', '.join(sorted(shapes))})")
        p, h = shapes["W_out.weight"]
        config: dict[str, Any] = {"p": p, "d_hidden": h, "act_fn": "relu"}
        if self.embedded:
            config["d_embed"] = shapes["embed_a.weight"][1]
        return config


TWO_LAYER_MLP = MLPFamily("modulo_addition_2layer_mlp", "two_layer_mlp", embedded=False)
LEARNED_EMB_MLP = MLPFamily("modulo_addition_learned_emb_mlp", "learned_emb_mlp", embedded=True)
