"""The generic landscape evaluator against the plain perturb-forward-restore loop and double-backward Hessians,
on both MLP families (runs in the reference layout) and on a small TransformerLens language model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference_runs import checkpoint, run_info, write_mlp_run
from torch.func import functional_call

from geostore.analysis import evaluator
from geostore.analysis.curvature import hutchinson_trace, lanczos_top_eigenvalue, loss_hvp, rademacher
from geostore.analysis.flatness import directional_losses
from geostore.family.base import Model, ParameterTable
from geostore.family.hooked import initial_params
from geostore.family.mlp import LEARNED_EMB_MLP, TWO_LAYER_MLP
from geostore.family.transformer import HookedModel, model_of

FAMILIES = {"two_layer_mlp": TWO_LAYER_MLP, "learned_emb_mlp": LEARNED_EMB_MLP}
TL_CONFIG = dict(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=50, n_ctx=8, act_fn="gelu",
                 normalization_type="LN")


@dataclass
class LanguageModel:
    """A test-local `Model` of a TransformerLens language model of the installed version (the HookedTransformer
    families' table and build, so a TransformerBridge on TransformerLens 4), with `b_U` frozen (and non-zero, so
    a lost frozen parameter shows) and its own loss; the probe is a `(batch, seq)` token array and a sequence's
    loss its mean next-token cross-entropy. Records the modules it builds."""

    family: str = "test_language_model"
    needs_probe: bool = True
    built: list[torch.nn.Module] = field(default_factory=list)
    inner: HookedModel = field(init=False)

    def __post_init__(self) -> None:
        self.inner = model_of(self.family, TL_CONFIG, loss="next_token", trainable=lambda name: name != "b_U")

    @property
    def config(self) -> dict[str, Any]:
        return self.inner.config

    @property
    def table(self) -> ParameterTable:
        return self.inner.table

    def build(self, params=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
        module = self.inner.build(params, seed=0, dtype=dtype)
        self.built.append(module)
        return module

    def module_state(self, module: torch.nn.Module):
        return self.inner.module_state(module)

    def probe(self, stored=None):
        return (torch.as_tensor(stored),)

    def losses(self, forward, probe) -> torch.Tensor:
        (tokens,) = probe
        log_probs = forward(tokens).log_softmax(dim=-1)[:, :-1]
        return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0].mean(dim=1)


@dataclass
class Case:
    """A model, stored parameters and a probe to evaluate them on."""

    model: Model
    params: dict[str, np.ndarray]
    probe: tuple[torch.Tensor, ...]


def mlp_case(tmp: Path, family: str, **sizes: int) -> Case:
    path = write_mlp_run(tmp / family, family, epochs=(0, 8), **sizes)
    model = FAMILIES[family].from_run(run_info(path))
    params = model.table.stored({k: v.numpy() for k, v in checkpoint(path, 8).items()}, str(path))
    return Case(model, params, model.probe())


@pytest.fixture(scope="module")
def language_case() -> Case:
    model = LanguageModel()
    params = initial_params(model.table, model.config, seed=0)
    params["b_U"] = np.linspace(-1, 1, 50, dtype=np.float32)
    rng = np.random.default_rng(0)
    for name, value in params.items():  # away from the initialisation's exact zeros and ones
        params[name] = (value + 0.02 * rng.standard_normal(value.shape)).astype(np.float32)
    tokens = torch.randint(0, 50, (520, 5), generator=torch.Generator().manual_seed(1))  # > EXAMPLE_BLOCK rows
    return Case(model, params, model.probe(tokens.numpy()))


@pytest.fixture(scope="module", params=["two_layer_mlp", "learned_emb_mlp", "language_model"])
def case(request, tmp_path_factory) -> Case:
    if request.param == "language_model":
        return request.getfixturevalue("language_case")
    # p = 29: 841 grid pairs, two example blocks
    return mlp_case(tmp_path_factory.mktemp(request.param), request.param, p=29, d_hidden=24, d_embed=8)


def test_the_probe_spans_several_example_blocks(case):
    assert len(case.probe[0]) > evaluator.EXAMPLE_BLOCK


@pytest.mark.parametrize("vmap_work", [evaluator.VMAP_WORK, 0], ids=["vectorised", "one weight set at a time"])
def test_generic_equals_the_plain_loop_per_direction(case, vmap_work, monkeypatch):
    monkeypatch.setattr(evaluator, "VMAP_WORK", vmap_work)
    kwargs = dict(n_directions=9, scales=[0.3, -0.1], seed=4)  # 9: a partial direction block
    generic = {}
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        base, deltas = directional_losses(case.params, case.model, case.probe, dtype=dtype, **kwargs)
        plain_base, plain = evaluator.plain_directional_losses(case.params, case.model, case.probe, dtype=dtype,
                                                               **kwargs)
        assert deltas.shape == (2, 9) and deltas.dtype == np.float64
        assert abs(base - plain_base) <= tolerance * base
        assert np.abs(deltas - plain).max() <= tolerance * np.abs(plain).max(), dtype
        assert np.abs(plain).min() > 0
        generic[dtype] = deltas
    float32, float64 = generic[torch.float32], generic[torch.float64]
    assert np.abs(float32 - float64).max() <= 1e-3 * np.abs(float64).max()


def test_baseline_is_the_mean_loss_of_the_built_model(case):
    base, _ = directional_losses(case.params, case.model, case.probe, n_directions=1, scales=[0.1], seed=0)
    module = case.model.build(case.params)
    with torch.no_grad():
        want = case.model.losses(module, case.probe).double().mean()
        if isinstance(case.model, LanguageModel):
            assert float(module(case.probe[0], return_type="loss")) == pytest.approx(float(want), rel=1e-6)
    assert base == pytest.approx(float(want), rel=1e-6)


def test_a_scale_row_does_not_depend_on_the_other_scales(case):
    kwargs = dict(n_directions=9, seed=2)
    _, alone = directional_losses(case.params, case.model, case.probe, scales=[0.2], **kwargs)
    _, several = directional_losses(case.params, case.model, case.probe, scales=[-0.2, 0.2, 0.05],
                                              **kwargs)
    assert np.array_equal(several[1], alone[0])
    _, empty = directional_losses(case.params, case.model, case.probe, scales=[], **kwargs)
    assert empty.shape == (0, 9)


def test_the_weights_are_left_untouched(language_case):
    case = language_case
    before = {k: v.copy() for k, v in case.params.items()}
    for fn in (directional_losses, evaluator.plain_directional_losses):
        fn(case.params, case.model, case.probe, n_directions=3, scales=[0.5], seed=1)
        module = case.model.built[-1]
        assert all(np.array_equal(case.params[k], before[k]) for k in before)
        held = case.model.inner.stored(module)
        for name, value in before.items():
            assert np.array_equal(held[name], value), (fn.__name__, name)


def flat_loss(case: Case, vector: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The mean probe loss as a function of the flat trainable vector (float64), for autograd."""
    table, offset, weights = case.model.table, 0, {}
    for name in table.trainable:
        size = table[name].size
        weights[name] = vector[offset:offset + size].reshape(table[name].shape)
        offset += size
    to_module = case.model.module_state(module) if hasattr(case.model, "module_state") else dict
    forward = lambda *inputs: functional_call(module, to_module(table.state_dict(weights)), inputs,  # noqa: E731
                                              tie_weights=False)  # the bridge reaches each block under two paths
    return case.model.losses(forward, case.probe).mean()


