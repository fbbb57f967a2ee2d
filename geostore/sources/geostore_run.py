"""geostore's own run directory: `run.json` (format "geostore-run") and safetensors state dicts.

run.json (written by `geostore train`)::

    {"format": "geostore-run", "version": 1, "family": "<registry name>",
     "model_config": {<the family's config: HookedTransformerConfig fields for transformers>},
     "task": {"p", "train_fraction", "data_seed", "model_seed", "train_indices": [sorted ints]},
     "training": {"optimizer", "lr", "weight_decay", "betas", "epochs", "schedule"},
     "checkpoints": [{"epoch", "file", "train_loss", "test_loss", "train_accuracy", "test_accuracy"}]}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.family.base import RunInfo
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import as_epoch, finite_float, identify, ordered, read_json, read_json_object
from geostore.sources.state_dict import loader, state_dict_shapes
from geostore.store.schema import METRICS

KIND = "geostore-run"
RUN_FILE = "run.json"
FORMAT = "geostore-run"
VERSION = 1


def is_geostore_run(path: Path) -> bool:
    """Whether `path` is a directory whose run.json says `"format": "geostore-run"`."""
    run_file = path / RUN_FILE
    if not (path.is_dir() and run_file.is_file()):
        return False
    try:
        data = read_json(run_file)
    except SourceError:
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def open_geostore_run(path: str | Path, family: str | None = None) -> RunSource:
    """The run recorded by `path/run.json`; checkpoint files are read only by `load()`."""
    path = Path(path)
    run_file = path / RUN_FILE
    data = read_json_object(run_file)
    if data.get("format") != FORMAT:
        raise SourceError(f"{run_file}: not a geostore run (format {data.get('format')!r})")
    version = data.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise SourceError(f"{run_file}: run format version {version!r} is newer than this geostore ({VERSION})")
    model_config = data.get("model_config")
    if not isinstance(model_config, dict):
        raise SourceError(f"{run_file}: no model_config")
    raw_task = data.get("task") or {}
    if not isinstance(raw_task, dict):
        raise SourceError(f"{run_file}: task is not an object")
    train_indices = None
    if raw_task.get("train_indices") is not None:
        try:
            train_indices = np.asarray(raw_task["train_indices"], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise SourceError(f"{run_file}: task.train_indices is not a list of integers") from None

    entries = data.get("checkpoints")
    if not isinstance(entries, list):
        raise SourceError(f"{run_file}: no checkpoints list")
    files: list[tuple[int, Path]] = []
    metrics: dict[str, dict[int, float]] = {}
    for i, entry in enumerate(entries):
        where = f"{run_file}: checkpoints[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise SourceError(f"{where}: expected an object with 'epoch' and 'file'")
        epoch = as_epoch(entry.get("epoch"), where)
        file = path / entry["file"]
        files.append((epoch, file))
        for name in METRICS:
            value = finite_float(entry.get(name))
            if value is not None:
                metrics.setdefault(name, {})[epoch] = value
    if not files:
        raise SourceError(f"{path}: no checkpoints found (run.json lists none)")
    first = min(files)[1]
    info = RunInfo(path=path, config={**raw_task, **model_config}, shapes=lambda: state_dict_shapes(first),
                   origin=str(run_file))
    found, model, task = identify(info, family if family is not None else data.get("family"))
    checkpoints = [Checkpoint(epoch=epoch, origin=str(file), load=loader(file, model)) for epoch, file in files]
    task.update({k: v for k, v in raw_task.items() if k != "train_indices"})
    if isinstance(data.get("training"), dict):
        task["training"] = data["training"]
    return RunSource(
        kind=KIND,
        path=path,
        family=found,
        model=model,
        task=task,
        checkpoints=ordered(checkpoints, run_file),
        metrics=metrics,
        train_indices=train_indices,
    )
