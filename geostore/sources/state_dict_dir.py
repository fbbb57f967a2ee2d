"""A directory of state dicts (`*.safetensors`, `*.pt`, `*.pth`), one per epoch, of any model family.

The epoch of a file is the last integer in its name (`ckpt_epoch_1500.pt` -> 1500). The family and
architecture come from a `config.json` or `run.json` beside the files (for HookedTransformers:
HookedTransformerConfig fields, plus `p`), completed from the tensor shapes of the first checkpoint
when the file lacks fields or is absent.
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

from geostore.errors import SourceError
from geostore.family.base import RunInfo
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import identify, json_config_dict, ordered, read_json_object
from geostore.sources.safe_load import CHECKPOINT_SUFFIXES
from geostore.sources.state_dict import loader, state_dict_shapes

KIND = "state-dict-dir"
CONFIG_FILES = ("config.json", "run.json")


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoint files directly in `path` (not in subdirectories), by name."""
    return sorted(f for f in path.iterdir() if f.suffix in CHECKPOINT_SUFFIXES and f.is_file())


def epoch_of(file: Path) -> int:
    """The last integer in a file's name (without suffix); SourceError naming the file if none."""
    numbers = re.findall(r"\d+", file.stem)
    if not numbers:
        raise SourceError(f"{file}: no epoch in the file name (expected a number, e.g. checkpoint_1500{file.suffix})")
    return int(numbers[-1])


def open_state_dict_dir(path: str | Path, family: str | None = None) -> RunSource:
    """A directory of state dicts; config from config.json/run.json and the first checkpoint's shapes."""
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
    config_file = next((path / name for name in CONFIG_FILES if (path / name).is_file()), None)
    config = None if config_file is None else json_config_dict(read_json_object(config_file))
    info = RunInfo(path=path, config=config, shapes=lambda: state_dict_shapes(first),
                   origin=str(config_file or first))
    found, model, task = identify(info, family)
    checkpoints = [Checkpoint(epoch=e, origin=str(f), load=loader(f, model)) for e, f in by_epoch]
    return RunSource(kind=KIND, path=path, family=found, model=model, task=task,
                     checkpoints=ordered(checkpoints, path))