def flat_vector(case: Case) -> torch.Tensor:
    return torch.cat([torch.as_tensor(case.params[n]).double().reshape(-1) for n in case.model.table.trainable])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hvp_is_the_double_backward_hessian_on_a_tiny_mlp(family, tmp_path):
    case = mlp_case(tmp_path, family, p=3, d_hidden=4, d_embed=2)
    module = case.model.build(case.params).to(torch.float64)
    hessian = torch.autograd.functional.hessian(lambda v: flat_loss(case, v, module), flat_vector(case))
    hvp, n = loss_hvp(case.params, case.model, case.probe, dtype=torch.float64)
    assert n == hessian.shape[0] == case.model.table.n_trainable()
    vectors = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hvp(vectors), vectors @ hessian, rtol=0, atol=1e-10 * hessian.abs().max())
    probes = rademacher(n, 6, seed=3)
    _, _, forms = hutchinson_trace(hvp, probes)
    assert np.allclose(forms, ((probes.double() @ hessian) * probes.double()).sum(1).numpy(), rtol=1e-10)
    top, _ = lanczos_top_eigenvalue(hvp, probes[0].double(), iterations=n)  # float64 start: float64 Krylov basis
    assert top == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-8)
    float32, _ = loss_hvp(case.params, case.model, case.probe)
    assert torch.allclose(float32(vectors.float()), vectors @ hessian, rtol=0, atol=1e-4 * hessian.abs().max())


def test_hvp_is_the_double_backward_product_on_the_language_model(language_case):
    case = language_case
    module = case.model.build(case.params).to(torch.float64)
    vector = flat_vector(case).requires_grad_(True)
    gradient = torch.autograd.grad(flat_loss(case, vector, module), vector, create_graph=True)[0]
    hvp, n = loss_hvp(case.params, case.model, case.probe, dtype=torch.float64)
    tangents = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = torch.stack([torch.autograd.grad(gradient @ t, vector, retain_graph=True)[0] for t in tangents])
    assert torch.allclose(hvp(tangents), want, rtol=0, atol=1e-10 * want.abs().max())
