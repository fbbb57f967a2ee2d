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
biases are kept; `d_vocab_out = d_vocab = p + 1`. The bundle is read once (weights only) and held
in memory; each checkpoint's `load()` converts its state dict into a HookedTransformer's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.family.base import RunInfo
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import as_epoch, finite_float, identify, ordered
from geostore.sources.safe_load import PICKLE_SUFFIXES, load_pickle
from geostore.sources.state_dict import arrays, in_model_layout, shapes_of

KIND = "arena-bundle"
BUNDLE_NAME = "full_run_data.pth"
# Short names (the last part of a key) stored transposed, and the attention/unembedding biases the model lacks.
TRANSPOSED = ("W_E", "W_Q", "W_K", "W_V", "W_in", "W_out")
ZERO_BIASES = ("b_Q", "b_K", "b_V", "b_O")
# Metric lists of the bundle and their schema names.
LOSSES = {"train_losses": "train_loss", "test_losses": "test_loss"}


def bundle_file(path: Path) -> Path | None:
    """The bundle file a path names: the file itself, or `full_run_data.pth` in a directory."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return path
    if path.is_dir() and (path / BUNDLE_NAME).is_file():
        return path / BUNDLE_NAME
    return None


def convert(state_dict: Mapping[str, object], origin: str) -> dict[str, np.ndarray]:
    """An original-layout state dict as a HookedTransformer state dict (numpy): transposed matrices swapped,
    `W_O` rearranged `d_model (n_heads d_head) -> n_heads d_head d_model`, zero attention and unembedding biases
    added (their shapes follow from the weights)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays(state_dict, origin).items():
        name = key.rsplit(".", 1)[-1]
        if name in TRANSPOSED:
            if value.ndim < 2:
                raise SourceError(f"{origin}: {key} has shape {value.shape}, expected a matrix")
            value = np.swapaxes(value, -1, -2)
        out[key] = np.ascontiguousarray(value)
    for key in [k for k in out if k.endswith("attn.W_O")]:
        block = key[: -len("W_O")]
        w_q = out.get(block + "W_Q")
        if w_q is None or w_q.ndim != 3:
            raise SourceError(f"{origin}: missing parameter {block}W_Q (n_heads, d_head, d_model)")
        n_heads, d_model, d_head = w_q.shape
        if out[key].shape != (d_model, n_heads * d_head):
            raise SourceError(f"{origin}: {key} has shape {out[key].shape}, expected {(d_model, n_heads * d_head)} "
                              "(original layout)")
        out[key] = np.ascontiguousarray(out[key].reshape(d_model, n_heads, d_head).transpose(1, 2, 0))
        dtype = out[key].dtype
        for bias in ("b_Q", "b_K", "b_V"):
            out.setdefault(block + bias, np.zeros((n_heads, d_head), dtype=dtype))
        out.setdefault(block + "b_O", np.zeros(d_model, dtype=dtype))
    if "unembed.W_U" in out:
        out.setdefault("unembed.b_U", np.zeros(out["unembed.W_U"].shape[-1], dtype=out["unembed.W_U"].dtype))
    return out


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


def open_arena_bundle(path: str | Path, family: str | None = None) -> RunSource:
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

    first = convert(state_dicts[0], f"{file}#state_dicts[0]")
    info = RunInfo(path=path, config=None, shapes=lambda: shapes_of(first), origin=f"{file}#state_dicts[0]")
    found, model, task = identify(info, family)
    checkpoints = []
    metrics: dict[str, dict[int, float]] = {}
    lists = {name: _as_list(bundle.get(key)) for key, name in LOSSES.items()}
    for i, (epoch, sd) in enumerate(zip(epochs, state_dicts, strict=True)):
        origin = f"{file}#state_dicts[{i}]"
        load = in_model_layout(partial(convert, sd, origin), model, origin)
        checkpoints.append(Checkpoint(epoch=epoch, origin=origin, load=load))
        for name, values in lists.items():
            value = _metric(values, epochs, i) if values else None
            if value is not None:
                metrics.setdefault(name, {})[epoch] = value
    return RunSource(
        kind=KIND, path=path, family=found, model=model, task=task,
        checkpoints=ordered(checkpoints, file), metrics=metrics,
    )
