"""Small helpers every reader shares: JSON side files, epoch ordering, the family of a run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from geostore.errors import SourceError
from geostore.family.base import Family, Model, RunInfo
from geostore.sources.base import Checkpoint


def read_json(path: Path) -> object:
    """A JSON file's content; SourceError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"{path}: not valid JSON: {reason}") from None


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (dict)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def as_epoch(value: object, origin: str) -> int:
    """An epoch number: a non-negative integer."""
    if isinstance(value, bool):
        raise SourceError(f"{origin}: epoch {value!r} is not an integer")
    try:
        epoch = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SourceError(f"{origin}: epoch {value!r} is not an integer") from None
    if epoch != value and not (isinstance(value, str) and value.strip().isdigit()):
        raise SourceError(f"{origin}: epoch {value!r} is not an integer")
    if epoch < 0:
        raise SourceError(f"{origin}: epoch {epoch} is negative")
    return epoch


def ordered(checkpoints: Iterable[Checkpoint], where: object) -> list[Checkpoint]:
    """Checkpoints sorted by epoch; SourceError naming both origins when two share an epoch."""
    out = sorted(checkpoints, key=lambda c: c.epoch)
    for before, after in pairwise(out):
        if before.epoch == after.epoch:
            raise SourceError(
                f"{where}: two checkpoints for epoch {after.epoch}: {before.origin} and {after.origin}"
            )
    return out


def finite_float(value: object) -> float | None:
    """A metric value as float, or None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if not math.isnan(number) else None


def json_config_dict(data: object) -> dict[str, object]:
    """The config part of a config.json/run.json: the top level, or a dict under model_config/config/cfg with the
    top level's other plain values carried along (task facts such as seeds often sit beside the model config)."""
    if not isinstance(data, dict):
        return {}
    for key in ("model_config", "config", "cfg"):
        inner = data.get(key)
        if isinstance(inner, dict):
            outer = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
            return {**outer, **inner}
    return data


def identify(info: RunInfo, family: str | None = None) -> tuple[Family, Model, dict[str, object]]:
    """`(family, model, task)` of a run: the named family, or the first that recognises it."""
    from geostore.family import registry

    try:
        chosen = registry.detect(info, family)
    except SourceError:
        info.shapes()  # a first checkpoint that cannot be read (truncated, unsafe, no state dict) is the reason
        raise
    return chosen, chosen.from_run(info), chosen.task(info)
