"""Curvature by component group: each group's Hessian-block trace and top eigenvalue against the exact Hessian of
a small model, and the `hessian_groups` analysis in the store: computed with the Hessian, read back as a labelled
Dataset, and added to a store that holds the Hessian without it, leaving the stored totals alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import geostore
from geostore.analysis.curvature import hessian_for_params, rademacher
from geostore.cli import main
from geostore.family import modular_addition as fam
from geostore.landscape import FlatnessSettings, HessianSettings, epoch_landscape, hessian_groups
from geostore.store import schema
from geostore.store.writer import StoreWriter
from tests.conftest import ma_model, random_params
from tests.test_curvature import plain_loss64

# p=5, d_model=4: 184 trainable numbers, so the exact float64 Hessian is cheap
SMALL = fam.model_config(5, d_model=4, n_heads=1, d_mlp=8)
GROUPS = ["embedding", "attention", "mlp"]
EPOCHS = [0, 10]
HESSIAN = HessianSettings(n_probes=4, iterations=4, seed=2)
SETTINGS = FlatnessSettings(n_directions=2, epsilon=0.1, seed=2, hessian=HESSIAN)
ARGS = ["--directions", "2", "--seed", "2", "--hessian", "--hessian-probes", "4", "--lanczos-steps", "4", "--quiet"]


@pytest.fixture(scope="module")
def small():
    """The small model and two epochs of random weights (scaled to a loss of ~2 nats: a curved landscape)."""
    model = ma_model(SMALL)
    return model, {name: 0.5 * value for name, value in random_params(model, EPOCHS, seed=1).items()}


@pytest.fixture(scope="module")
def grouped_store(small, tmp_path_factory):
    """A store of `small` whose flatness and Hessian `geostore flatness --hessian` computed."""
    model, params = small
    path = tmp_path_factory.mktemp("groups") / "s.zarr"
    make_store(path, model, params)
    assert main(["flatness", str(path), *ARGS]) == 0
    return path


def group_indices(model) -> dict[str, np.ndarray]:
    return {group: model.table.flat_indices(group) for group in hessian_groups(model.table)}


def test_group_traces_and_top_eigenvalues_are_those_of_the_exact_hessian_blocks(small):
    model, params = small
    epoch = {name: value[-1] for name, value in params.items()}
    loss, theta = plain_loss64(epoch, model)
    exact = torch.autograd.functional.hessian(loss, theta, vectorize=True).numpy()
    groups = group_indices(model)
    assert list(groups) == GROUPS  # a partition of the trainable vector
    assert np.array_equal(np.sort(np.concatenate(list(groups.values()))), np.arange(theta.numel()))

    n_probes = 64
    got = hessian_for_params(epoch, model, n_probes=n_probes, iterations=12, seed=0, groups=groups)
    probes = rademacher(theta.numel(), n_probes, seed=0).double().numpy()
    products = probes @ exact  # H symmetric: row i is H v_i
    for k, (group, indices) in enumerate(groups.items()):
        block = exact[np.ix_(indices, indices)]
        forms = (probes[:, indices] * products[:, indices]).sum(axis=1)  # v_g'(Hv)_g, from the exact Hessian
        scale = np.abs(forms).max()
        trace, stderr = got["group_hessian_trace"][k], got["group_hessian_trace_stderr"][k]
        assert trace == pytest.approx(forms.mean(), abs=1e-5 * scale), group  # float32 products
        assert stderr == pytest.approx(forms.std(ddof=1) / math.sqrt(n_probes), rel=1e-3), group
        # unbiased: the truth Tr(H_gg) lies within 3 standard errors, which are small enough to mean something
        assert abs(trace - np.trace(block)) < 3 * stderr and stderr < 0.5 * abs(np.trace(block)), group
        top = np.linalg.eigvalsh(block)[-1]
        assert got["group_top_eigenvalue"][k] == pytest.approx(top, rel=1e-5), group
        assert got["group_top_eigenvalue_residual"][k] < 1e-4 * top, group
    # the blocks of a partition hold the whole diagonal: their traces add up to the total's, probe by probe
    assert got["group_hessian_trace"].sum() == pytest.approx(got["hessian_trace"], rel=1e-12)
    assert abs(got["top_eigenvalue"] - np.linalg.eigvalsh(exact)[-1]) < got["top_eigenvalue_residual"] + 1e-5
    assert got["top_eigenvalue"] >= got["group_top_eigenvalue"].max() - 1e-4  # Cauchy interlacing


def make_store(path, model, params) -> None:
    StoreWriter.open(path, model=model, task={"family": "modular_addition", "p": 5}).append(EPOCHS, params)


def test_hessian_stores_each_groups_block_read_back_as_a_labelled_dataset(small, grouped_store):
    model, _ = small
    store = geostore.open_store(grouped_store)
    assert store.analyses() == ["flatness", "hessian", "hessian_groups"]
    grouped, total = store.analysis("hessian_groups"), store.analysis("hessian")
    assert list(grouped["group"].values) == GROUPS and grouped.attrs["groups"] == GROUPS
    assert grouped["group_top_eigenvalue"].dims == ("epoch", "group")
    assert grouped.attrs["n_probes"] == 4 and grouped.attrs["iterations"] == 4 and grouped.attrs["seed"] == 2
    for row, epoch in enumerate(EPOCHS):
        want = hessian_for_params(store.params_at(epoch), model, n_probes=4, iterations=4, seed=2,
                                  groups=group_indices(model))
        for name in (*schema.ANALYSES["hessian"], *schema.ANALYSES["hessian_groups"]):
            stored = (grouped if name.startswith("group_") else total)[name].values[row]
            assert np.array_equal(stored, want[name]), (name, epoch)
    np.testing.assert_allclose(grouped["group_hessian_trace"].sum("group"), total["hessian_trace"], rtol=1e-12)
    assert np.array_equal(grouped["group_hessian_trace"].sel(group="mlp").values,
                          grouped["group_hessian_trace"].values[:, 2])
    assert "hessian_groups trace and top eigenvalue of the Hessian block of embedding, attention, mlp: 2 of 2" \
        in store.describe()


def test_a_store_holding_the_hessian_without_groups_gets_them_later_without_touching_its_totals(
        small, grouped_store, tmp_path, capsys):
    model, params = small
    old = tmp_path / "old.zarr"
    make_store(old, model, params)
    # a store as `--hessian` wrote it before the groups: flatness and the totals (values unlike any recomputation)
    with StoreWriter.open(old, model=model, task={"family": "modular_addition", "p": 5}) as writer:
        writer.enable_analyses(SETTINGS.analyses())  # no parameter table: no groups
        for epoch in EPOCHS:
            rows = epoch_landscape(geostore.open_store(old).params_at(epoch), model, None, SETTINGS, ["flatness"])
            writer.write_analysis("flatness", [epoch], {k: np.asarray(v)[None] for k, v in rows["flatness"].items()})
        writer.write_analysis("hessian", EPOCHS, {name: np.arange(2.0) + k for k, name in
                                                  enumerate(schema.ANALYSES["hessian"])})
    before = {f.relative_to(old): f.read_bytes() for name in (*schema.ANALYSES["hessian"], "hessian_done")
              for f in sorted((old / name).rglob("*")) if f.is_file()}
    assert "hessian_groups" not in geostore.open_store(old).analyses()

    assert main(["flatness", str(old), *ARGS]) == 0  # no --recompute: the groups are a new analysis
    assert "flatness, hessian, hessian_groups computed for 2 epochs" in capsys.readouterr().out
    after = {f.relative_to(old): f.read_bytes() for name in (*schema.ANALYSES["hessian"], "hessian_done")
             for f in sorted((old / name).rglob("*")) if f.is_file()}
    assert after == before  # the totals' chunks and done flags, byte for byte
    backfilled, together = (geostore.open_store(p).analysis("hessian_groups") for p in (old, grouped_store))
    for name in schema.ANALYSES["hessian_groups"]:  # the same numbers as computed beside the totals
        assert backfilled[name].values.tobytes() == together[name].values.tobytes(), name
    assert main(["flatness", str(old), *ARGS]) == 0
    assert "computed for 0 epochs (2 already complete)" in capsys.readouterr().out
