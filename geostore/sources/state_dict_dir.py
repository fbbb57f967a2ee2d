"""A directory of HookedTransformer state dicts (`*.safetensors`, `*.pt`, `*.pth`), one per epoch.

The epoch of a file is the last integer in its name (`ckpt_epoch_1500.pt` -> 1500). The
architecture comes from a `config.json` or `run.json` beside the files (HookedTransformerConfig
fields, plus `p`), completed from the tensor shapes of the first checkpoint when the file lacks
fields or is absent.
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

from geostore.errors import SourceError
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import family_task, ordered, read_json_object
from geostore.sources.infer import config_from_json, infer_config, json_config_dict
from geostore.sources.safe_load import CHECKPOINT_SUFFIXES
from geostore.sources.state_dict import loader, state_dict_shapes

KIND = "state-dict-dir"
CONFIG_FILES = ("config.json", "run.json")
# Task facts a config.json may record next to the architecture, and their names in `task`.
TASK_FIELDS = {
    "seed": "seed", "model_seed": "model_seed", "data_seed": "data_seed",
    "train_fraction": "train_fraction", "training_fraction": "train_fraction", "frac_train": "train_fraction",
}


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoint files directly in `path` (not in subdirectories), by name."""
    return sorted(f for f in path.iterdir() if f.suffix in CHECKPOINT_SUFFIXES and f.is_file())


def epoch_of(file: Path) -> int:
    """The last integer in a file's name (without suffix); SourceError naming the file if none."""
    numbers = re.findall(r"\d+", file.stem)
    if not numbers:
        raise SourceError(f"{file}: no epoch in the file name (expected a number, e.g. checkpoint_1500{file.suffix})")
    return int(numbers[-1])


def open_state_dict_dir(path: str | Path) -> RunSource:
    """A directory of state dicts; config from config.json/run.json or the first checkpoint's shapes."""
    path = Path(path)
    files = checkpoint_files(path)
    if not files:
        raise SourceError(
            f"{path}: no checkpoints found (looked for *.safetensors, *.pt, *.pth)"
        )
    by_epoch = sorted((epoch_of(f), f) for f in files)
    for (epoch, before), (next_epoch, after) in pairwise(by_epoch):
        if epoch == next_epoch:
            raise SourceError(f"{path}: two checkpoints for epoch {epoch}: {before.name} and {after.name}")
    first = by_epoch[0][1]

    def shapes():
        return state_dict_shapes(first)

    config_file = next((path / name for name in CONFIG_FILES if (path / name).is_file()), None)
    extra: dict[str, object] = {}
    if config_file is not None:
        data = json_config_dict(read_json_object(config_file))
        config = config_from_json(data, str(config_file), shapes=shapes)
        extra = {task_key: data[key] for key, task_key in TASK_FIELDS.items() if data.get(key) is not None}
    else:
        config = infer_config(shapes(), str(first))
    task = family_task(config, str(config_file or first))
    for key, value in extra.items():
        task.setdefault(key, value)
    checkpoints = [Checkpoint(epoch=e, origin=str(f), load=loader(f, config)) for e, f in by_epoch]
    return RunSource(kind=KIND, path=path, config=config, task=task, checkpoints=ordered(checkpoints, path))
