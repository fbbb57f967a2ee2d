"""The store: schema on disk, appends, inserts, commit protocol, recovery, refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
import zarr

import geostore
from geostore.errors import ModelMismatchError, StoreError
from geostore.store import layout, schema
from geostore.store.writer import StoreWriter
from tests.conftest import ma_model, random_params, snapshot

TASK = {"family": "modular_addition", "p": 7}


def open_writer(path, model, **kw):
    return StoreWriter.open(path, model=model, task=TASK, **kw)


def test_append_reads_back_bit_equal_through_dask_and_xarray(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    first, second = random_params(tiny_model, range(3), 1), random_params(tiny_model, range(2), 2)
    writer = open_writer(path, tiny_model, chunk_epochs=4)
    writer.append([0, 10, 20], first, {"train_loss": np.array([3.0, 2.0, 1.0])})
    writer.append([30, 40], second)  # crosses the chunk boundary at index 4

    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.epochs, [0, 10, 20, 30, 40])
    assert store.epochs.dtype == np.int64
    assert store.table == tiny_model.table and store.family == "modular_addition"
    assert store.attrs["geostore"]["version"] == schema.FORMAT_VERSION == 2
    assert store.param_shapes() == {p.name: p.shape for p in tiny_model.table.parameters}
    assert store.param_shapes()["W_Q"] == (1, 2, 16, 8)  # one layer, stacked along `layer`
    for name in tiny_model.table.names:
        values = store.params[name].compute()
        assert values.dtype == np.float32
        assert values.tobytes() == np.concatenate([first[name], second[name]]).tobytes()
    np.testing.assert_array_equal(store.metrics()["train_loss"], [3, 2, 1, np.nan, np.nan])

    ds = xr.open_zarr(path)
    assert list(ds["epoch"].values) == [0, 10, 20, 30, 40]
    for parameter in tiny_model.table.parameters:
        name = parameter.name
        assert ds[name].dims == ("epoch", *parameter.dims)
        assert ds[name].dtype == np.float32
    assert ds["W_E"].encoding["chunks"][0] == 4
    assert store.to_xarray().identical(ds)


def test_flatten_concatenates_group_matrices_in_order(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    params = random_params(tiny_model, range(5))
    open_writer(path, tiny_model, chunk_epochs=2).append(range(5), params)
    store = geostore.open_store(path)
    assert store.groups == dict(tiny_model.table.groups)
    assert set(store.groups) == {"all", "embedding", "attention", "mlp"}
    assert store.groups["all"] == tiny_model.table.trainable
    for group, names in store.groups.items():
        expected = np.concatenate([params[n].reshape(5, -1) for n in names], axis=1)
        flat = store.flatten(group)
        assert flat.shape == expected.shape
        np.testing.assert_array_equal(flat.compute(), expected)
    np.testing.assert_array_equal(store.flatten(["W_in", "b_in"]).compute()[:, :16 * 64],
                                  params["W_in"].reshape(5, -1))
    assert store.flatten("all").shape[1] == sum(params[n][0].size for n in tiny_model.table.trainable)
    assert store.flatten("all").shape[1] == store.n_trainable == tiny_model.table.n_trainable()
    with pytest.raises(StoreError, match="unknown group"):
        store.flatten("bogus")


def test_insert_keeps_epochs_sorted_and_stored_data_unchanged(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    old, new = random_params(tiny_model, range(4), 1), random_params(tiny_model, range(2), 2)
    writer = open_writer(path, tiny_model, chunk_epochs=2)
    writer.append([0, 10, 20, 30], old, {"test_loss": np.arange(4.0)})
    writer.insert([25, 5], new, {"test_loss": np.array([9.0, 8.0])})
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.epochs, [0, 5, 10, 20, 25, 30])
    w_e = store.params["W_E"].compute()
    for epoch, value in zip([0, 10, 20, 30], old["W_E"], strict=True):
        assert w_e[store.index_of(epoch)].tobytes() == value.tobytes()
    assert w_e[store.index_of(25)].tobytes() == new["W_E"][0].tobytes()
    assert w_e[store.index_of(5)].tobytes() == new["W_E"][1].tobytes()
    np.testing.assert_array_equal(store.metrics()["test_loss"], [0, 8, 1, 2, 9, 3])
    assert not (path / layout.PENDING).exists()
    with pytest.raises(StoreError, match="new, distinct"):
        StoreWriter.open(path, model=tiny_model, task=TASK).insert([5], random_params(tiny_model, [5]))


def test_uncommitted_append_is_invisible_and_discarded_on_reopen(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    params = random_params(tiny_model, range(3))
    writer = open_writer(path, tiny_model, chunk_epochs=2)
    writer.append([0, 1], {k: v[:2] for k, v in params.items()})
    committed = snapshot(path)
    # A writer killed after writing chunks but before the commit (the root zarr.json rename).
    writer._write_region(2, writer._columns(np.array([2]), {k: v[2:] for k, v in params.items()}, None))
    assert zarr.open_array(str(path), path="W_E", mode="r").shape[0] == 3
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.epochs, [0, 1])
    assert xr.open_zarr(path).sizes["epoch"] == 2
    np.testing.assert_array_equal(store.params["W_E"].compute(), params["W_E"][:2])

    reopened = open_writer(path, tiny_model)
    assert zarr.open_array(str(path), path="W_E", mode="r").shape[0] == 2
    reopened.append([2], {k: v[2:] for k, v in params.items()})
    fresh = tmp_path / "fresh.zarr"
    clean = open_writer(fresh, tiny_model, chunk_epochs=2)
    clean.append([0, 1], {k: v[:2] for k, v in params.items()})
    clean.append([2], {k: v[2:] for k, v in params.items()})
    assert snapshot(path) == snapshot(fresh)
    assert committed != snapshot(path)


def test_staged_insert_is_replayed_after_a_crash(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    old, new = random_params(tiny_model, range(3), 1), random_params(tiny_model, range(1), 2)
    writer = open_writer(path, tiny_model, chunk_epochs=2)
    writer.append([0, 10, 20], old)
    # Stage the insertion of epoch 5, then shift the tail half-way, then "die".
    tail = {name: writer._array(name)[1:3] for name in writer._epoch_arrays()}
    new_cols = writer._columns(np.array([5]), new, None)
    staged = {name: np.concatenate([new_cols[name], tail[name]]) for name in tail}
    writer._stage(1, staged)
    writer._array("W_E")[1] = new["W_E"][0]  # a shifted write that overwrote stored epoch 10's slot

    store = geostore.open_store(path)
    assert store.interrupted
    np.testing.assert_array_equal(store.epochs, [0])  # only the prefix the insertion did not touch

    open_writer(path, tiny_model)  # recovery replays the staged tail
    store = geostore.open_store(path)
    assert not store.interrupted
    np.testing.assert_array_equal(store.epochs, [0, 5, 10, 20])
    w_e = store.params["W_E"].compute()
    assert w_e[2].tobytes() == old["W_E"][1].tobytes() and w_e[1].tobytes() == new["W_E"][0].tobytes()


def test_incomplete_stage_is_discarded(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    open_writer(path, tiny_model).append([0, 10], random_params(tiny_model, range(2)))
    (path / layout.PENDING).mkdir()
    (path / layout.PENDING / "W_E.npy").write_bytes(b"partial")
    before = geostore.open_store(path).params["W_E"].compute()
    open_writer(path, tiny_model)
    assert not (path / layout.PENDING).exists()
    np.testing.assert_array_equal(geostore.open_store(path).params["W_E"].compute(), before)


def test_rollback_restores_the_store_as_opened(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    open_writer(path, tiny_model, chunk_epochs=2).append([0, 1, 2], random_params(tiny_model, range(3)))
    before = snapshot(path)
    writer = open_writer(path, tiny_model)
    writer.append([3, 4], random_params(tiny_model, range(2), 5))
    assert snapshot(path) != before
    writer.rollback()
    np.testing.assert_array_equal(geostore.open_store(path).epochs, [0, 1, 2])
    assert snapshot(path) == before  # byte for byte, the edge chunk (epoch 2 of chunk [2, 4)) included

    writer = open_writer(path, tiny_model)  # enabling flatness is undone too
    writer.enable_flatness({"epsilon": 0.1, "n_directions": 4, "seed": 0})
    writer.append([3], random_params(tiny_model, [0], 6))
    writer.rollback()
    assert snapshot(path) == before and geostore.open_store(path).analyses() == []


def test_refuses_other_models_and_non_stores_without_writing(tmp_path, tiny_model):
    from geostore.family.modular_addition import grid_split, model_config

    path = tmp_path / "s.zarr"
    StoreWriter.open(path, model=tiny_model, task={**TASK, "data_seed": 0}, split=grid_split(7, [1, 2])).append(
        [0], random_params(tiny_model, [0]))
    assert geostore.open_store(path).train_mask().sum() == 2
    before = snapshot(path)
    # other shapes are named by the first state-dict entry that differs; other config values by the field
    with pytest.raises(ModelMismatchError, match=r"another model \(blocks\.0\.attn\.W_K: \(2, 16, 8\), "
                                                 r"source has \(2, 32, 16\)\)"):
        open_writer(path, ma_model(model_config(7, d_model=32, n_heads=2)))
    with pytest.raises(ModelMismatchError, match="another model .*act_fn='relu', source has 'gelu'"):
        open_writer(path, ma_model({**tiny_model.config, "act_fn": "gelu"}))
    with pytest.raises(ModelMismatchError, match="another run .*data_seed=0"):
        StoreWriter.open(path, model=tiny_model, task={**TASK, "data_seed": 1})
    with pytest.raises(ModelMismatchError, match="split differs"):
        StoreWriter.open(path, model=tiny_model, task=TASK, split=grid_split(7, [1, 3]))
    assert snapshot(path) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a geostore store"):
        open_writer(other, tiny_model)
    assert (other / "readme.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w")
    with pytest.raises(StoreError, match="without geostore attributes"):
        geostore.open_store(plain)
    with pytest.raises(StoreError, match="no such store"):
        geostore.open_store(tmp_path / "missing.zarr")


def test_model_at_rebuilds_the_exact_model(tmp_path, tiny_model):
    import torch

    from geostore.family import tl_compat

    model = tiny_model.build(seed=3)
    params = tiny_model.stored(model)
    path = tmp_path / "s.zarr"
    open_writer(path, tiny_model).append([7], {k: v[None] for k, v in params.items()})
    store = geostore.open_store(path)
    rebuilt = store.model_at(7)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    state = store.state_dict_at(7)  # parameters only, layers unstacked, under the table's (HookedTransformer) keys
    expected = tl_compat.hooked_state(model)  # a TransformerBridge's converted on TransformerLens 4
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(torch.as_tensor(value), expected[key]), key
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    tokens = torch.tensor([[1, 2, 7], [3, 4, 7]])
    assert torch.equal(rebuilt(tokens), model(tokens))
    with pytest.raises(StoreError, match="epoch 8 is not stored"):
        geostore.open_store(path).model_at(8)


# ------------------------------------------------------------------------------------------ flatness
def flatness_rows(k: int, n_dir: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, k), rng.standard_normal((k, n_dir)) * 1e-3


def test_flatness_rows_read_back_lazily_and_through_xarray(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, tiny_model, chunk_epochs=2)
    writer.append([0, 10, 20, 30], random_params(tiny_model, range(4)))
    baseline, deltas = flatness_rows(2)
    writer.write_flatness([30, 10], baseline, deltas, epsilon=0.1, seed=7)

    store = geostore.open_store(path)
    assert store.analyses() == ["flatness"]
    flatness = store.analysis("flatness")
    assert flatness.attrs == store.analysis_settings("flatness") == {"epsilon": 0.1, "n_directions": 5, "seed": 7}
    assert flatness["delta_losses"].dims == ("epoch", "direction") and flatness.chunks  # lazy, over epoch
    np.testing.assert_array_equal(flatness["epoch"], [0, 10, 20, 30])
    got_baseline, got_deltas = flatness["baseline_loss"].values, flatness["delta_losses"].values
    np.testing.assert_array_equal(got_baseline, [np.nan, baseline[1], np.nan, baseline[0]])
    np.testing.assert_array_equal(got_deltas[[3, 1]], deltas)
    assert np.isnan(got_deltas[[0, 2]]).all()
    np.testing.assert_array_equal(writer.flatness_missing(), [0, 20])
    np.testing.assert_array_equal(store.analysis_epochs("flatness"), [10, 30])
    for old, new in (("baseline_loss", got_baseline), ("delta_losses", got_deltas)):  # kept for one release
        with pytest.warns(DeprecationWarning, match=re.escape(f"use store.analysis('flatness')['{old}']")):
            np.testing.assert_array_equal(getattr(store, old).compute(), new)
    with pytest.warns(DeprecationWarning, match="analysis_settings"):
        assert store.flatness_settings == flatness.attrs
    with pytest.warns(DeprecationWarning, match="analysis_epochs"):
        np.testing.assert_array_equal(store.flatness_epochs(), [10, 30])

    ds = xr.open_zarr(path)
    assert ds["delta_losses"].dims == ("epoch", "direction") and ds["baseline_loss"].dims == ("epoch",)
    np.testing.assert_array_equal(ds["delta_losses"].values[3], deltas[0])


def test_an_epoch_without_its_baseline_is_not_visible(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, tiny_model, chunk_epochs=2)
    writer.append([0, 10], random_params(tiny_model, range(2)))
    writer.enable_flatness({"epsilon": 0.1, "n_directions": 5, "seed": 0})
    # A writer killed between the delta_losses write and the baseline write (which marks completion).
    writer._array("delta_losses")[1] = np.arange(5.0)
    store = geostore.open_store(path)
    assert np.isnan(store.analysis("flatness")["delta_losses"]).all()
    assert np.isnan(store.to_xarray()["delta_losses"]).all()  # masked as `analysis` masks it
    np.testing.assert_array_equal(xr.open_zarr(path)["delta_losses"][1], np.arange(5.0))  # the raw bytes
    assert store.analysis_epochs("flatness").size == 0
    np.testing.assert_array_equal(open_writer(path, tiny_model).flatness_missing(), [0, 10])


def test_flatness_of_other_settings_is_refused_unless_recomputed(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, tiny_model)
    writer.append([0, 10], random_params(tiny_model, range(2)))
    writer.write_flatness([0], *flatness_rows(1), epsilon=0.1, seed=0)
    before = snapshot(path)
    for settings in ({"epsilon": 0.2, "n_directions": 5, "seed": 0}, {"epsilon": 0.1, "n_directions": 6, "seed": 0},
                     {"epsilon": 0.1, "n_directions": 5, "seed": 1}):
        with pytest.raises(StoreError, match="holds flatness with epsilon=0.1, n_directions=5, seed=0"):
            open_writer(path, tiny_model).enable_flatness(settings)
    assert snapshot(path) == before
    with pytest.raises(StoreError, match="not stored: \\[5\\]"):
        open_writer(path, tiny_model).write_flatness([5], *flatness_rows(1))

    weights = geostore.open_store(path).params["W_E"].compute()
    writer = open_writer(path, tiny_model)
    writer.enable_flatness({"epsilon": 0.2, "n_directions": 3, "seed": 0}, recompute=True)
    store = geostore.open_store(path)
    flatness = store.analysis("flatness")
    assert flatness.attrs["n_directions"] == 3 and flatness["delta_losses"].shape == (2, 3)
    assert np.isnan(flatness["baseline_loss"]).all()
    assert store.params["W_E"].compute().tobytes() == weights.tobytes()


def test_flatness_rows_move_with_appends_inserts_and_rollbacks(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, tiny_model, chunk_epochs=2)
    writer.append([0, 20], random_params(tiny_model, range(2)))
    baseline, deltas = flatness_rows(4)
    writer.write_flatness([0, 20], baseline[:2], deltas[:2], epsilon=0.1, seed=0)
    writer.append([30], random_params(tiny_model, [0], 1))
    assert np.isnan(geostore.open_store(path).analysis("flatness")["delta_losses"][2]).all()  # not computed yet
    writer.write_flatness([30], baseline[2:3], deltas[2:3])
    writer.insert([10], random_params(tiny_model, [0], 2))  # no flatness: a NaN row in the middle
    store = geostore.open_store(path)
    np.testing.assert_array_equal(store.epochs, [0, 10, 20, 30])
    flatness = store.analysis("flatness")
    np.testing.assert_array_equal(flatness["baseline_loss"], [baseline[0], np.nan, baseline[1], baseline[2]])
    np.testing.assert_array_equal(flatness["delta_losses"][[0, 2, 3]], deltas[:3])
    np.testing.assert_array_equal(writer.flatness_missing(), [10])
    np.testing.assert_array_equal(store.analysis_epochs("flatness"), [0, 20, 30])

    before = snapshot(path)
    writer = open_writer(path, tiny_model)
    writer.append([40], random_params(tiny_model, [0], 3))
    writer.write_flatness([40], baseline[3:], deltas[3:])
    writer.rollback()
    assert snapshot(path) == before
    with pytest.raises(StoreError, match="store holds 5 directions"):
        writer.write_flatness([30], baseline[3:], deltas[3:, :2])


def test_store_without_flatness_says_how_to_add_it(tmp_path, tiny_model):
    path = tmp_path / "s.zarr"
    open_writer(path, tiny_model).append([0, 1], random_params(tiny_model, range(2)))
    store = geostore.open_store(path)
    assert store.analyses() == []
    with pytest.raises(StoreError, match="no flatness stored \\(run `geostore flatness"):
        store.analysis("flatness")
