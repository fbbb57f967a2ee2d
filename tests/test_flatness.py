"""Flatness numerics: the seed's contract on real TransformerLens models, and the fast path against the plain forward.

Float32 and float64 are checked separately. The algebra of the fast evaluator is checked in float64, where
rounding is negligible (relative 1e-10 against the plain HookedTransformer forward). In float32 a delta is a
small difference of two losses, so both paths are compared with the float64 forward of the same perturbed
weights: the fast path within 1e-4 relative plus a floor far below the reference's own float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import geostore
from geostore.analysis.evaluator import plain_directional_losses
from geostore.analysis.flatness import (
    compute_landscape_flatness,
    draw_directions,
    flatness_for_params,
    perturbed,
)
from geostore.analysis.flatness_stats import flatness_summary
from geostore.errors import GeostoreError
from geostore.family import hooked, tl_compat
from geostore.family import modular_addition as fam
from geostore.family import modular_addition_fast as fast

P = 13
CONFIG = fam.model_config(P, d_model=32, n_heads=4)
MODEL = fam.MODULAR_ADDITION.model(CONFIG)
PROBE = fam.probe(P)
def trainable_keys(module: torch.nn.Module, model=MODEL) -> list[str]:
    """The module's own paths of the table's trainable parameters, in table order (the order of the trainable
    vector): the table's keys on a HookedTransformer, the bridge's paths on TransformerLens 4."""
    zeros = {name: np.zeros(model.table[name].shape, np.float32) for name in model.table.trainable}
    return list(model.module_state(module)(model.table.state_dict(zeros)))


def named_parameters(module: torch.nn.Module, model=MODEL) -> dict[str, np.ndarray]:
    """A module's parameters as the store holds them (the family table's names and layout)."""
    return model.stored(module)


def trained(steps: int, config: dict = CONFIG, seed: int = 0) -> torch.nn.Module:
    """A model after `steps` full-grid AdamW steps on the 9 weight matrices (0: random init)."""
    model = fam.MODULAR_ADDITION.model(config).build(seed=seed)
    weights = [param for param in model.parameters() if param.requires_grad]
    assert len(weights) == len(fam.TRAINABLE)
    optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        fam.loss_fn(model, PROBE).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"random": trained(0), "partial": trained(20), "minimum": trained(300)}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def seed_reference(module: torch.nn.Module, model, *, n_directions: int, seed: int) -> dict[str, object]:
    """The seed's `compute_landscape_flatness` (epsilon 0.1) along the table's directions: on a module whose own
    layout is the table's (HookedTransformer); a TransformerBridge orders and shapes its attention matrices
    another way, so there the same perturb-forward-restore loop runs through the table layout
    (`evaluator.plain_directional_losses`, its per-example losses summed in float64)."""
    if not tl_compat.bridge_era():
        return compute_landscape_flatness(module, model.probe(), fam.loss_fn, n_directions=n_directions, epsilon=0.1,
                                          seed=seed, trainable=trainable_keys(module, model))
    baseline, deltas = plain_directional_losses(model.stored(module), model, n_directions=n_directions,
                                                scales=[0.1], seed=seed)
    return {"baseline_loss": baseline, "delta_losses": deltas[0]}


def trainable_size(config: dict) -> int:
    return fam.MODULAR_ADDITION.model(config).table.n_trainable()


def plain_losses64(params: dict[str, np.ndarray], config: dict, n_directions: int, epsilon: float, seed: int
                   ) -> np.ndarray:
    """The plain float64 HookedTransformer loss at the weights and at each float32-perturbed weight set."""
    p = fam.prime_of(config)
    family_model = fam.MODULAR_ADDITION.model(config)
    assert family_model.table.trainable == fam.TRAINABLE
    weights = {name: torch.as_tensor(params[name]) for name in fam.TRAINABLE}
    moved = perturbed(weights, draw_directions(trainable_size(config), n_directions, seed), epsilon)
    model = family_model.build().double()
    tokens, labels = fam.probe(p)
    out = []
    with torch.no_grad():
        for i in range(-1, n_directions):
            point = dict(params) if i < 0 else {**params, **{name: moved[name][i].numpy() for name in moved}}
            hooked.load_stored(model, family_model.table,
                               {name: np.asarray(value, dtype=np.float64) for name, value in point.items()})
            out.append(F.cross_entropy(model(tokens)[:, -1, :p], labels).item())
    return np.array(out)


def test_reference_restores_weights_bitwise_and_returns_one_delta_per_direction(models):
    model = models["partial"]
    before = state(model)
    result = compute_landscape_flatness(model, PROBE, fam.loss_fn, n_directions=7, epsilon=0.1, seed=1)
    assert_same_state(model, before)
    assert set(result) == {"baseline_loss", "delta_losses", "epsilon"}
    assert all(isinstance(value, np.ndarray) and value.dtype == np.float64 for value in result.values())  # REQ_031
    assert result["baseline_loss"].shape == result["epsilon"].shape == () and result["delta_losses"].shape == (7,)
    top_level = geostore.compute_landscape_flatness(model, PROBE, fam.loss_fn, n_directions=7, epsilon=0.1, seed=1)
    for key, value in result.items():
        np.testing.assert_array_equal(top_level[key], value)
    assert result["epsilon"] == 0.1 and result["baseline_loss"] == pytest.approx(fam.loss_fn(model, PROBE).item())
    assert np.all(result["delta_losses"] != 0)


def test_weights_are_restored_when_the_loss_function_raises(models):
    model = models["partial"]
    before, w_e = state(model), named_parameters(model)["W_E"]
    calls = []

    def failing_loss(m, probe):
        calls.append(np.array_equal(named_parameters(m)["W_E"], w_e))
        if len(calls) == 3:
            raise RuntimeError("loss failed")
        return fam.loss_fn(m, probe)

    with pytest.raises(RuntimeError, match="loss failed"):
        compute_landscape_flatness(model, PROBE, failing_loss, n_directions=5, epsilon=0.1, seed=0)
    assert calls == [True, False, False]  # it failed while the weights were perturbed
    assert_same_state(model, before)


def test_a_missing_loss_function_is_a_clear_error_and_touches_nothing(models):
    model = models["random"]
    before = state(model)
    with pytest.raises(GeostoreError, match="loss function"):
        compute_landscape_flatness(model, PROBE, None, n_directions=3)
    assert_same_state(model, before)


def test_the_same_seed_gives_the_same_result(models):
    model = models["random"]
    first = compute_landscape_flatness(model, PROBE, fam.loss_fn, n_directions=6, seed=5)
    again = compute_landscape_flatness(model, PROBE, fam.loss_fn, n_directions=6, seed=5)
    other = compute_landscape_flatness(model, PROBE, fam.loss_fn, n_directions=6, seed=6)
    unseeded = [compute_landscape_flatness(model, PROBE, fam.loss_fn, n_directions=6)["delta_losses"]
                for _ in range(2)]
    np.testing.assert_array_equal(first["delta_losses"], again["delta_losses"])
    assert not np.array_equal(first["delta_losses"], other["delta_losses"])
    assert not np.array_equal(*unseeded)


def test_directions_are_unit_vectors_over_all_weight_matrices_at_once(models):
    model = models["random"]
    n_params = trainable_size(CONFIG)
    directions = draw_directions(n_params, 4, seed=2).double()
    assert directions.shape == (4, n_params)
    np.testing.assert_allclose(directions.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    # Not per matrix: each matrix holds about its share of a unit vector, and those shares add up to 1.
    sizes = [MODEL.table[name].size for name in fam.TRAINABLE]
    shares = torch.stack([chunk.pow(2).sum(dim=1) for chunk in directions.split(sizes, dim=1)], dim=1)
    np.testing.assert_allclose(shares.sum(dim=1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(shares.mean(dim=0).numpy(), np.array(sizes) / n_params, rtol=0.5, atol=2e-4)
    # The perturbation the reference applies is epsilon times that vector, across the 9 matrices.
    keys = trainable_keys(model)
    original = torch.cat([model.get_parameter(key).detach().flatten() for key in keys])
    seen = []

    def recording_loss(m, probe):
        seen.append(torch.cat([m.get_parameter(key).detach().flatten() for key in keys]))
        return fam.loss_fn(m, probe)

    # in table order (the reference's default is `named_parameters()` order: W_Q, W_O, ... W_K)
    compute_landscape_flatness(model, PROBE, recording_loss, n_directions=4, epsilon=0.25, seed=2, trainable=keys)
    steps = torch.stack(seen[1:]).double() - original.double()
    np.testing.assert_allclose(steps.numpy(), 0.25 * directions.numpy(), atol=1e-6)
    # Direction i depends on the seed and i only; callers get copies of the cached draw.
    np.testing.assert_array_equal(draw_directions(n_params, 2, seed=2).numpy(), directions[:2].float().numpy())
    draw_directions(n_params, 4, seed=2).zero_()
    assert torch.equal(draw_directions(n_params, 4, seed=2), directions.float())


def test_deltas_are_small_at_a_minimum(models):
    random_model, minimum = models["random"], models["minimum"]
    at_minimum = compute_landscape_flatness(minimum, PROBE, fam.loss_fn, n_directions=10, seed=0)
    at_random = compute_landscape_flatness(random_model, PROBE, fam.loss_fn, n_directions=10, seed=0)
    assert at_minimum["baseline_loss"] < 1e-4 < at_random["baseline_loss"]
    assert np.abs(at_minimum["delta_losses"]).max() < 0.01 * np.abs(at_random["delta_losses"]).max()
    # the fast path along the table's directions (a TransformerBridge's own layout orders the reference's otherwise)
    _, fast_deltas = flatness_for_params(named_parameters(minimum), MODEL, n_directions=10, epsilon=0.1, seed=0)
    _, fast_random = flatness_for_params(named_parameters(random_model), MODEL, n_directions=10, epsilon=0.1, seed=0)
    assert np.abs(fast_deltas).max() < 0.01 * np.abs(fast_random).max()


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
@pytest.mark.parametrize("which", ["random", "partial"])
def test_fast_losses_equal_the_plain_forward_in_float64(models, which, act_fn):
    config = {**CONFIG, "act_fn": act_fn}
    model = fam.MODULAR_ADDITION.model(config)
    params = named_parameters(models[which])
    rng = np.random.default_rng(0)  # nonzero biases, so every bias term of the algebra is exercised
    params.update({name: rng.normal(0, 0.3, value.shape).astype(np.float32)
                   for name, value in params.items() if name not in fam.TRAINABLE})
    expected = plain_losses64(params, config, n_directions=5, epsilon=0.1, seed=4)
    weights = {name: torch.as_tensor(params[name]) for name in fam.TRAINABLE}
    moved = perturbed(weights, draw_directions(trainable_size(config), 5, 4), 0.1)  # float32, as plain_losses64
    stacked = {name: torch.cat([weights[name][None], moved[name]]).double() for name in fam.TRAINABLE}
    biases = {name: torch.as_tensor(value).double() for name, value in params.items() if name not in fam.TRAINABLE}
    assert fast.supports(model)
    got = model.fast_loss(biases)(stacked).numpy()  # the table-layout seam around `fast.losses`
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # a delta of two float64 losses is no more exact than their rounding: a few ulp of the loss as a floor
    np.testing.assert_allclose(got[1:] - got[0], expected[1:] - expected[0], rtol=1e-10,
                               atol=4 * np.spacing(expected[0]))


def test_fast_losses_over_several_blocks_equal_the_plain_forward_whatever_the_batch():
    """p = 37 takes two blocks of grid rows (27, then a partial 10; P = 13 fits one): in float64 the fast loss
    is the plain forward's, and in float32 a weight set's loss has the same bits alone or among others."""
    config = fam.model_config(37, d_model=16, n_heads=2, d_mlp=32)
    model = fam.MODULAR_ADDITION.model(config)
    assert fast.BLOCK_PAIRS // 37 == 27
    rng = np.random.default_rng(1)
    params = {name: rng.normal(0, 0.5, model.table[name].shape).astype(np.float32)  # nonzero biases too
              for name in model.table.names}
    expected = plain_losses64(params, config, n_directions=2, epsilon=0.5, seed=3)
    weights = {name: torch.as_tensor(params[name]) for name in fam.TRAINABLE}
    moved = perturbed(weights, draw_directions(trainable_size(config), 2, 3), 0.5)
    stacked = {name: torch.cat([weights[name][None], moved[name]]) for name in fam.TRAINABLE}
    biases = {name: torch.as_tensor(value) for name, value in params.items() if name not in fam.TRAINABLE}
    loss64 = model.fast_loss({name: value.double() for name, value in biases.items()})
    np.testing.assert_allclose(loss64({name: w.double() for name, w in stacked.items()}).numpy(), expected,
                               rtol=1e-12)
    loss32 = model.fast_loss(biases)
    together = loss32(stacked)
    alone = torch.cat([loss32({name: w[i:i + 1] for name, w in stacked.items()}) for i in range(3)])
    assert torch.equal(together, alone) and len(set(together.tolist())) == 3


@pytest.mark.parametrize("which", ["random", "partial"])
def test_fast_float32_deltas_match_the_plain_forward(models, which):
    """Per direction, against the float64 forward of the same float32-perturbed weights (the truth): the fast
    path within 1e-4 relative, with a floor of one float32 ulp of the loss (its rounding mostly averages out over
    the grid: ~1e-9 of the loss on the earlier HookedTransformer-initialised weights, 8.6e-8 at one direction of
    the "partial" model trained from geostore's initialisation on TransformerLens 3.9); the float32 reference
    within 1e-4 relative plus 4 ulp of the loss, since it returns float32 losses (each rounded to 1/2 ulp) reduced
    in float32 over the grid. Fast and reference then agree within 1e-4 relative plus those 4 ulp."""
    model = models[which]
    params = named_parameters(model)
    truth = plain_losses64(params, CONFIG, n_directions=8, epsilon=0.1, seed=0)
    truth_deltas = truth[1:] - truth[0]
    baseline, deltas = flatness_for_params(params, MODEL, n_directions=8, epsilon=0.1, seed=0)
    reference = seed_reference(model, MODEL, n_directions=8, seed=0)
    ulp = float(np.spacing(np.float32(truth[0])))
    assert deltas.dtype == np.float64 and baseline == pytest.approx(truth[0], rel=1e-6)
    np.testing.assert_allclose(deltas, truth_deltas, rtol=1e-4, atol=ulp)
    np.testing.assert_allclose(reference["delta_losses"], truth_deltas, rtol=1e-4, atol=4 * ulp)
    np.testing.assert_allclose(deltas, reference["delta_losses"], rtol=1e-4, atol=4 * ulp)


def test_fast_float32_deltas_near_zero_loss_beat_the_float32_reference(models):
    """At a minimum (loss ~4e-6, deltas ~1e-8..4e-7) float32 logits limit any float32 path: the fast path
    stays within 1e-3 of the float64 truth, while the reference's float32 log-softmax quantizes each pair's
    loss (`1 + rest` in float32) and is off by more than ten times as much."""
    model = models["minimum"]
    params = named_parameters(model)
    truth = plain_losses64(params, CONFIG, n_directions=8, epsilon=0.1, seed=0)
    truth_deltas = truth[1:] - truth[0]
    _, deltas = flatness_for_params(params, MODEL, n_directions=8, epsilon=0.1, seed=0)
    reference = seed_reference(model, MODEL, n_directions=8, seed=0)
    fast_error = np.abs(deltas - truth_deltas).max() / np.abs(truth_deltas).max()
    reference_error = np.abs(reference["delta_losses"] - truth_deltas).max() / np.abs(truth_deltas).max()
    assert fast_error < 1e-3 and fast_error < reference_error / 10


def test_fast_flatness_of_an_epoch_does_not_depend_on_the_caller(models):
    epochs = [named_parameters(models[name]) for name in ("random", "partial", "minimum")]
    kwargs = {"n_directions": 10, "epsilon": 0.1, "seed": 7}
    one_by_one = [flatness_for_params(params, MODEL, **kwargs) for params in epochs]
    flatness_for_params(epochs[0], MODEL, n_directions=3, epsilon=0.1, seed=8)  # other directions in between
    backwards = [flatness_for_params(params, MODEL, **kwargs) for params in reversed(epochs)][::-1]
    as_float64 = [flatness_for_params({k: v.astype(np.float64) for k, v in params.items()}, MODEL, **kwargs)
                  for params in epochs]
    for got in (backwards, as_float64):
        for (base, deltas), (want_base, want_deltas) in zip(got, one_by_one, strict=True):
            assert base == want_base
            np.testing.assert_array_equal(deltas, want_deltas)
    assert len({deltas.tobytes() for _, deltas in one_by_one}) == 3


@pytest.mark.parametrize("change", [{"act_fn": "silu"}, {"normalization_type": "LN"}, {"n_layers": 2}])
def test_models_the_fast_path_does_not_implement_go_through_the_generic_evaluator(change):
    """The fast loss refuses what it does not implement rather than compute another model's loss; since model
    families (format 2), flatness of such a model comes from the generic evaluator instead, per direction equal
    to the plain perturb-forward-restore reference on the same directions."""
    config = {**CONFIG, **change}
    model = fam.MODULAR_ADDITION.model(config)
    params = named_parameters(MODEL.build(seed=0), MODEL)
    flat = {n: torch.as_tensor(v[0] if MODEL.table[n].layered else v) for n, v in params.items()}  # 1-layer names
    with pytest.raises(GeostoreError, match="fast modular-addition loss"):
        fast.losses({n: flat[n][None] for n in fam.TRAINABLE},
                    {n: v for n, v in flat.items() if n not in fam.TRAINABLE}, config)
    module = model.build(seed=0)
    own = named_parameters(module, model)
    assert not fast.supports(model) and model.fast_loss({}) is None
    baseline, deltas = flatness_for_params(own, model, n_directions=4, epsilon=0.1, seed=0)
    reference = seed_reference(module, model, n_directions=4, seed=0)
    ulp = float(np.spacing(np.float32(baseline)))
    assert baseline == pytest.approx(reference["baseline_loss"], rel=1e-6)
    np.testing.assert_allclose(deltas, reference["delta_losses"], rtol=1e-4, atol=4 * ulp)


def test_flatness_summary_on_a_hand_computed_case():
    baseline = np.array([2.0, 0.0, np.nan, 1.0])
    deltas = np.array([[0.1, 0.3, -0.1, 0.5], [0.05, 0.2, 0.0, 0.09], [1.0, 2.0, 3.0, 4.0],
                       [0.2, np.nan, 0.1, 0.3]])
    got = flatness_summary(baseline, deltas)
    want = {
        "mean_delta_loss": [0.2, 0.085], "median_delta_loss": [0.2, 0.07], "max_delta_loss": [0.5, 0.2],
        "std_delta_loss": [math.sqrt(0.05), math.sqrt(np.mean(np.square([-0.035, 0.115, -0.085, 0.005])))],
        "p10_delta_loss": [-0.04, 0.015], "p90_delta_loss": [0.44, 0.167],
        # below 10% of the baseline (0.2) in row 0; below the threshold itself (0.1) where the baseline is 0
        "flatness_ratio": [0.5, 0.75],
    }
    assert set(got) == {*want, "baseline_loss"}
    np.testing.assert_array_equal(got["baseline_loss"], baseline)
    for key, values in want.items():
        assert got[key].shape == (4,) and got[key].dtype == np.float64
        np.testing.assert_allclose(got[key][:2], values, rtol=1e-12, err_msg=key)
        assert np.isnan(got[key][2:]).all(), key  # not computed: NaN, never a number
    np.testing.assert_array_equal(got["p90_delta_loss"][:2], np.percentile(deltas[:2], 90, axis=1))
    np.testing.assert_array_equal(flatness_summary(baseline[:2], deltas[:2], threshold=0.5)["flatness_ratio"],
                                  [1.0, 1.0])


def test_directions_drawn_block_by_block_are_the_cached_ones_bit_for_bit(monkeypatch):
    from geostore.analysis import flatness

    generator = torch.Generator().manual_seed(3)  # how directions were always drawn: whole rows, one numpy sum
    rows = [torch.randn(3001, generator=generator).numpy().astype(np.float64) for _ in range(5)]
    cached = draw_directions(3001, 5, 3)
    assert torch.equal(cached, torch.from_numpy(np.stack([row / math.sqrt(np.sum(row * row)) for row in rows])
                                                .astype(np.float32)))
    monkeypatch.setattr(flatness, "CACHED_DIRECTION_BYTES", 0)  # a model too large to cache its directions
    monkeypatch.setattr(flatness, "_SQUARES_CHUNK", 128)  # squares summed in many pieces
    blocks = list(flatness.direction_blocks(3001, 5, 3, 2))
    assert [start for start, _ in blocks] == [0, 2, 4]
    assert torch.equal(torch.cat([rows for _, rows in blocks]), cached)
    rows = np.random.default_rng(0).standard_normal(100_003).astype(np.float32)
    for size in (129, 1000, 4099, 100_003):
        assert flatness._sum_squares(rows[:size], 130) == np.sum(rows[:size].astype(np.float64) ** 2)
