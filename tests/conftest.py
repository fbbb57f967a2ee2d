"""Shared fixtures: tiny model configs, parameter batches, store snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def tiny_config() -> dict:
    from geostore.family.modular_addition import model_config

    return model_config(7, d_model=16, n_heads=2)


def random_params(config: dict, epochs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 parameters `(len(epochs), *shape)` for every stored name."""
    from geostore.store import schema

    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((len(epochs), *schema.param_shape(name, config))).astype(np.float32)
            for name in schema.PARAMETERS}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: equal snapshots mean an unchanged store."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A real (tiny) geostore training run: p=11, 40 epochs, a checkpoint every 5."""
    from geostore.family.train_modular_addition import TrainSpec, train

    out = tmp_path_factory.mktemp("trained") / "run"
    spec = TrainSpec(p=11, d_model=16, n_heads=2, train_fraction=0.5, lr=3e-3, epochs=40, schedule="0:41:5")
    train(spec, out, progress=False)
    return out
