"""The ARENA / Nanda bundle `full_run_data.pth`: every checkpoint of a run in one pickle.

A dict with `state_dicts` (one per checkpoint), `epochs`, `train_losses`, `test_losses`. The state
dicts come from the paper's own transformer (not TransformerLens) and share its key names
(`embed.W_E`, `blocks.0.attn.W_Q`, `blocks.0.mlp.W_in`, `unembed.W_U`, ...) but not its layout:

| key | original layout | HookedTransformer layout |
|---|---|---|
| `W_E` | (d_model, d_vocab) | transpose last two axes |
| `W_Q`, `W_K`, `W_V` | (n_heads, d_head, d_model) | transpose last two axes |
| `W_O` | (d_model, n_heads*d_head) | `d_model (n_heads d_head) -> n_heads d_head d_model` |
| `W_in` | (d_mlp, d_model) | transpose |
| `W_out` | (d_model, d_mlp) | transpose |
| `W_pos`, `W_U` | (n_ctx, d_model), (d_model, d_vocab) | as is |

The model has no attention or unembedding biases (zero in HookedTransformer layout); the MLP
biases are kept; `d_vocab_out = d_vocab = p + 1`. The bundle is read once (weights only) and
held in memory; each checkpoint's `load()` converts its state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import as_epoch, family_task, finite_float, ordered
from geostore.sources.infer import infer_config
from geostore.sources.safe_load import PICKLE_SUFFIXES, load_pickle
from geostore.sources.state_dict import check_keys, to_float32
from geostore.store import schema

KIND = "arena-bundle"
BUNDLE_NAME = "full_run_data.pth"
TRANSPOSED = ("W_E", "W_Q", "W_K", "W_V", "W_in", "W_out")
AS_IS = ("W_pos", "W_U", "b_in", "b_out")
ZERO_BIASES = ("b_Q", "b_K", "b_V", "b_O", "b_U")
# Metric lists of the bundle and their schema names.
LOSSES = {"train_losses": "train_loss", "test_losses": "test_loss"}


def _key(short: str) -> str:
    return schema.PARAMETERS[short][0]


def bundle_file(path: Path) -> Path | None:
    """The bundle file a path names: the file itself, or `full_run_data.pth` in a directory."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return path
    if path.is_dir() and (path / BUNDLE_NAME).is_file():
        return path / BUNDLE_NAME
    return None


def infer_original_config(state_dict: Mapping[str, object], origin: str) -> dict[str, object]:
    """The HookedTransformer config of an original-layout state dict, from its shapes.

    The transposed matrices' shapes are swapped into HookedTransformer layout, then inferred as
    for any state dict (W_O, the one rearranged matrix, tells nothing new).
    """
    shapes = {str(k): tuple(int(d) for d in v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}
    for short in TRANSPOSED:
        shape = shapes.get(_key(short))
        if shape is not None and len(shape) >= 2:
            shapes[_key(short)] = (*shape[:-2], shape[-1], shape[-2])
    return infer_config(shapes, origin)


def convert(state_dict: Mapping[str, object], config: Mapping[str, object], origin: str) -> dict[str, np.ndarray]:
    """An original-layout state dict as HookedTransformer-layout float32 parameters (short names)."""
    check_keys(state_dict.keys(), origin)
    sizes = schema.dim_sizes(config)
    raw = {}
    for short in (*TRANSPOSED, *AS_IS, "W_O"):
        key = _key(short)
        if key not in state_dict:
            raise SourceError(f"{origin}: missing parameter {key}")
        raw[short] = to_float32(state_dict[key], origin, key)
    w_o = raw.pop("W_O")
    expected_o = (sizes["d_model"], sizes["n_heads"] * sizes["d_head"])
    if w_o.shape != expected_o:
        raise SourceError(f"{origin}: {_key('W_O')} has shape {w_o.shape}, expected {expected_o}")
    out: dict[str, np.ndarray] = {}
    for short, value in raw.items():
        out[short] = np.ascontiguousarray(np.swapaxes(value, -1, -2)) if short in TRANSPOSED else value
    # "d_model (n_heads d_head) -> n_heads d_head d_model"
    out["W_O"] = np.ascontiguousarray(
        w_o.reshape(sizes["d_model"], sizes["n_heads"], sizes["d_head"]).transpose(1, 2, 0)
    )
    for short in ZERO_BIASES:
        out[short] = np.zeros(schema.param_shape(short, config), dtype=np.float32)
    for short in schema.PARAMETERS:
        expected = schema.param_shape(short, config)
        if out[short].shape != expected:
            original = tuple(reversed(expected[-2:])) if short in TRANSPOSED else expected
            raise SourceError(
                f"{origin}: {_key(short)} has shape {raw[short].shape}, expected {original} "
                "(original transposed layout)"
            )
    return {short: out[short] for short in schema.PARAMETERS}


def _as_list(value: object) -> list | None:
    if hasattr(value, "tolist"):
        value = value.tolist()  # type: ignore[union-attr]
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None


def _metric(values: list, epochs: list[int], index: int) -> float | None:
    """The value of checkpoint `index`: one per checkpoint, or one per epoch indexed by epoch."""
    if len(values) == len(epochs):
        return finite_float(values[index])
    if len(values) > max(epochs):
        return finite_float(values[epochs[index]])
    return None


def open_arena_bundle(path: str | Path) -> RunSource:
    """The run in a `full_run_data.pth` bundle (a file, or a directory holding one)."""
    path = Path(path)
    file = bundle_file(path)
    if file is None:
        raise SourceError(f"{path}: no ARENA bundle ({BUNDLE_NAME}) found")
    bundle = load_pickle(file)
    if not isinstance(bundle, Mapping) or "state_dicts" not in bundle:
        kind = "a dict without 'state_dicts'" if isinstance(bundle, Mapping) else f"a {type(bundle).__name__}"
        raise SourceError(
            f"{file}: not an ARENA run bundle (holds {kind}; expected 'state_dicts' and 'epochs')"
        )
    state_dicts = _as_list(bundle["state_dicts"])
    raw_epochs = _as_list(bundle.get("epochs"))
    if not state_dicts:
        raise SourceError(f"{file}: no checkpoints found (empty 'state_dicts')")
    if raw_epochs is None or len(raw_epochs) != len(state_dicts):
        n = "no" if raw_epochs is None else len(raw_epochs)
        raise SourceError(f"{file}: {len(state_dicts)} state_dicts but {n} epochs")
    epochs = [as_epoch(e, f"{file}: epochs[{i}]") for i, e in enumerate(raw_epochs)]
    for i, sd in enumerate(state_dicts):
        if not isinstance(sd, Mapping):
            raise SourceError(f"{file}: state_dicts[{i}] is a {type(sd).__name__}, not a state dict")

    config = infer_original_config(state_dicts[0], f"{file}#state_dicts[0]")
    task = family_task(config, str(file))
    checkpoints = []
    metrics: dict[str, dict[int, float]] = {}
    lists = {name: _as_list(bundle.get(key)) for key, name in LOSSES.items()}
    for i, (epoch, sd) in enumerate(zip(epochs, state_dicts, strict=True)):
        origin = f"{file}#state_dicts[{i}]"
        checkpoints.append(Checkpoint(epoch=epoch, origin=origin, load=partial(convert, sd, config, origin)))
        for name, values in lists.items():
            value = _metric(values, epochs, i) if values else None
            if value is not None:
                metrics.setdefault(name, {})[epoch] = value
    return RunSource(
        kind=KIND, path=path, config=config, task=task,
        checkpoints=ordered(checkpoints, file), metrics=metrics,
    )
