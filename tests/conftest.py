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


@pytest.fixture
def tiny_model(tiny_config):
    """The modular-addition family's `Model` of `tiny_config` (p=7, d_model=16, 2 heads, 1 layer)."""
    return ma_model(tiny_config)


def ma_model(config: dict):
    """The modular-addition family's `Model` of a HookedTransformer config."""
    from geostore.family.modular_addition import MODULAR_ADDITION

    return MODULAR_ADDITION.model(config)


def random_params(model_or_table, epochs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 parameters `(len(epochs), *shape)` for every name of a model's (or a table's) parameter
    table, in the table's layout (layered parameters stacked along `layer`)."""
    table = getattr(model_or_table, "table", model_or_table)
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal((len(epochs), *p.shape)).astype(np.float32) for p in table.parameters}


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
