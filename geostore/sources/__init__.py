"""Checkpoint sources: one small reader per format, safe loading and format detection.

`open_source(path)` detects the format (geostore run directory, a directory of state dicts,
an ARENA `full_run_data.pth` bundle, a miscope variant directory) and returns a `RunSource`.
"""

from __future__ import annotations

from pathlib import Path

from geostore.errors import SourceError
from geostore.sources.arena import BUNDLE_NAME, bundle_file, open_arena_bundle
from geostore.sources.base import Checkpoint, RunSource
from geostore.sources.geostore_run import RUN_FILE, is_geostore_run, open_geostore_run
from geostore.sources.hf_checkpoints import is_hf_run, open_hf_run
from geostore.sources.miscope import is_miscope_variant, open_miscope_variant
from geostore.sources.safe_load import SAFETENSORS_SUFFIXES
from geostore.sources.state_dict_dir import checkpoint_files, open_state_dict_dir

__all__ = ["Checkpoint", "RunSource", "open_source"]

_LOOKED_FOR = (
    f"{RUN_FILE} with format geostore-run, checkpoints/checkpoint_epoch_*.safetensors, "
    f"{BUNDLE_NAME}, checkpoint-<step>/config.json (transformers), *.safetensors, *.pt, *.pth"
)


def open_source(path: str | Path, family: str | None = None) -> RunSource:
    """The training run at `path`, in whichever checkpoint format it is.

    Detection, in order: a geostore run directory (`run.json` with `"format": "geostore-run"`);
    a miscope variant (`checkpoints/checkpoint_epoch_*.safetensors`); an ARENA bundle (a `.pth`
    file, or a directory holding `full_run_data.pth`); Hugging Face `save_pretrained` checkpoint folders
    (`checkpoint-<step>/`, `step<N>/`); a directory of state dicts. Checkpoints are
    read only by their `load()`, except the ARENA bundle, which is one file read here.
    Raises `SourceError` (one line, naming the path) when nothing readable is found.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_file():
        if bundle_file(path) is not None:
            return open_arena_bundle(path, family)
        if path.suffix in SAFETENSORS_SUFFIXES:
            raise SourceError(
                f"{path}: a single checkpoint file: pass the directory that holds the run's checkpoints"
            )
        raise SourceError(f"{path}: not a checkpoint source (expected a directory or a {BUNDLE_NAME} bundle)")
    if not path.is_dir():
        raise SourceError(f"{path}: not a file or directory")
    try:
        if is_geostore_run(path):
            return open_geostore_run(path, family)
        if is_miscope_variant(path):
            return open_miscope_variant(path, family)
        if bundle_file(path) is not None:
            return open_arena_bundle(path, family)
        if is_hf_run(path):
            return open_hf_run(path, family)
        if checkpoint_files(path):
            return open_state_dict_dir(path, family)
    except PermissionError as exc:
        raise SourceError(f"{exc.filename or path}: permission denied") from None
    raise SourceError(f"{path}: no checkpoints found (looked for {_LOOKED_FOR})")
