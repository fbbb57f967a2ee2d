"""Checkpoint files -> raw state dicts (key -> numpy array): unwrap common wrappers, convert tensors.

What the keys mean is the model family's business (`geostore.family`): sources only read them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.sources.safe_load import load_checkpoint_file, safetensors_shapes

# Keys under which training scripts commonly nest the model's state dict, in the order tried.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def _is_array(value: object) -> bool:
    """A numpy array or a torch tensor (torch is never imported for this)."""
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def unwrap(obj: object, origin: str) -> Mapping[str, object]:
    """The state dict in a loaded checkpoint: the object itself, or one nested under `WRAPPER_KEYS`."""
    if not isinstance(obj, Mapping):
        raise SourceError(f"{origin}: not a state dict (holds a {type(obj).__name__})")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    if obj and all(isinstance(k, str) for k in obj) and any(_is_array(v) for v in obj.values()):
        return obj
    keys = ", ".join(sorted(str(k) for k in obj)[:8])
    raise SourceError(f"{origin}: not a state dict: no tensors and none under "
                      f"{', '.join(repr(k) for k in WRAPPER_KEYS)} (keys: {keys})")


def to_numpy(value: object, origin: str, key: str) -> np.ndarray:
    """A torch tensor or numpy array as a numpy array; torch dtypes numpy lacks (bfloat16, ...) widened to float32."""
    if isinstance(value, np.ndarray):
        return value
    if _is_array(value):
        import torch

        tensor = value.detach().cpu()  # type: ignore[union-attr]
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    raise SourceError(f"{origin}: {key} is a {type(value).__name__}, not a tensor")


def arrays(state_dict: Mapping[str, object], origin: str) -> dict[str, np.ndarray]:
    """Every tensor entry of a state dict as numpy (non-tensor entries, e.g. step counters, skipped)."""
    return {str(k): to_numpy(v, origin, str(k)) for k, v in state_dict.items() if _is_array(v)}


def shapes_of(state_dict: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of every array entry."""
    return {str(k): tuple(int(d) for d in v.shape) for k, v in state_dict.items() if _is_array(v)}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The (unwrapped) state dict held by a checkpoint file, as numpy arrays."""
    return arrays(unwrap(load_checkpoint_file(path), str(path)), str(path))


def state_dict_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file's state dict: from the header for safetensors, else by loading."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_shapes(path)
    return shapes_of(read_state_dict(path))


def in_model_layout(load: Callable[[], Mapping[str, np.ndarray]], model: object, origin: str
                    ) -> Callable[[], Mapping[str, np.ndarray]]:
    """`load`, its state dict in the layout of `model`'s table where the family converts others
    (`Model.checkpoint_state`: a TransformerBridge checkpoint, or HookedTransformer buffers, for the
    TransformerLens families)."""
    convert = getattr(model, "checkpoint_state", None)
    return load if convert is None else lambda: convert(load(), origin)


def loader(path: str | Path, model: object = None) -> Callable[[], Mapping[str, np.ndarray]]:
    """A lazy `Checkpoint.load` for a state-dict file, in `model`'s layout (`in_model_layout`)."""
    return in_model_layout(partial(read_state_dict, Path(path)), model, str(path))
