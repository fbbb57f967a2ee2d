"""Read checkpoint files without ever running code from them.

`.safetensors` files hold no code. Pickled `.pt`/`.pth` files are read only with
`torch.load(..., weights_only=True)`, whose unpickler refuses every global that is not a tensor,
a container or a plain number: a file that would call anything else is rejected *before* the call,
and reported as `UnsafeCheckpointError`. Unreadable files become one-line `SourceError`s naming
the file. Torch is imported on first use only.
"""

from __future__ import annotations

import errno
import json
import re
import struct
import threading
from pathlib import Path

import numpy as np

from geostore.errors import SourceError, UnsafeCheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# Pickle opcodes that look up or call objects: a weights-only failure on one of them is a refusal
# of code, any other failure (an unknown opcode) is a corrupt file.
_CODE_OPCODES = {ord(c) for c in "cibRo"} | {0x81, 0x82, 0x83, 0x84, 0x92, 0x93}
# safetensors dtypes numpy cannot represent: read through torch and widened to float32.
_TORCH_ONLY_DTYPES = {"BF16", "F8_E4M3", "F8_E5M2"}
# safetensors dtypes -> numpy's (little-endian, as the format stores them): read without the safetensors library.
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_NUMPY_LOCK = threading.Lock()


def _short(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception message, shortened, or the exception's type."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__


def _cannot_read(path: Path, reason: str) -> SourceError:
    return SourceError(f"{path}: cannot read checkpoint: {reason}")


def _exists(path: Path) -> None:
    if not path.is_file():
        raise SourceError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")


# --- safetensors -----------------------------------------------------------------------------


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header (`dtype`, `shape`, `data_offsets`), file unread."""
    path = Path(path)
    _exists(path)
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _cannot_read(path, "file too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100 * 2**20:
                raise _cannot_read(path, f"invalid safetensors header length {n}")
            header = json.loads(f.read(n))
    except SourceError:
        raise
    except OSError as exc:
        raise _cannot_read(path, _short(exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _cannot_read(path, f"invalid safetensors header ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise _cannot_read(path, "invalid safetensors header")
    header.pop("__metadata__", None)
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise _cannot_read(path, "invalid safetensors header (bad data_offsets)") from None
    if size < 8 + n + end:
        raise _cannot_read(path, f"truncated: {size} bytes, the header describes {8 + n + end}")
    return header


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the data."""
    path = Path(path)
    try:
        return {k: tuple(int(d) for d in v["shape"]) for k, v in safetensors_header(path).items()}
    except SourceError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise _cannot_read(path, f"invalid safetensors header ({_short(exc)})") from None


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a numpy array (bfloat16 and float8 widened to float32)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = safetensors_header(path)
    torch_only = any(entry.get("dtype") in _TORCH_ONLY_DTYPES for entry in header.values())
    try:
        if torch_only:
            import torch

            with safe_open(str(path), framework="pt") as f:
                out = {}
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = f.get_tensor(key)
                    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                        tensor = tensor.float()
                    out[key] = tensor.numpy()
                return out
        if all(entry.get("dtype") in _NUMPY_DTYPES for entry in header.values()):
            return _read_tensors(path, header)
        with safe_open(str(path), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise _cannot_read(path, _short(exc)) from None
    except (OSError, ValueError, TypeError) as exc:
        raise _cannot_read(path, _short(exc)) from None


def _read_tensors(path: Path, header: dict[str, dict]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (numpy dtypes only) read into its own array, in file order.

    One copy of the data and no memory map: through `safe_open`, the mapped file's pages stay resident beside
    the arrays copied out of them, twice a checkpoint's size in the reader's memory (1.3 GB for a 652 MB one).
    """
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        out = {}
        for key, entry in sorted(header.items(), key=lambda item: int(item[1]["data_offsets"][0])):
            begin, end = (int(x) for x in entry["data_offsets"])
            array = np.empty(tuple(int(d) for d in entry["shape"]), dtype=_NUMPY_DTYPES[entry["dtype"]])
            if end - begin != array.nbytes:
                raise _cannot_read(path, f"invalid safetensors header ({key}: {end - begin} bytes for shape "
                                         f"{array.shape} of {entry['dtype']})")
            f.seek(8 + n + begin)
            if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                raise _cannot_read(path, f"truncated while reading {key}")
            out[key] = array
    return {key: out[key] for key in header}


# --- pickles ---------------------------------------------------------------------------------


def _numpy_safe_globals() -> list:
    """Numpy's array, scalar and dtype constructors: data only, as the torch docs recommend."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGUS"}
    # `bytes`: numpy pickles empty arrays' data as bytes(...)
    return [_reconstruct, scalar, np.ndarray, np.dtype, bytes, *sorted(dtype_classes, key=str)]


def _refusal_detail(message: str) -> str | None:
    """What a weights-only failure refused ("global os.system", ...), or None for corrupt data."""
    match = re.search(r"GLOBAL\s+([\w.<>]+)", message)
    if match:
        return f"global {match.group(1)}"
    if re.search(r"unsupported class|can only (build|create)|unsupported global", message, re.I):
        return _short(Exception(message.split("error:")[-1]))
    match = re.search(r"Unsupported operand (\d+)", message)
    if match and int(match.group(1)) in _CODE_OPCODES:
        return f"pickle opcode {chr(int(match.group(1)))!r} with a non-allowed callable"
    return None


def load_pickle(path: str | Path) -> object:
    """A `.pt`/`.pth` file read with `torch.load(weights_only=True)` onto the CPU.

    Raises `UnsafeCheckpointError` when the file would run code if unpickled (nothing is run),
    `SourceError` when it is missing, truncated or corrupt.
    """
    import pickle
    import warnings
    import zipfile

    import torch

    path = Path(path)
    _exists(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol-version notes of the weights-only unpickler
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                if "numpy" not in str(exc):
                    raise
            # numpy arrays or scalars (losses saved as np.float64): allow numpy's data constructors.
            # `safe_globals` edits torch's global allowlist: one such load at a time.
            with _NUMPY_LOCK, torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        detail = _refusal_detail(message)
        if detail is not None:
            raise UnsafeCheckpointError(
                f"{path}: refused: the file would run code when unpickled ({detail})"
            ) from None
        reason = re.search(r"(Unsupported operand \d+|Unpickling error:?[^\n]*)", message)
        raise _cannot_read(path, f"corrupt pickle ({reason.group(1) if reason else _short(exc)})") from None
    except EOFError:
        raise _cannot_read(path, "unexpected end of file (truncated?)") from None
    except zipfile.BadZipFile as exc:
        raise _cannot_read(path, f"corrupt zip archive ({_short(exc)})") from None
    except RuntimeError as exc:
        text = _short(exc)
        if "central directory" in text:
            text = "corrupt or truncated zip archive (no central directory)"
        raise _cannot_read(path, text) from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a seek past the end of a cut zip archive
            raise _cannot_read(path, "corrupt or truncated file (invalid seek)") from None
        raise _cannot_read(path, exc.strerror or _short(exc)) from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error) as exc:
        raise _cannot_read(path, f"not a torch checkpoint ({type(exc).__name__}: {_short(exc)})") from None


def load_checkpoint_file(path: str | Path) -> object:
    """A checkpoint file by suffix: safetensors -> {name: ndarray}; `.pt`/`.pth` -> the unpickled object."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return load_pickle(path)
    raise SourceError(f"{path}: not a checkpoint file (expected {', '.join(CHECKPOINT_SUFFIXES)})")
