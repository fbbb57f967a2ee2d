"""The family layer's contract: what a model family tells the rest of geostore.

A *family* (`Family`) recognises the runs it understands and, for one architecture, gives a `Model`:
the parameter table (`ParameterTable`: every stored array's name, shape, named dimensions, state-dict
keys, trainable flag, and the component groups), the exact torch model rebuilt from stored parameters,
and the probe and per-example loss of the landscape analyses. Everything outside `geostore/family/`
works through these objects: the store writes whatever the table lists, the analyses perturb whatever
it marks trainable, and nothing else knows a task.

This module is torch-free (a table travels in the store's metadata as JSON, and readers need it
without torch); only `Model.build`, `Model.probe` and `Model.losses` import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from geostore.errors import SourceError

if TYPE_CHECKING:
    import torch

LAYER_DIM = "layer"
ALL = "all"

Probe = tuple["torch.Tensor", ...]
"""A probe: tensors whose first dimension indexes examples (the evaluator slices them into blocks)."""

Forward = Callable[..., "torch.Tensor"]
"""`forward(*inputs)`: the model's forward pass (possibly with other parameters swapped in)."""


@dataclass(frozen=True)
class Parameter:
    """One stored array of a model: `name` in the store, per-epoch `shape` and `dims`, and where it lives in
    the model's state dict: `keys[0]`, or with `layered`, one key per layer stacked along `dims[0]`
    (`layer`), as TransformerLens' `model.W_Q` stacks `blocks.{l}.attn.W_Q`."""

    name: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]
    keys: tuple[str, ...]
    trainable: bool = True
    layered: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dims", tuple(str(d) for d in self.dims))
        object.__setattr__(self, "keys", tuple(str(k) for k in self.keys))
        if len(self.shape) != len(self.dims):
            raise ValueError(f"parameter {self.name}: shape {self.shape} and dims {self.dims} differ in length")
        if self.layered and (not self.dims or self.dims[0] != LAYER_DIM or self.shape[0] != len(self.keys)):
            raise ValueError(f"parameter {self.name}: a layered parameter has dims ('layer', ...) and one key "
                             "per layer")
        if not self.layered and len(self.keys) != 1:
            raise ValueError(f"parameter {self.name}: one state-dict key expected, got {self.keys}")

    @property
    def size(self) -> int:
        """Numbers in one epoch of this parameter."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def key_shape(self) -> tuple[int, ...]:
        """Shape of one state-dict entry (one layer's slice when layered)."""
        return self.shape[1:] if self.layered else self.shape

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dims": list(self.dims), "keys": list(self.keys),
                "trainable": self.trainable, "layered": self.layered}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Parameter:
        return cls(name=data["name"], shape=tuple(data["shape"]), dims=tuple(data["dims"]), keys=tuple(data["keys"]),
                   trainable=bool(data.get("trainable", True)), layered=bool(data.get("layered", False)))


