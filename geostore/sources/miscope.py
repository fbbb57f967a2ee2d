"""A training-dynamics-workbench (miscope) variant directory.

    <variant>/checkpoints/checkpoint_epoch_{epoch:05d}.safetensors   raw HookedTransformer state dicts
    <variant>/config.json     n_layers, n_heads, d_model, d_head, d_mlp, act_fn, normalization_type,
                              d_vocab, d_vocab_out, n_ctx, seed, prime, data_seed, model_seed,
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
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import family_task, finite_float, ordered, read_json_object
from geostore.sources.infer import config_from_json, infer_config
from geostore.sources.state_dict import loader, state_dict_shapes

KIND = "miscope"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch_(\d+)\.safetensors")
# config.json fields that describe the task, and their names in `task`.
TASK_FIELDS = {"seed": "seed", "model_seed": "model_seed", "data_seed": "data_seed",
               "training_fraction": "train_fraction"}
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


def open_miscope_variant(path: str | Path) -> RunSource:
    """A miscope variant: config.json architecture, metadata.json losses and split, lazy checkpoints."""
    path = Path(path)
    files = checkpoint_files(path)
    if not files:
        raise SourceError(f"{path}: no checkpoints found (looked for {CHECKPOINT_DIR}/checkpoint_epoch_*.safetensors)")
    first = files[min(files)]

    def shapes():
        return state_dict_shapes(first)

    config_file = path / "config.json"
    if config_file.is_file():
        data = read_json_object(config_file)
        config = config_from_json(data, str(config_file), shapes=shapes)
        task = family_task(config, str(config_file))
        if data.get("prime") is not None and int(data["prime"]) != task["p"]:
            raise SourceError(f"{config_file}: prime={data['prime']} does not fit d_vocab={config['d_vocab']}")
        task.update({name: data[key] for key, name in TASK_FIELDS.items() if data.get(key) is not None})
    else:
        config = infer_config(shapes(), str(first))
        task = family_task(config, str(first))

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

    checkpoints = [Checkpoint(epoch=e, origin=str(f), load=loader(f, config)) for e, f in files.items()]
    return RunSource(
        kind=KIND, path=path, config=config, task=task,
        checkpoints=ordered(checkpoints, path), metrics=metrics, train_indices=train_indices,
    )
