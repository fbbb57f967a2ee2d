"""Hugging Face `transformers` runs: a folder of `save_pretrained` checkpoints, one sub-folder per step.

`Trainer` writes `output_dir/checkpoint-<step>/`; the Pythia suite publishes `step<N>` revisions; any sub-folder
whose name ends in an integer and holds a `config.json` counts. Each holds the model's `config.json` and its
weights as `model.safetensors`, sharded `model-0000k-of-0000n.safetensors` listed by
`model.safetensors.index.json`, or the older `pytorch_model.bin` (sharded: `pytorch_model.bin.index.json`),
read only with the weights-only unpickler. The index is the global step (the folder's integer). Metrics come
from the `trainer_state.json` files' `log_history`: see `step_metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np

from geostore.errors import SourceError
from geostore.family.base import Model, RunInfo
from geostore.family.hf import architecture
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.common import finite_float, identify, ordered, read_json_object
from geostore.sources.safe_load import load_pickle, load_safetensors, safetensors_shapes
from geostore.sources.state_dict import arrays, shapes_of, unwrap

KIND = "hf-checkpoints"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
# Weight files of a save_pretrained folder, in the order transformers prefers them.
WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# trainer_state.json log entry -> the store's metric of the same meaning (`learning_rate`, `train_epoch` are the
# optional metrics only such runs record).
LOGGED = {"loss": "train_loss", "eval_loss": "test_loss", "learning_rate": "learning_rate", "epoch": "train_epoch"}

_STEP = re.compile(r"(\d+)$")


def checkpoint_folders(path: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every sub-folder whose name ends in an integer and that holds a config.json, by step."""
    found = []
    for folder in path.iterdir():
        match = _STEP.search(folder.name)
        if match and folder.is_dir() and (folder / CONFIG).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def is_hf_run(path: Path) -> bool:
    """Whether `path` holds save_pretrained checkpoint folders (a config.json naming a `model_type`)."""
    folders = checkpoint_folders(path)
    if not folders:
        return False
    try:
        return isinstance(read_json_object(folders[0][1] / CONFIG).get("model_type"), str)
    except SourceError:
        return False


def weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """`(origin, files)`: the file that names the weights (an index or the single file) and the files to read;
    SourceError naming the folder when it holds none, or the index when it is malformed."""
    for name in WEIGHTS:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return candidate, [candidate]
        weight_map = read_json_object(candidate).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(f"{candidate}: no weight_map of tensor name -> shard file")
        return candidate, [folder / shard for shard in sorted(set(weight_map.values()))]
    raise SourceError(f"{folder}: no weights (looked for {', '.join(WEIGHTS)})")


def _read(file: Path) -> dict[str, np.ndarray]:
    if file.suffix == ".safetensors":
        return load_safetensors(file)
    return arrays(unwrap(load_pickle(file), str(file)), str(file))


def load_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor a save_pretrained folder holds, over all its shards (a missing or corrupt shard: SourceError
    naming that file)."""
    index, files = weight_files(folder)
    out: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise SourceError(f"{file}: no such file (a shard listed by {index.name})")
        out.update(_read(file))
    return out


def _checkpoint(folder: Path, model: Model) -> dict[str, np.ndarray]:
    """A folder's tensors under the model's stored keys (a transformers model drops tied aliases and buffers)."""
    state = load_folder(folder)
    keyed = getattr(model, "checkpoint_state", None)
    return state if keyed is None else keyed(state, str(folder))


def folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a folder's weights: from safetensors headers, else by loading."""
    _, files = weight_files(folder)
    if all(f.suffix == ".safetensors" for f in files):
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            shapes.update(safetensors_shapes(file))
        return shapes
    return shapes_of(load_folder(folder))


def step_metrics(log_history: list[Mapping], steps: list[int]) -> dict[str, dict[int, float]]:
    """Per checkpoint step, the latest value of each logged quantity (`LOGGED`) at or before that step.

    Trainer logs every `logging_steps` (and evaluates every `eval_steps`), independently of when it saves, so a
    checkpoint takes the last value logged by its step; a step before the first logged value gets none.
    """
    logged: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step") if isinstance(entry, Mapping) else None
        if not isinstance(step, int):
            continue
        for key, name in LOGGED.items():
            value = finite_float(entry.get(key))
            if value is not None:
                logged.setdefault(name, []).append((step, value))
    out: dict[str, dict[int, float]] = {}
    for name, points in logged.items():
        points.sort(key=lambda point: point[0])  # stable: of two values at one step, the later logged wins
        at = np.array([s for s, _ in points])
        for step in steps:
            i = int(np.searchsorted(at, step, side="right")) - 1
            if i >= 0:
                out.setdefault(name, {})[step] = points[i][1]
    return out


def _log_history(folders: list[tuple[int, Path]]) -> list[Mapping]:
    """The log entries of every checkpoint's trainer_state.json (each holds the run's history up to its step);
    an entry logged again by a later checkpoint counts once."""
    seen: dict[tuple, Mapping] = {}
    for _, folder in folders:
        state_file = folder / TRAINER_STATE
        if not state_file.is_file():
            continue
        history = read_json_object(state_file).get("log_history")
        if not isinstance(history, list):
            raise SourceError(f"{state_file}: log_history is not a list")
        for entry in history:
            if isinstance(entry, Mapping):
                seen[tuple(sorted((k, repr(v)) for k, v in entry.items()))] = entry
    return list(seen.values())


def open_hf_run(path: str | Path, family: str | None = None) -> RunSource:
    """The save_pretrained checkpoints under `path`, indexed by step; weights are read only by `load()`."""
    path = Path(path)
    folders = checkpoint_folders(path)
    if not folders:
        raise SourceError(f"{path}: no checkpoint folders (sub-folders named checkpoint-<step> or step<N> "
                          f"holding a {CONFIG})")
    first = folders[0][1]
    config = read_json_object(first / CONFIG)
    info = RunInfo(path=path, config=config, shapes=lambda: folder_shapes(first), origin=str(first / CONFIG))
    found, model, task = identify(info, family)
    for _, folder in folders[1:]:  # one architecture for the whole run
        if architecture(read_json_object(folder / CONFIG)) != architecture(config):
            raise SourceError(f"{folder / CONFIG}: another architecture than {first / CONFIG}")
    checkpoints = [Checkpoint(epoch=step, origin=str(folder), load=partial(_checkpoint, folder, model))
                   for step, folder in folders]
    metrics = step_metrics(_log_history(folders), [step for step, _ in folders])
    return RunSource(kind=KIND, path=path, family=found, model=model, task=task,
                     checkpoints=ordered(checkpoints, path), metrics=metrics, index_unit="step")