@dataclass(frozen=True)
class ParameterTable:
    """Every stored parameter of a model, in storage order, and its component groups.

    The trainable parameters, in this order, flattened and concatenated, are the vector the landscape
    analyses perturb and the `all` group of the trajectory. `groups` never holds frozen parameters.
    """

    parameters: tuple[Parameter, ...]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Group name -> members: parameter names, or `name[l]` for layer `l` of a layered parameter."""

    def __post_init__(self) -> None:
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names repeat: {names}")
        sizes: dict[str, int] = {}
        for parameter in self.parameters:
            for dim, size in zip(parameter.dims, parameter.shape, strict=True):
                if sizes.setdefault(dim, size) != size:
                    raise ValueError(f"dimension {dim!r} has size {sizes[dim]} and {size} (parameter "
                                     f"{parameter.name}): one name, one size")
        groups = {ALL: self.trainable, **{g: tuple(n) for g, n in self.groups.items() if g != ALL}}
        for group, members in groups.items():
            frozen = [n for n in members if n.split("[")[0] not in self.trainable]
            if frozen or not members:
                raise ValueError(f"group {group!r} lists {frozen or 'nothing'}: groups hold trainable parameters")
        object.__setattr__(self, "groups", groups)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def trainable(self) -> tuple[str, ...]:
        """Names of the trainable parameters, in storage order."""
        return tuple(p.name for p in self.parameters if p.trainable)

    def __getitem__(self, name: str) -> Parameter:
        for parameter in self.parameters:
            if parameter.name == name:
                return parameter
        raise KeyError(name)

    def partition(self) -> dict[str, tuple[str, ...]]:
        """The groups made of whole parameters that split `all` without overlap (in group order), e.g.
        embedding, attention, mlp, norm; empty when the groups do not cover `all` that way."""
        out: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        for group, members in self.groups.items():
            if group == ALL or any(m not in self.names for m in members) or seen & set(members):
                continue
            out[group] = members
            seen |= set(members)
        return out if seen == set(self.trainable) else {}

    def dim_sizes(self) -> dict[str, int]:
        """Size of every named dimension."""
        return {d: s for p in self.parameters for d, s in zip(p.dims, p.shape, strict=True)}

    def n_trainable(self) -> int:
        """Numbers in the trainable vector."""
        return sum(self[name].size for name in self.trainable)

    def flat_indices(self, group: str) -> np.ndarray:
        """Positions of a group's members in the trainable vector (the trainable parameters flattened and
        concatenated in table order), sorted int64: what restricts a landscape analysis to the group."""
        offsets, start = {}, 0
        for name in self.trainable:
            offsets[name] = start
            start += self[name].size
        parts = []
        for member in self.resolve(group):
            base, _, layer = member.partition("[")
            size = self[base].size
            if layer:  # `name[l]`: layer l of a parameter stacked along its first dimension
                size //= self[base].shape[0]
                parts.append(offsets[base] + int(layer[:-1]) * size + np.arange(size))
            else:
                parts.append(offsets[base] + np.arange(size))
        return np.unique(np.concatenate(parts)).astype(np.int64)

    def resolve(self, group: str | Sequence[str]) -> tuple[str, ...]:
        """Parameter names of a group name, one parameter's name, or a list of parameter names; KeyError else."""
        if isinstance(group, str):
            if group in self.groups:
                return self.groups[group]
            if group in self.names:
                return (group,)
            raise KeyError(f"unknown group {group!r}: use one of {', '.join(self.groups)} or parameter names")
        names = tuple(group)
        unknown = [n for n in names if n not in self.names]
        if unknown or not names:
            raise KeyError(f"unknown parameter names {unknown}: use names from {', '.join(self.names)}")
        return names

    # ------------------------------------------------------------------------ state dicts <-> stored
    def stored(self, state_dict: Mapping[str, np.ndarray], origin: str, *,
               ignore: Callable[[str], bool] = lambda key: False, consume: bool = False) -> dict[str, np.ndarray]:
        """The stored arrays (float32, layers stacked) of a state dict of numpy arrays; SourceError naming
        `origin` for a missing or unexpected key (other than those `ignore` accepts, e.g. buffers) or a shape
        that does not fit. With `consume`, each parameter's entries are removed from `state_dict` (a dict)
        once it is converted, so a large model's stacked layers never sit beside all of their sources."""
        known = {key for p in self.parameters for key in p.keys}
        unexpected = sorted(k for k in state_dict if k not in known and not ignore(k))
        if unexpected:
            raise SourceError(f"{origin}: unexpected state-dict keys {', '.join(unexpected[:5])}"
                              f"{' ...' if len(unexpected) > 5 else ''} for this model")
        out = {}
        for parameter in self.parameters:
            parts = []
            for key in parameter.keys:
                if key not in state_dict:
                    raise SourceError(f"{origin}: missing parameter {key}")
                value = np.asarray(state_dict[key])
                if value.shape != parameter.key_shape:
                    raise SourceError(f"{origin}: {key} has shape {value.shape}, expected {parameter.key_shape}")
                parts.append(value)
            array = np.stack(parts) if parameter.layered else parts[0]
            out[parameter.name] = np.ascontiguousarray(array, dtype=np.float32)
            if consume:
                del array, parts
                for key in parameter.keys:
                    del state_dict[key]  # type: ignore[attr-defined]
        return out

    def state_dict(self, params: Mapping[str, Any], *, batched: bool = False) -> dict[str, Any]:
        """State-dict entries (key -> array or tensor) of stored parameters: layers unstacked.

        With `batched`, every value has a leading batch dimension that is kept (`(B, *key_shape)`).
        Only the names present in `params` are converted.
        """
        out = {}
        for parameter in self.parameters:
            if parameter.name not in params:
                continue
            value = params[parameter.name]
            if parameter.layered:
                for layer, key in enumerate(parameter.keys):
                    out[key] = value[:, layer] if batched else value[layer]
            else:
                out[parameter.keys[0]] = value
        return out

    def to_json(self) -> dict[str, object]:
        return {"parameters": [p.to_json() for p in self.parameters],
                "groups": {g: list(n) for g, n in self.groups.items() if g != ALL}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParameterTable:
        return cls(parameters=tuple(Parameter.from_json(p) for p in data["parameters"]),
                   groups={g: tuple(n) for g, n in data.get("groups", {}).items()})


@runtime_checkable
class Model(Protocol):
    """One architecture of a family: what the store, the analyses and `model_at` need of it.

    - `family`: the registry name of its family; `config`: JSON-serialisable, enough for
      `family.model(config)` to give this model back (it is stored in the store's metadata).
    - `table`: the stored parameters and groups.
    - `build(params)`: the exact torch module (eval mode) holding stored parameters (`None`: a fresh
      initialisation); its `state_dict()` equals the checkpoint's, key for key (unless it has `module_state`).
      A model that computes in a configured dtype may accept `build(params, dtype=...)`; the evaluators then
      ask for float64 that way.
    - `probe(stored)`: the probe of the landscape analyses: from the task alone (modular addition's full
      grid), or from `stored`, the probe array a user gave (`--probe`); None when it needs one and none is given.
    - `losses(forward, probe)`: per-example float32 losses `(N,)` of a forward pass on a probe; their mean
      is the loss of flatness, curvature and the Hessian.
    - `needs_probe`: whether `probe` needs a user-given probe array.

    Optionally, `fast_loss(frozen, *, for_derivatives=False)`: a hand-written exact loss of many weight sets at
    once, `loss(weights (B, *shape) by trainable name) -> (B,) float64` with `frozen` the other parameters, or
    None where it does not apply; the evaluators use it in place of the generic `functional_call` loss
    (`for_derivatives`: a form `torch.func` can differentiate twice).

    Optional, for a module whose own parameters differ from the table's keys and layouts (TransformerLens 4's
    bridge under a HookedTransformer table): `module_state(module)` gives `convert(state)`, the table's state-dict
    entries as the module's attribute paths and layouts (the evaluators swap weights in through it), and
    `checkpoint_state(state, origin)` turns a checkpoint's state dict into the table's keys (sources load
    through it).
    """

    family: str
    config: dict[str, Any]
    table: ParameterTable
    needs_probe: bool

    def build(self, params: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module: ...

    def probe(self, stored: np.ndarray | None = None) -> Probe | None: ...

    def losses(self, forward: Forward, probe: Probe) -> torch.Tensor: ...


@dataclass(frozen=True)
class RunInfo:
    """What a family sees of a run to recognise it: where it is, its `config.json` content (None when there is
    none), and the state-dict key -> shape of its first checkpoint (read on first call)."""

    path: Path
    config: Mapping[str, Any] | None
    shapes: Callable[[], Mapping[str, tuple[int, ...]]]
    origin: str = ""


@runtime_checkable
class Family(Protocol):
    """A model family: recognises runs and gives the `Model` of one architecture.

    - `name`: the registry name (stored in every store it writes).
    - `recognise(run)`: whether this family understands the run (cheap: config and shapes only).
    - `from_run(run)`: the run's `Model`; SourceError (one line, naming `run.origin`) when it is malformed.
    - `model(config)`: the `Model` of a stored config (`Model.config`).
    - `task(run)`: what the run records of its task, JSON-serialisable (seeds, fractions, ...), stored as is.
    - `split(model, train_indices)`: the train/test split as a boolean array with its dimension names, or None.
    """

    name: str

    def recognise(self, run: RunInfo) -> bool: ...

    def from_run(self, run: RunInfo) -> Model: ...

    def model(self, config: Mapping[str, Any]) -> Model: ...

    def task(self, run: RunInfo) -> dict[str, Any]: ...

    def split(self, model: Model, train_indices: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]] | None: ...
