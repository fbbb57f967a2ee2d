"""The reference project's MLP families on runs written the way its own scripts write them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_runs import (
    checkpoint,
    grid,
    one_hot_grid,
    reference_loss,
    reference_model,
    run_info,
    write_mlp_run,
)

from geostore.errors import SourceError
from geostore.family.base import Family, Model
from geostore.family.mlp import LEARNED_EMB_MLP, TWO_LAYER_MLP

FAMILIES = {"two_layer_mlp": TWO_LAYER_MLP, "learned_emb_mlp": LEARNED_EMB_MLP}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run(request, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param) / f"modulo_addition_{request.param}_p11_seed0_dseed1"
    return request.param, write_mlp_run(path, request.param, model_seed=request.param == "two_layer_mlp")


def rewrite(run_path: Path, tmp_path: Path, *, config: dict | None = None, state: dict | None = None) -> Path:
    """A copy of a run with another config.json and/or first checkpoint."""
    from safetensors.torch import save_file

    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    save_file(state or checkpoint(run_path, 0), str(copy / "checkpoints" / "checkpoint_epoch_00000.safetensors"))
    (copy / "config.json").write_text(json.dumps(config or json.loads((run_path / "config.json").read_text())))
    return copy


def test_families_satisfy_the_protocols(run):
    name, path = run
    family = FAMILIES[name]
    model = family.from_run(run_info(path))
    assert isinstance(family, Family) and isinstance(model, Model)
    assert family.name == f"modulo_addition_{'2layer_mlp' if name == 'two_layer_mlp' else name}"
    assert model.family == family.name and model.needs_probe is False


def test_recognise_by_config_and_by_key_set(run):
    name, path = run
    for other_name, family in FAMILIES.items():
        assert family.recognise(run_info(path)) == (other_name == name)
        assert family.recognise(run_info(path, config=None)) == (other_name == name)
        assert not family.recognise(run_info(path, config={"n_layers": 1, "d_model": 8}))


def test_from_run_reads_the_config_and_the_shapes_agree(run):
    name, path = run
    family = FAMILIES[name]
    model = family.from_run(run_info(path))
    expected = {"p": 11, "d_hidden": 32, "act_fn": "relu", **({"d_embed": 16} if family.embedded else {})}
    assert model.config == expected
    assert family.from_run(run_info(path, config=None)).config == expected
    assert family.model(json.loads(json.dumps(model.config))).table == model.table
    table = model.table
    if family.embedded:
        assert table.names == ("embed_a.weight", "embed_b.weight", "W_in.weight", "W_out.weight")
        assert table.groups["embedding"] == ("embed_a.weight", "embed_b.weight")
        assert table.dim_sizes() == {"d_vocab": 11, "d_embed": 16, "d_hidden": 32, "d_vocab_out": 11}
    else:
        assert table.names == ("W_in.weight", "W_out.weight")
        assert "embedding" not in table.groups
        assert table.dim_sizes() == {"d_hidden": 32, "d_input": 22, "d_vocab_out": 11}
    assert table.groups["mlp"] == ("W_in.weight", "W_out.weight")
    assert table.trainable == table.names
    assert table.n_trainable() == sum(v.numel() for v in checkpoint(path, 0).values())


def test_task_and_split_from_the_run(run):
    name, path = run
    family = FAMILIES[name]
    config = json.loads((path / "config.json").read_text())
    task = family.task(run_info(path))
    assert task == {"family": family.name, "p": 11, "seed": 0, "data_seed": 1, "train_fraction": 0.75,
                    **({"model_seed": 0} if "model_seed" in config else {})}
    assert json.loads(json.dumps(task)) == task
    metadata = json.loads((path / "metadata.json").read_text())
    mask, dims = family.split(family.from_run(run_info(path)), np.asarray(metadata["train_indices"]))
    assert dims == ("a", "b") and mask.shape == (11, 11) and mask.dtype == bool
    a, b = np.nonzero(mask)
    assert sorted(a * 11 + b) == sorted(metadata["train_indices"])
    assert not np.isin(a * 11 + b, metadata["test_indices"]).any()


def test_stored_round_trips_and_build_is_the_checkpoint(run):
    name, path = run
    model = FAMILIES[name].from_run(run_info(path))
    for epoch in (0, 5, 10):
        state = checkpoint(path, epoch)
        stored = model.table.stored({k: v.numpy() for k, v in state.items()}, str(path))
        back = model.table.state_dict(stored)
        assert back.keys() == state.keys()
        assert all(np.array_equal(back[k], state[k].numpy()) for k in state)
        built = model.build(stored).state_dict()
        assert built.keys() == state.keys()  # safetensors sorts keys: the module's order is the reference's
        assert list(built) == list(reference_model(name, 11, 32, 16, seed=None).state_dict())
        assert all(built[k].dtype == state[k].dtype and torch.equal(built[k], state[k]) for k in state)
    assert not model.build(stored).training
    fresh = model.build(None).state_dict()
    assert {k: tuple(v.shape) for k, v in fresh.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_losses_are_the_reference_forward_on_the_full_grid(run):
    name, path = run
    model = FAMILIES[name].from_run(run_info(path))
    p = model.config["p"]
    metadata = json.loads((path / "metadata.json").read_text())
    a, b, labels = model.probe()
    assert all(torch.equal(mine, ref) for mine, ref in zip((a, b, labels), grid(p), strict=True))
    weights_moved = False
    for epoch in (0, 5, 10):
        state = checkpoint(path, epoch)
        reference = reference_model(name, p, 32, 16, seed=None).eval()
        reference.load_state_dict(state)
        module = model.build(model.table.stored({k: v.numpy() for k, v in state.items()}, str(path)))
        with torch.no_grad():
            want = reference(one_hot_grid(p)) if name == "two_layer_mlp" else reference(a, b)
            losses = model.losses(module, model.probe())
        assert torch.equal(module(a, b), want)  # the one-hot matmul adds exactly the two selected columns
        assert losses.shape == (p * p,) and losses.dtype == torch.float32
        assert float(losses.mean()) == pytest.approx(float(F.cross_entropy(want, labels)), rel=1e-6)
        test = torch.as_tensor(metadata["test_indices"])
        assert float(losses[test].double().mean()) == pytest.approx(  # the loss the run recorded after step e
            metadata["test_losses"][epoch], rel=1e-5)
        assert float(reference_loss(want, labels)) == pytest.approx(float(losses.double().mean()), rel=1e-6)
        weights_moved |= not torch.equal(state["W_in.weight"], checkpoint(path, 0)["W_in.weight"])
    assert weights_moved


def test_float64_losses_stay_float64(run):
    name, path = run
    model = FAMILIES[name].from_run(run_info(path))
    module = model.build(model.table.stored({k: v.numpy() for k, v in checkpoint(path, 5).items()}, "x")).double()
    assert model.losses(module, model.probe()).dtype == torch.float64


def bad_runs(path: Path, family: str) -> list[tuple[dict | None, dict | None, str]]:
    """`(config, state, message part)` of malformed variants of a run."""
    config = json.loads((path / "config.json").read_text())
    state = checkpoint(path, 0)
    other = "learned_emb_mlp" if family == "two_layer_mlp" else "two_layer_mlp"
    extra = {**state, "W_in.bias": torch.zeros(32)}
    missing = {k: v for k, v in state.items() if k != "W_out.weight"}
    return [
        ({**config, "d_hidden": 16}, None, "W_in.weight has shape (32,"),
        ({**config, "prime": 13, "vocab_size": 13}, None, "has shape"),
        ({**config, "prime": 13}, None, "differs from vocab_size"),
        ({**config, "architecture": other}, None, f"architecture '{other}' is not '{family}'"),
        ({**config, "act_fn": "gelu"}, None, "act_fn 'gelu' is not supported"),
        ({**config, "d_hidden": "32"}, None, "d_hidden must be a positive integer"),
        ({k: v for k, v in config.items() if k != "d_hidden"}, None, "d_hidden must be a positive integer"),
        (None, extra, "W_in.bias unexpected"),
        (None, missing, "W_out.weight missing"),
        (None, {**state, "W_out.weight": torch.zeros(11, 31)}, "has shape (11, 31), expected (11, 32)"),
    ]


def test_malformed_runs_are_one_line_source_errors(run, tmp_path):
    name, path = run
    family = FAMILIES[name]
    for i, (config, state, message) in enumerate(bad_runs(path, name)):
        copy = rewrite(path, tmp_path / str(i), config=config, state=state)
        with pytest.raises(SourceError) as info:
            family.from_run(run_info(copy))
        text = str(info.value)
        assert message in text and str(copy) in text and "\n" not in text, (message, text)
    copy = rewrite(path, tmp_path / "shapes", state={"W_out.weight": torch.zeros(11)})
    with pytest.raises(SourceError, match="are not matrices"):
        family.from_run(run_info(copy, config=None))


def test_split_refuses_indices_off_the_grid(run):
    name, path = run
    family = FAMILIES[name]
    with pytest.raises(SourceError, match=r"must lie in \[0, 121\) for p=11"):
        family.split(family.from_run(run_info(path)), np.array([0, 121]))
