"""A probe file: integer token ids `(batch, seq)` in a `.npy` or `.pt` file, read without running code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.sources.safe_load import PICKLE_SUFFIXES, load_pickle
from geostore.sources.state_dict import to_numpy


def load_probe(path: str | os.PathLike) -> np.ndarray:
    """The token ids in a `.npy` (no pickles) or `.pt` file (weights-only); SourceError naming the file else."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such probe file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if path.suffix in PICKLE_SUFFIXES:
        return to_numpy(load_pickle(path), str(path), "probe")
    raise SourceError(f"{path}: a probe is a .npy or .pt file of token ids")
