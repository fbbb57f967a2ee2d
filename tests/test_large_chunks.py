"""Chunks of large models: few epochs per chunk, parameters split along their own axes, a size limit never
exceeded, and the same values, trajectory and appends as with whole-array chunks (tiny models with a tiny limit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr
from safetensors.numpy import save_file

import geostore
from geostore.errors import SourceError
from geostore.ingestion import ingest
from geostore.sources.safe_load import load_safetensors
from geostore.store import layout
from geostore.store.writer import StoreWriter
from tests.checkpoint_factories import tiny_config, trajectory, write_state_dict_dir
from tests.conftest import random_params

LIMIT = 400  # bytes: the large parameters of the tiny model (W_E 512 B, W_in 4 KiB) exceed one chunk


def _chunk_bytes(array: zarr.Array) -> int:
    return math.prod(array.chunks) * array.dtype.itemsize


def test_epochs_per_chunk_shrink_only_for_models_too_large_for_eight():
    # the layout small models always had: ~4 MB of the largest parameter, 8 to 1024 epochs
    assert [layout.chunk_epochs_for(b) for b in (1, 58 * 2**10, 2**20, 4 * 2**20)] == [1024, 64, 8, 8]
    # beyond: as many as fit in MAX_CHUNK_BYTES (32 MiB), at least one (a GPT-2 W_E is 154 MB)
    assert [layout.chunk_epochs_for(b) for b in (5 * 2**20, 16 * 2**20, 154 * 2**20)] == [4, 2, 1]
    assert layout.chunk_shape((50257, 768), 1, 4) == (1, 10052, 768)  # five even chunks of 29.5 MiB
    assert layout.chunk_shape((12, 768, 3072), 1, 4) == (1, 3, 768, 3072)  # four of three layers
    assert layout.chunk_shape((114, 128), 64, 4) == (64, 114, 128)  # small: whole arrays


def test_parameters_split_along_their_own_axes_round_trip_through_appends_and_inserts(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    params = random_params(tiny_model, range(6), seed=3)
    with StoreWriter.open(path, model=tiny_model, task={}, max_chunk_bytes=LIMIT) as writer:
        assert writer.chunk_epochs == 1
        writer.append([0, 20], {k: v[[0, 2]] for k, v in params.items()})
        writer.append([30, 40], {k: v[[3, 4]] for k, v in params.items()})
        writer.insert([10], {k: v[[1]] for k, v in params.items()})
        writer.append([50], {k: v[[5]] for k, v in params.items()})

    group = zarr.open_group(path, mode="r")
    split = [name for name in tiny_model.table.names if group[name].chunks[1:] != group[name].shape[1:]]
    assert {"W_E", "W_Q", "W_in", "W_out", "W_U"} <= set(split)
    assert all(_chunk_bytes(group[name]) <= LIMIT for name in tiny_model.table.names)
    chunk_files = [f for name in tiny_model.table.names for f in (path / name / "c").rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in chunk_files) <= LIMIT + 4  # the data and its crc32c

    store = geostore.open_store(path)
    assert store.epochs.tolist() == [0, 10, 20, 30, 40, 50]
    for name in tiny_model.table.names:
        assert store.params[name].chunksize == group[name].chunks  # dask reads chunk by chunk, as stored
        assert store.params[name].compute().tobytes() == params[name].tobytes()
        np.testing.assert_array_equal(store.params_at(40)[name], params[name][4])


def test_trajectory_of_split_parameters_is_exact_in_panels_of_a_few_rows(tmp_path, tiny_model):
    params = random_params(tiny_model, range(7), seed=5)
    with StoreWriter.open(tmp_path / "s.zarr", model=tiny_model, task={}, max_chunk_bytes=LIMIT) as writer:
        writer.append(range(7), params)
    x = np.concatenate([params[name].reshape(7, -1) for name in tiny_model.table.trainable], axis=1)
    x = x.astype(np.float64)
    store = geostore.open_store(tmp_path / "s.zarr")
    pca = store.pca("all", 3, memory_budget=3000)  # panels of a few rows, the others streamed past them
    variance = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)[:3] ** 2 / 6
    np.testing.assert_allclose(pca["explained_variance"].values, variance, rtol=1e-10)
    np.testing.assert_allclose(store.velocity("all").values, np.linalg.norm(np.diff(x, axis=0), axis=1), rtol=1e-10)


def test_ingest_of_a_model_above_the_limit_writes_one_checkpoint_at_a_time(tmp_path, monkeypatch):
    traj = trajectory(tiny_config(), [0, 10, 20])
    run = write_state_dict_dir(tmp_path / "run", traj)
    monkeypatch.setattr(layout, "MAX_CHUNK_BYTES", LIMIT)
    ingest(run, tmp_path / "s.zarr", flatness=None, progress=False)
    store = geostore.open_store(tmp_path / "s.zarr")
    assert store.chunk_epochs == 1 and store.params["W_E"].numblocks[1] > 1
    for name in store.table.names:
        np.testing.assert_array_equal(store.params[name].compute(), np.stack([traj[e][name] for e in (0, 10, 20)]))


def test_safetensors_read_without_the_library_matches_it_and_refuses_a_bad_header(tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.arange(3), "flag": np.array(True),
               "empty": np.zeros((0, 2), dtype=np.float16)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    loaded = load_safetensors(tmp_path / "a.safetensors")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value)
    raw = (tmp_path / "a.safetensors").read_bytes()
    bad = raw.replace(b'"shape":[3,4]', b'"shape":[4,4]')
    assert bad != raw
    (tmp_path / "b.safetensors").write_bytes(bad)
    with pytest.raises(SourceError, match=r"b\.safetensors: cannot read checkpoint: invalid safetensors header"):
        load_safetensors(tmp_path / "b.safetensors")
