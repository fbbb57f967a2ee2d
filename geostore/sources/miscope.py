"""A training-dynamics-workbench (miscope) run directory, of any of its model families.

    <variant>/checkpoints/checkpoint_epoch_{epoch:05d}.safetensors   the model's raw state dicts
    <variant>/config.json     the architecture (HookedTransformerConfig fields, or `architecture`,
                              `d_hidden`, ... for its MLPs), seed, prime, data_seed, model_seed,
                              training_fraction
    <variant>/metadata.json   train_losses, test_losses (one per epoch, indexed by epoch),
                              train_indices, test_indices (flat grid positions), checkpoint_epochs,
                              num_epochs

`artifacts/` (the workbench's own analyses) and `interventions/` (sub-variants with the same
layout: open them one by one) are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.family.base import RunInfo
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import finite_float, identify, ordered, read_json_object
from geostore.sources.state_dict import loader, state_dict_shapes

KIND = "miscope"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch_(\d+)\.safetensors")
LOSSES = {"train_losses": "train_loss", "test_losses": "test_loss"}


def checkpoint_files(path: Path) -> dict[int, Path]:
    """Epoch -> file of `path/checkpoints/checkpoint_epoch_*.safetensors`."""
    folder = path / CHECKPOINT_DIR
    if not folder.is_dir():
        return {}
    out: dict[int, Path] = {}
    for file in sorted(folder.iterdir()):
        match = CHECKPOINT_PATTERN.fullmatch(file.name)
        if match and file.is_file():
            epoch = int(match.group(1))
            if epoch in out:
                raise SourceError(f"{folder}: two checkpoints for epoch {epoch}: {out[epoch].name} and {file.name}")
            out[epoch] = file
    return out


def is_miscope_variant(path: Path) -> bool:
    """Whether `path` holds `checkpoints/checkpoint_epoch_*.safetensors`."""
    folder = path / CHECKPOINT_DIR
    return folder.is_dir() and any(CHECKPOINT_PATTERN.fullmatch(f.name) for f in folder.iterdir())


def open_miscope_variant(path: str | Path, family: str | None = None) -> RunSource:
    """A miscope run: config.json architecture, metadata.json losses and split, lazy checkpoints."""
    path = Path(path)
    files = checkpoint_files(path)
    if not files:
        raise SourceError(f"{path}: no checkpoints found (looked for {CHECKPOINT_DIR}/checkpoint_epoch_*.safetensors)")
    first = files[min(files)]
    config_file = path / "config.json"
    config = read_json_object(config_file) if config_file.is_file() else None
    info = RunInfo(path=path, config=config, shapes=lambda: state_dict_shapes(first),
                   origin=str(config_file if config is not None else first))
    found, model, task = identify(info, family)

    metrics: dict[str, dict[int, float]] = {}
    train_indices = None
    metadata_file = path / "metadata.json"
    if metadata_file.is_file():
        metadata = read_json_object(metadata_file)
        for key, name in LOSSES.items():
            values = metadata.get(key)
            if not isinstance(values, list):
                continue
            for epoch in files:
                value = finite_float(values[epoch]) if epoch < len(values) else None
                if value is not None:
                    metrics.setdefault(name, {})[epoch] = value
        if metadata.get("train_indices") is not None:
            try:
                indices = np.asarray(metadata["train_indices"], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise SourceError(f"{metadata_file}: train_indices is not a list of integers") from None
            train_indices = np.sort(indices)
        if metadata.get("num_epochs") is not None:
            task["num_epochs"] = metadata["num_epochs"]

    checkpoints = [Checkpoint(epoch=e, origin=str(f), load=loader(f, model)) for e, f in files.items()]
    return RunSource(
        kind=KIND, path=path, family=found, model=model, task=task,
        checkpoints=ordered(checkpoints, path), metrics=metrics, train_indices=train_indices,
    )
