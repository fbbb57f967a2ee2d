"""geostore.family.train_modular_addition: the checkpoint schedule grammar and a tiny end-to-end training run."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from geostore.errors import GeostoreError  # noqa: E402
from geostore.family import hooked, tl_compat  # noqa: E402
from geostore.family.modular_addition import MODULAR_ADDITION, model_config  # noqa: E402
from geostore.family.train_modular_addition import TrainSpec, checkpoint_epochs, grokking_summary, train  # noqa: E402

TINY = TrainSpec(p=7, d_model=16, n_heads=2, train_fraction=0.5, lr=1e-2, epochs=30, model_seed=1, data_seed=2,
                 schedule="0:10:1,10:30:5")


# -- checkpoint_epochs ---------------------------------------------------------------------------


@pytest.mark.parametrize("epochs", [0, 1, 2, 7, 30, 100, 999, 3000, 40_000, 123_457])
def test_auto_schedule_is_sorted_unique_and_bounded(epochs):
    points = checkpoint_epochs(epochs, "auto")
    assert points == sorted(set(points))
    assert points[0] == 0 and points[-1] == epochs
    assert all(0 <= e <= epochs for e in points)


@pytest.mark.parametrize("epochs", [3000, 10_000, 40_000, 123_457])
def test_auto_schedule_size_and_density(epochs):
    points = checkpoint_epochs(epochs)
    assert 100 <= len(points) <= 300
    early = [b - a for a, b in pairwise(points) if a < epochs // 10]
    late = [b - a for a, b in pairwise(points) if a >= epochs // 2]
    assert max(early) < min(late)  # denser early


def test_auto_schedule_short_run_is_every_epoch():
    assert checkpoint_epochs(30) == list(range(31))


def test_explicit_schedule():
    assert checkpoint_epochs(100, "0:10:5,10:50:20") == [0, 5, 10, 30, 100]
    # overlapping segments, whitespace, and segments past the end of the run are clipped
    assert checkpoint_epochs(12, " 0:6:2 , 4:100:4 ") == [0, 2, 4, 8, 12]
    # epoch 0 and the final epoch are always included
    assert checkpoint_epochs(50, "10:20:5") == [0, 10, 15, 50]


@pytest.mark.parametrize("bad", ["", "dense", "1:2", "0:10:0", "10:5:1", "-1:5:1", "0:10:1,", "a:b:c",
                                 "0:10:1:2", "0:10:1.5"])
def test_bad_schedule_raises(bad):
    with pytest.raises(ValueError):
        checkpoint_epochs(100, bad)
    with pytest.raises(GeostoreError):  # the CLI turns it into a one-line message
        checkpoint_epochs(100, bad)


def test_bad_epochs_raises():
    with pytest.raises(ValueError):
        checkpoint_epochs(-1)


def test_paper_spec():
    paper = TrainSpec.paper()
    assert (paper.p, paper.d_model, paper.train_fraction, paper.lr, paper.weight_decay, paper.epochs) == (
        113, 128, 0.3, 1e-3, 1.0, 40_000)
    assert paper.model_config()["d_mlp"] == 512


# -- train ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run = train(TINY, out, progress=False)
    return out, run


def test_run_json_matches_files(tiny_run):
    out, run = tiny_run
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk == run
    assert run["format"] == "geostore-run" and run["version"] == 1 and run["family"] == "modular_addition"
    assert set(run["model_config"]) == set(model_config(7, d_model=16, n_heads=2))  # the family's config fields
    assert run["model_config"]["d_vocab"] == 8 and run["model_config"]["d_mlp"] == 64
    assert run["task"]["p"] == 7 and run["task"]["data_seed"] == 2 and run["task"]["model_seed"] == 1
    indices = run["task"]["train_indices"]
    assert indices == sorted(set(indices)) and len(indices) == round(0.5 * 49)
    assert run["training"] == {"optimizer": "AdamW", "lr": 1e-2, "weight_decay": 1.0, "betas": [0.9, 0.98],
                               "epochs": 30, "schedule": "0:10:1,10:30:5"}
    epochs = [c["epoch"] for c in run["checkpoints"]]
    assert epochs == checkpoint_epochs(30, TINY.schedule)
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert files == sorted(c["file"] for c in run["checkpoints"])
    assert run["checkpoints"][0]["file"] == "checkpoint_000000.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "run.json"])  # no temp files left


def test_checkpoints_hold_parameters_only(tiny_run):
    out, run = tiny_run
    table = MODULAR_ADDITION.model(run["model_config"]).table
    expected = {key: p.key_shape for p in table.parameters for key in p.keys}
    assert table.trainable == ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U")
    for entry in run["checkpoints"]:
        tensors = load_file(out / entry["file"])
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
        assert all(v.dtype == torch.float32 for v in tensors.values())
        for parameter in table.parameters:
            if not parameter.trainable:
                for key in parameter.keys:
                    assert not tensors[key].any(), f"bias {key} is not zero at epoch {entry['epoch']}"


def test_checkpoints_reload_bit_equal(tiny_run):
    out, run = tiny_run
    last = run["checkpoints"][-1]
    path = out / last["file"]
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            assert torch.equal(f.get_tensor(key), tensors[key])
    family_model = MODULAR_ADDITION.model(run["model_config"])
    stored = family_model.table.stored({k: v.numpy() for k, v in tensors.items()}, str(path), ignore=hooked.is_buffer)
    model = family_model.build(stored)
    state = tl_compat.hooked_state(model)  # the installed version's model, in the layout checkpoints are written in
    for key, value in tensors.items():
        assert state[key].numpy().tobytes() == value.numpy().tobytes(), key
    assert family_model.table.state_dict(stored).keys() == tensors.keys()
    # the recorded metrics are those of the stored weights
    from geostore.family import modular_addition as ma

    tokens, labels = ma.probe(7)
    with torch.no_grad():
        logits = model(tokens)
    is_train = torch.zeros(49, dtype=torch.bool)
    is_train[run["task"]["train_indices"]] = True
    assert ma.loss(logits[is_train], labels[is_train], 7).item() == pytest.approx(last["train_loss"], rel=1e-5)
    assert ma.accuracy(logits[~is_train], labels[~is_train], 7) == pytest.approx(last["test_accuracy"])


def test_training_reduces_loss(tiny_run):
    _, run = tiny_run
    first, last = run["checkpoints"][0], run["checkpoints"][-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert last["train_accuracy"] > first["train_accuracy"]
    summary = grokking_summary(run)
    assert summary["final_epoch"] == 30
    assert summary["final_train_accuracy"] == last["train_accuracy"]


def test_same_seeds_give_identical_checkpoints(tiny_run, tmp_path):
    out, run = tiny_run
    spec = replace(TINY, epochs=12)  # a prefix of the tiny run
    again = train(spec, tmp_path / "again", progress=False)
    for entry in again["checkpoints"]:
        if entry["epoch"] == 12:
            continue  # the final epoch of the shorter run is not a checkpoint of the longer one
        assert (tmp_path / "again" / entry["file"]).read_bytes() == (out / entry["file"]).read_bytes()
        assert entry == next(c for c in run["checkpoints"] if c["epoch"] == entry["epoch"])


def test_different_model_seed_differs(tiny_run, tmp_path):
    out, _ = tiny_run
    spec = replace(TINY, epochs=1, model_seed=99)
    train(spec, tmp_path / "other", progress=False)
    a = load_file(out / "checkpoint_000000.safetensors")
    b = load_file(tmp_path / "other" / "checkpoint_000000.safetensors")
    assert not torch.equal(a["embed.W_E"], b["embed.W_E"])


def test_non_empty_out_dir_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    with pytest.raises(GeostoreError, match="not empty"):
        train(TINY, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["something.txt"]


def test_empty_out_dir_accepted_and_bad_schedule_writes_nothing(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    spec = replace(TINY, epochs=2)
    run = train(spec, out, progress=False)
    assert [c["epoch"] for c in run["checkpoints"]] == [0, 1, 2]
    with pytest.raises(ValueError):
        train(replace(TINY, schedule="nope"), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_grokking_summary():
    def ckpt(epoch, tr, te):
        return {"epoch": epoch, "train_accuracy": tr, "test_accuracy": te}

    run = {"checkpoints": [ckpt(20, 1.0, 0.97), ckpt(0, 0.01, 0.02), ckpt(10, 1.0, 0.5), ckpt(30, 1.0, 0.99)]}
    assert grokking_summary(run) == {"train_100": 10, "test_95": 20, "final_epoch": 30,
                                     "final_train_accuracy": 1.0, "final_test_accuracy": 0.99}
    never = grokking_summary({"checkpoints": [ckpt(0, 0.5, 0.1)]})
    assert never["train_100"] is None and never["test_95"] is None


@pytest.mark.parametrize("change", [{"train_fraction": 1.5}, {"d_model": 15}, {"lr": 0.0}, {"weight_decay": -1.0},
                                    {"betas": (0.9,)}, {"p": 1}, {"epochs": -3}])
def test_bad_spec_refused_before_writing(tmp_path, change):
    with pytest.raises(GeostoreError):
        train(replace(TINY, **change), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_interrupted_run_is_readable(tmp_path, monkeypatch):
    import geostore.family.train_modular_addition as train_module

    real_save = train_module.save_file

    def save_then_stop(tensors, filename):
        if filename.endswith("checkpoint_000005.safetensors"):
            raise KeyboardInterrupt
        real_save(tensors, filename)

    monkeypatch.setattr(train_module, "save_file", save_then_stop)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(TINY, out, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert [c["epoch"] for c in run["checkpoints"]] == [0, 1, 2, 3, 4]
    assert all((out / c["file"]).is_file() for c in run["checkpoints"])
