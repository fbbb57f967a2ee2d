"""HookedTransformer state dicts -> geostore parameters: unwrap, drop buffers, check names and shapes."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.sources.safe_load import load_checkpoint_file, safetensors_shapes
from geostore.store import schema

# Keys under which training scripts commonly nest the model's state dict, in the order tried.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")

_KEY_TO_SHORT = {key: short for short, (key, _) in schema.PARAMETERS.items()}
_UNSUPPORTED = "geostore stores 1-layer HookedTransformers without normalisation"


def is_buffer(key: str) -> bool:
    """Whether a state-dict key is a buffer (attention mask, IGNORE), never a parameter."""
    return key.endswith(schema.BUFFER_SUFFIXES)


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
    if any(key in obj for key in _KEY_TO_SHORT):
        return obj
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    if obj and all(isinstance(k, str) and _is_array(v) for k, v in obj.items()):
        return obj  # a state dict of other names: check_keys explains which
    keys = ", ".join(sorted(str(k) for k in obj)[:8])
    raise SourceError(
        f"{origin}: not a state dict: no HookedTransformer parameters and none under "
        f"{', '.join(repr(k) for k in WRAPPER_KEYS)} (keys: {keys})"
    )


def check_keys(keys: Iterable[object], origin: str) -> None:
    """SourceError for keys geostore cannot store: LayerNorm, layers above 0, unknown names."""
    keys = [str(k) for k in keys]
    for key in keys:
        if re.search(r"(^|\.)ln\w*\.", key):
            raise SourceError(f"{origin}: has LayerNorm parameter {key!r}: {_UNSUPPORTED}")
        layer = re.match(r"blocks\.(\d+)\.", key)
        if layer and int(layer.group(1)) > 0:
            raise SourceError(f"{origin}: has a layer {layer.group(1)} parameter {key!r}: {_UNSUPPORTED}")
    unknown = [k for k in keys if k not in _KEY_TO_SHORT and not is_buffer(k)]
    if unknown:
        raise SourceError(
            f"{origin}: unexpected state-dict keys {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}: {_UNSUPPORTED}"
        )


def to_float32(value: object, origin: str, key: str) -> np.ndarray:
    """A torch tensor or numpy array as a float32 numpy array (exact for float32 input).

    Wider floats (float64) are rounded, with a `GeostoreWarning` (ingest reports them once per source).
    """
    if isinstance(value, np.ndarray):
        _warn_if_rounded(str(value.dtype), origin, key)
        return np.array(value, dtype=np.float32, copy=True)
    if _is_array(value):
        import torch

        _warn_if_rounded(str(value.dtype).removeprefix("torch."), origin, key)  # type: ignore[union-attr]
        return value.detach().cpu().to(torch.float32).numpy().copy()  # type: ignore[union-attr]
    raise SourceError(f"{origin}: {key} is a {type(value).__name__}, not a tensor")


def _warn_if_rounded(dtype: str, origin: str, key: str) -> None:
    if dtype in ("float64", "double", "longdouble", "float128"):
        import warnings

        from geostore.errors import GeostoreWarning

        warnings.warn(GeostoreWarning(f"{origin}: {key} is {dtype}; stored as float32 (relative rounding up to "
                                      "6e-8 per value)"), stacklevel=3)


def shapes_of(state_dict: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of every array entry."""
    return {str(k): tuple(int(d) for d in v.shape) for k, v in state_dict.items() if _is_array(v)}


def parameters(state_dict: Mapping[str, object], config: Mapping[str, object], origin: str) -> dict[str, np.ndarray]:
    """Every schema parameter of a HookedTransformer state dict, as float32, checked against `config`."""
    check_keys(state_dict.keys(), origin)
    out = {}
    for short, (key, _) in schema.PARAMETERS.items():
        if key not in state_dict:
            raise SourceError(f"{origin}: missing parameter {key}")
        array = to_float32(state_dict[key], origin, key)
        expected = schema.param_shape(short, config)
        if array.shape != expected:
            raise SourceError(f"{origin}: {key} has shape {array.shape}, expected {expected}")
        out[short] = array
    return out


def read_state_dict(path: str | Path) -> Mapping[str, object]:
    """The (unwrapped) state dict held by a checkpoint file."""
    return unwrap(load_checkpoint_file(path), str(path))


def state_dict_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file's state dict: from the header for safetensors, else by loading."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_shapes(path)
    return shapes_of(read_state_dict(path))


def load_parameters(path: str | Path, config: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Read one state-dict checkpoint file and return its checked float32 parameters."""
    return parameters(read_state_dict(path), config, str(path))


def loader(path: str | Path, config: Mapping[str, object]) -> Callable[[], dict[str, np.ndarray]]:
    """A lazy `Checkpoint.load` for a state-dict file."""
    return partial(load_parameters, Path(path), dict(config))
