"""Checkpoint sources on real files: every format detected and read, bit-exact, safely and lazily."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from checkpoint_factories import (
    arena_trajectory,
    config_json,
    expected_metrics,
    metrics_of,
    model_with,
    original_forward,
    tiny_config,
    tl_state_dict,
    to_original_layout,
    trajectory,
    truncate,
    write_arena_bundle,
    write_geostore_run,
    write_malicious_pickle,
    write_miscope_variant,
    write_state_dict_dir,
)
from safetensors.torch import save_file

from geostore.errors import SourceError, UnsafeCheckpointError
from geostore.family import hooked, modular_addition
from geostore.sources import Checkpoint, RunSource, open_source

EPOCHS = (0, 10, 200)


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def traj(config):
    return trajectory(config, EPOCHS, seed=1)


def inferred(config: dict) -> dict:
    """A config as a source records it: the HookedTransformerConfig fields given, and `attn_only`, which the
    shapes tell."""
    return {**config, "attn_only": False}


def stored(source: RunSource, checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """A checkpoint's raw state dict (`load()`) as the store holds it: through the run's parameter table."""
    state = checkpoint.load()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    return source.model.table.stored(state, checkpoint.origin, ignore=hooked.is_buffer)


def assert_same_params(loaded, expected):
    assert set(loaded) == set(expected)
    for name in expected:
        assert loaded[name].dtype == np.float32, name
        assert loaded[name].shape == expected[name].shape, name
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)


def assert_reads(source: RunSource, traj):
    assert [c.epoch for c in source.checkpoints] == sorted(traj)
    assert all(isinstance(c, Checkpoint) for c in source.checkpoints)
    assert source.model.table.names == tuple(next(iter(traj.values())))
    for checkpoint in source.checkpoints:
        assert_same_params(stored(source, checkpoint), traj[checkpoint.epoch])


# --- a directory of state dicts --------------------------------------------------------------------


def test_state_dict_dir_of_safetensors_infers_the_config(tmp_path, config, traj):
    run = write_state_dict_dir(tmp_path / "run", traj, name="ckpt_{epoch}")
    source = open_source(run)
    assert source.kind == "state-dict-dir"
    assert source.path == run
    assert source.config == inferred(config)
    assert source.family.name == source.model.family == "modular_addition"
    assert source.task == {"family": "modular_addition", "p": 7}
    assert source.metrics == {}
    assert source.train_indices is None
    assert_reads(source, traj)
    # load() gives the state dict as TransformerLens wrote it, less its buffers (attention masks)
    raw, written = source.checkpoints[0].load(), tl_state_dict(traj[0], config, buffers=False)
    assert raw.keys() == written.keys()
    for key, value in written.items():
        np.testing.assert_array_equal(raw[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("suffix", ["pt", "pth"])
@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict", "model"])
def test_state_dict_dir_of_pickles_plain_or_wrapped(tmp_path, config, traj, suffix, wrap):
    run = write_state_dict_dir(tmp_path / "run", traj, fmt=suffix, wrap=wrap)
    source = open_source(str(run))
    assert source.kind == "state-dict-dir"
    assert source.config == inferred(config)
    assert_reads(source, traj)


def test_pickled_state_dict_of_numpy_arrays(tmp_path, config, traj):
    run = tmp_path / "run"
    run.mkdir()
    for epoch, params in traj.items():
        torch.save({k: v.numpy() for k, v in tl_state_dict(params, config).items()}, run / f"step{epoch}.pt")
    source = open_source(run)
    assert source.config == inferred(config)
    assert_reads(source, traj)


def test_state_dict_dir_reads_lazily(tmp_path, traj):
    run = write_state_dict_dir(tmp_path / "run", traj, fmt="pt")
    source = open_source(run)
    (run / "checkpoint_200.pt").unlink()
    assert_same_params(stored(source, source.checkpoints[0]), traj[0])
    with pytest.raises(SourceError, match=r"checkpoint_200\.pt: no such file"):
        source.checkpoints[2].load()


def test_config_json_gives_what_shapes_cannot(tmp_path, config, traj):
    gelu = {**config, "act_fn": "gelu"}
    run = write_state_dict_dir(
        tmp_path / "run", traj, config_file=config_json(gelu, seed=4, training_fraction=0.3)
    )
    source = open_source(run)
    assert source.config == inferred(gelu)
    assert source.task == {"family": "modular_addition", "p": 7, "seed": 4, "train_fraction": 0.3}
    assert_reads(source, traj)


def test_partial_config_json_is_completed_from_the_shapes(tmp_path, config, traj):
    run = write_state_dict_dir(tmp_path / "run", traj, fmt="pt", config_file={"p": 7, "act_fn": "relu"})
    assert open_source(run).config == inferred(config)


def test_config_json_that_contradicts_the_weights(tmp_path, traj):
    # The run's model is checked against its first checkpoint when the source is opened.
    wrong = tiny_config(d_model=32)
    run = write_state_dict_dir(tmp_path / "run", traj, config_file=config_json(wrong))
    with pytest.raises(SourceError, match=r"config\.json: embed\.W_E has shape \(8, 16\), "
                                          r"the configured model's is \(8, 32\)"):
        open_source(run)


def test_config_json_with_another_depth_than_the_weights(tmp_path, config, traj):
    # Any depth is supported now (format 2); a config.json that names one the weights do not have is refused.
    run = write_state_dict_dir(tmp_path / "run", traj, config_file=config_json({**config, "n_layers": 2}))
    with pytest.raises(SourceError, match=r"config\.json: missing parameter blocks\.1\.\S+ of the configured model"):
        open_source(run)


def test_epoch_is_the_last_integer_of_the_file_name(tmp_path, config, traj):
    run = tmp_path / "run"
    run.mkdir()
    names = {0: "model_v2_epoch0", 10: "run3-step-000010", 200: "200"}
    for epoch, name in names.items():
        save_file(tl_state_dict(traj[epoch], config), str(run / f"{name}.safetensors"))
    (run / "notes.txt").write_text("not a checkpoint")
    (run / "sub").mkdir()
    torch.save(tl_state_dict(traj[0], config), run / "sub" / "checkpoint_5.pt")  # not recursive
    source = open_source(run)
    assert [(c.epoch, c.origin) for c in source.checkpoints] == [
        (e, str(run / f"{names[e]}.safetensors")) for e in sorted(names)
    ]
    assert_reads(source, traj)


def test_file_name_without_an_epoch(tmp_path, traj):
    run = write_state_dict_dir(tmp_path / "run", traj)
    (run / "checkpoint_10.safetensors").rename(run / "final.safetensors")
    with pytest.raises(SourceError, match=r"final\.safetensors: no epoch in the file name"):
        open_source(run)


def test_two_files_for_one_epoch(tmp_path, config, traj):
    run = write_state_dict_dir(tmp_path / "run", traj)
    torch.save(tl_state_dict(traj[10], config), run / "backup_10.pt")
    with pytest.raises(SourceError, match=r"epoch 10: backup_10\.pt and checkpoint_10\.safetensors"):
        open_source(run)


def test_checkpoints_of_another_shape(tmp_path, traj):
    run = write_state_dict_dir(tmp_path / "run", traj)
    other = trajectory(tiny_config(p=11), [300])
    write_state_dict_dir(run, other)
    source = open_source(run)
    assert source.config["d_vocab"] == 8  # from the first checkpoint
    stored(source, source.checkpoints[0])
    with pytest.raises(SourceError, match=r"checkpoint_300\.safetensors: embed\.W_E has shape \(12, 16\), "
                                          r"expected \(8, 16\)"):
        stored(source, source.checkpoints[-1])


@pytest.mark.parametrize(
    ("extra_key", "inferred_message", "configured_message"),
    [
        # A lone norm weight: the shapes say RMS norm, whose other weights are missing; config.json says none.
        ("blocks.0.ln1.w", r"missing parameter blocks\.0\.ln2\.w of the configured model",
         r"parameters blocks\.0\.ln1\.w are not in the configured model"),
        ("ln_final.w", r"missing parameter blocks\.0\.ln1\.w of the configured model",
         r"parameters ln_final\.w are not in the configured model"),
        # A second block holding only a wrongly shaped W_Q.
        ("blocks.1.attn.W_Q", r"W_Q is missing in blocks .* or changes shape across blocks",
         r"W_Q is missing in blocks .* or changes shape across blocks"),
    ],
)
def test_state_dicts_that_contradict_themselves(tmp_path, config, traj, extra_key, inferred_message,
                                                configured_message):
    # Format 2 stores any depth and normalisation (tests/test_families.py); what is refused now is a state dict
    # that is no consistent HookedTransformer, when the source is opened, in one line naming the file.
    run = tmp_path / "run"
    run.mkdir()
    state = tl_state_dict(traj[0], config)
    state[extra_key] = torch.ones(16)
    torch.save(state, run / "checkpoint_0.pt")
    with pytest.raises(SourceError, match=r"checkpoint_0\.pt: " + inferred_message):
        open_source(run)  # the config is inferred from this very file
    (run / "config.json").write_text(json.dumps(config_json(config)))
    with pytest.raises(SourceError, match=r"(config\.json|checkpoint_0\.pt): " + configured_message) as info:
        open_source(run)
    assert "\n" not in str(info.value)


def test_missing_parameter(tmp_path, config, traj):
    run = tmp_path / "run"
    run.mkdir()
    state = tl_state_dict(traj[0], config)
    del state["unembed.b_U"]
    save_file(state, str(run / "checkpoint_0.safetensors"))
    with pytest.raises(SourceError, match=r"checkpoint_0\.safetensors: missing parameter unembed\.b_U"):
        open_source(run)  # the first checkpoint is checked against the run's model when it is opened
    save_file(tl_state_dict(traj[0], config), str(run / "checkpoint_0.safetensors"))
    save_file(state, str(run / "checkpoint_10.safetensors"))
    source = open_source(run)
    with pytest.raises(SourceError, match=r"checkpoint_10\.safetensors: missing parameter unembed\.b_U"):
        stored(source, source.checkpoints[1])


def test_not_a_state_dict(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save([1, 2, 3], run / "checkpoint_0.pt")
    with pytest.raises(SourceError, match=r"checkpoint_0\.pt: not a state dict \(holds a list\)"):
        open_source(run)
    torch.save({"optimizer": {"lr": 1.0}}, run / "checkpoint_0.pt")
    with pytest.raises(SourceError, match=r"checkpoint_0\.pt: not a state dict: no tensors"):
        open_source(run)


# --- geostore's own run directory --------------------------------------------------------------------


def test_geostore_run(tmp_path, config, traj):
    run = write_geostore_run(tmp_path / "run", traj, train_fraction=0.4, data_seed=2, model_seed=9)
    (run / "config.json").write_text("{}")  # run.json wins
    source = open_source(run)
    assert source.kind == "geostore-run"
    assert source.config == inferred(config)
    assert source.task["family"] == "modular_addition"
    assert source.task["p"] == 7
    assert source.task["train_fraction"] == 0.4
    assert source.task["data_seed"] == 2
    assert source.task["model_seed"] == 9
    assert source.task["training"]["weight_decay"] == 1.0
    assert "train_indices" not in source.task
    json.dumps(source.task)
    assert source.train_indices.dtype == np.int64
    np.testing.assert_array_equal(source.train_indices, modular_addition.split(7, 0.4, 2))
    mask, dims = source.split()
    assert dims == ("a", "b") and mask.shape == (7, 7)
    np.testing.assert_array_equal(np.flatnonzero(mask), source.train_indices)
    assert source.metrics == expected_metrics(EPOCHS)
    assert_reads(source, traj)


def test_geostore_run_checkpoint_order_and_duplicates(tmp_path, traj):
    run = write_geostore_run(tmp_path / "run", traj)
    meta = json.loads((run / "run.json").read_text())
    meta["checkpoints"].reverse()
    (run / "run.json").write_text(json.dumps(meta))
    assert [c.epoch for c in open_source(run).checkpoints] == list(EPOCHS)
    meta["checkpoints"][0]["epoch"] = 10
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match=r"run\.json: two checkpoints for epoch 10"):
        open_source(run)


def test_geostore_run_from_a_newer_geostore(tmp_path, traj):
    run = write_geostore_run(tmp_path / "run", traj)
    meta = json.loads((run / "run.json").read_text())
    meta["version"] = 2
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match=r"run\.json: run format version 2 is newer"):
        open_source(run)


# --- training-dynamics-workbench (miscope) -----------------------------------------------------------


def test_miscope_variant(tmp_path, config, traj):
    run = write_miscope_variant(tmp_path / "modulo_addition_1layer_p7_seed3_dseed5", traj)
    source = open_source(run)
    assert source.kind == "miscope"
    assert source.config == inferred(config)
    assert source.task == {
        "family": "modular_addition", "p": 7, "seed": 3, "model_seed": 3, "data_seed": 5,
        "train_fraction": 0.3, "num_epochs": 201,
    }
    assert source.metrics == expected_metrics(EPOCHS, ("train_loss", "test_loss"))
    np.testing.assert_array_equal(source.train_indices, modular_addition.split(7, 0.3, 5))
    assert source.train_indices.dtype == np.int64
    assert [c.origin for c in source.checkpoints] == [
        str(run / "checkpoints" / f"checkpoint_epoch_{e:05d}.safetensors") for e in EPOCHS
    ]
    assert_reads(source, traj)


def test_miscope_variant_without_metadata(tmp_path, config, traj):
    run = write_miscope_variant(tmp_path / "variant", traj, with_extras=False)
    (run / "metadata.json").unlink()
    source = open_source(run)
    assert source.metrics == {}
    assert source.train_indices is None and source.split() is None
    assert source.config == inferred(config)


# --- the ARENA / Nanda bundle ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arena_traj():
    return arena_trajectory(7, (0, 100, 200, 300), seed=2)


def test_arena_bundle_reads_back_the_hooked_transformer_weights(tmp_path, arena_traj):
    file = write_arena_bundle(tmp_path / "full_run_data.pth", arena_traj)
    source = open_source(file)
    assert source.kind == "arena-bundle"
    assert source.config == inferred(tiny_config(7, d_vocab_out=8))
    assert source.task == {"family": "modular_addition", "p": 7}
    assert [c.origin for c in source.checkpoints] == [f"{file}#state_dicts[{i}]" for i in range(4)]
    assert_reads(source, arena_traj)
    # train losses are recorded every epoch, test losses once per checkpoint
    assert source.metrics == expected_metrics(sorted(arena_traj), ("train_loss", "test_loss"))


def test_arena_bundle_gives_the_original_models_logits(tmp_path, arena_traj):
    file = write_arena_bundle(tmp_path / "run" / "full_run_data.pth", arena_traj)
    source = open_source(file.parent)  # a directory holding the bundle
    assert source.kind == "arena-bundle"
    tokens, _ = modular_addition.probe(7)
    original_state = to_original_layout(arena_traj[300])
    with torch.no_grad():
        expected = model_with(arena_traj[300], tiny_config(7, d_vocab_out=8))(tokens)
        rebuilt = model_with(stored(source, source.checkpoints[-1]), source.config)(tokens)
        paper = original_forward(original_state, tokens)
    assert rebuilt.shape == (49, 3, 8)
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=0)
    # and the conversion means what the paper's own forward pass computes
    torch.testing.assert_close(rebuilt, paper, rtol=1e-5, atol=1e-5)


def test_arena_bundle_with_numpy_losses(tmp_path, arena_traj):
    file = write_arena_bundle(tmp_path / "full_run_data.pth", arena_traj, numpy_losses=True)
    source = open_source(file)
    assert source.metrics["test_loss"] == {e: metrics_of(e)["test_loss"] for e in arena_traj}


def test_arena_bundle_with_losses_of_no_known_spacing(tmp_path, arena_traj):
    file = write_arena_bundle(tmp_path / "full_run_data.pth", arena_traj)
    bundle = torch.load(file, weights_only=True)
    bundle["train_losses"] = bundle["train_losses"][:50]
    torch.save(bundle, file)
    assert set(open_source(file).metrics) == {"test_loss"}


def test_arena_bundle_in_the_wrong_layout(tmp_path, arena_traj):
    file = write_arena_bundle(tmp_path / "full_run_data.pth", arena_traj)
    bundle = torch.load(file, weights_only=True)
    bundle["state_dicts"][1]["blocks.0.mlp.W_in"] = bundle["state_dicts"][1]["blocks.0.mlp.W_in"].T.clone()
    torch.save(bundle, file)
    source = open_source(file)
    with pytest.raises(SourceError, match=r"full_run_data\.pth#state_dicts\[1\]: blocks\.0\.mlp\.W_in has shape "
                                          r"\(64, 16\), expected \(16, 64\)"):
        stored(source, source.checkpoints[1])


def test_a_pth_file_that_is_not_a_bundle(tmp_path, config, traj):
    file = tmp_path / "model_0.pth"
    torch.save(tl_state_dict(traj[0], config), file)
    with pytest.raises(SourceError, match=r"model_0\.pth: not an ARENA run bundle"):
        open_source(file)


# --- hostile and broken files ------------------------------------------------------------------------


def test_malicious_pickle_is_refused_without_running(tmp_path, config, traj):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save(tl_state_dict(traj[0], config), run / "checkpoint_0.pt")
    file = write_malicious_pickle(run / "checkpoint_5.pt", marker)
    (run / "config.json").write_text(json.dumps(config_json(config)))
    source = open_source(run)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_5\.pt: refused: the file would run code") as info:
        source.checkpoints[1].load()
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("(global exec)")
    assert not marker.exists()
    # the first file is read to recognise the model family (with or without config.json): refused all the same
    (run / "checkpoint_0.pt").unlink()
    for config_file in (True, False):
        if not config_file:
            (run / "config.json").unlink()
        with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_5\.pt: refused"):
            open_source(run)
        assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(file, weights_only=False)
    assert marker.exists()


def test_malicious_bundle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    file = write_malicious_pickle(tmp_path / "full_run_data.pth", marker, bundle=True)
    with pytest.raises(UnsafeCheckpointError, match=r"full_run_data\.pth: refused"):
        open_source(tmp_path)
    assert not marker.exists()
    assert file.exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_checkpoint_fails_at_load(tmp_path, config, traj, fmt, keep):
    run = write_state_dict_dir(tmp_path / "run", traj, fmt=fmt, config_file=config_json(config))
    truncate(run / f"checkpoint_10.{fmt}", keep)
    source = open_source(run)
    assert_same_params(stored(source, source.checkpoints[0]), traj[0])
    with pytest.raises(SourceError, match=rf"checkpoint_10\.{fmt}: cannot read checkpoint: ") as info:
        source.checkpoints[1].load()
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "\n" not in str(info.value)


def test_truncated_first_checkpoint_without_config(tmp_path, traj):
    run = write_state_dict_dir(tmp_path / "run", traj)
    truncate(run / "checkpoint_0.safetensors")
    with pytest.raises(SourceError, match=r"checkpoint_0\.safetensors: cannot read checkpoint"):
        open_source(run)


def test_garbage_pt_file(tmp_path, config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_0.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(SourceError, match=r"checkpoint_0\.pt: cannot read checkpoint") as info:
        open_source(run)
    assert not isinstance(info.value, UnsafeCheckpointError)


# --- paths without a run -----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match=r"nowhere: no such file or directory"):
        open_source(tmp_path / "nowhere")


def test_empty_directory(tmp_path):
    with pytest.raises(SourceError, match=r"no checkpoints found \(looked for .*\*\.safetensors"):
        open_source(tmp_path)


def test_directory_without_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_json(tiny_config())))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SourceError, match=rf"{tmp_path}: no checkpoints found"):
        open_source(tmp_path)


def test_detection_order(tmp_path, traj):
    run = write_geostore_run(tmp_path / "run", traj)
    write_miscope_variant(run, traj, with_extras=False)
    assert open_source(run).kind == "geostore-run"
    (run / "run.json").unlink()
    assert open_source(run).kind == "miscope"
    shutil.rmtree(run / "checkpoints")
    assert open_source(run).kind == "state-dict-dir"
