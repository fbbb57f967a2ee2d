"""The `transformers` family on tiny GPT-NeoX and GPT-2 runs trained and saved here as `Trainer` saves them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hf_runs import gpt2_config, neox_config, tokens, train_run
from sklearn.decomposition import PCA
from transformers import AutoModelForCausalLM, LlamaConfig

import geostore
from geostore import cli
from geostore.family.registry import get
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings
from geostore.sources.hf_checkpoints import step_metrics

STEPS = (2, 4, 6)


def from_folder(folder) -> torch.nn.Module:
    """The checkpoint as transformers itself loads it (the reference)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A GPT-NeoX run and its store, ingested with a probe and 4 flatness directions."""
    root = tmp_path_factory.mktemp("neox")
    run = train_run(root / "run", neox_config(), STEPS)
    probe = tokens(3, 7).numpy()
    ingest(run, root / "store.zarr", probe=probe,
           flatness=FlatnessSettings(n_directions=4, epsilon=0.1, seed=0), progress=False)
    return run, root / "store.zarr", probe


@pytest.fixture(scope="module")
def gpt2_sharded(tmp_path_factory):
    """A GPT-2 run (tied embeddings) saved in 6 safetensors shards per checkpoint."""
    return train_run(tmp_path_factory.mktemp("gpt2") / "run", gpt2_config(), STEPS, max_shard_size="8KB")


def test_neox_weights_metrics_and_loss_equal_the_checkpoints(neox):
    run, path, probe = neox
    with geostore.open_store(path) as store:
        assert store.family == "transformers" and store.index_unit == "step"
        assert store.epochs.tolist() == list(STEPS)
        for step in STEPS:
            reference = from_folder(run / f"checkpoint-{step}")
            rebuilt = store.model_at(step).state_dict()
            assert rebuilt.keys() == reference.state_dict().keys()
            for key, value in reference.state_dict().items():
                assert torch.equal(rebuilt[key], value), key
            with torch.no_grad():
                loss = reference(input_ids=torch.as_tensor(probe), labels=torch.as_tensor(probe)).loss
            assert store.baseline_loss[store.index_of(step)].compute() == pytest.approx(float(loss), rel=1e-5)
        log = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
        at = {(e["step"], k): v for e in log for k, v in e.items()}
        metrics = store.metrics()
        assert metrics["train_loss"].tolist() == [at[(s, "loss")] for s in STEPS]
        assert metrics["test_loss"].tolist() == [at[(s, "eval_loss")] for s in STEPS]
        assert metrics["learning_rate"].tolist() == [at[(s, "learning_rate")] for s in STEPS]
        assert metrics["train_epoch"].tolist() == [s / 4 for s in STEPS]
        assert "steps       3 stored, 2..6" in store.describe()


def test_pca_of_all_equals_sklearn_on_every_trainable_parameter(neox):
    run, path, _ = neox
    rows = [torch.cat([p.detach().reshape(-1) for p in from_folder(run / f"checkpoint-{s}").parameters()]).numpy()
            for s in STEPS]
    x = np.stack(rows).astype(np.float64)
    expected = PCA(2).fit_transform(x)
    with geostore.open_store(path) as store:
        assert store.n_trainable == x.shape[1]
        got = store.pca("all", 2)["projections"]
    np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-6, atol=1e-9)


def test_groups_by_parameter_name():
    neox_table = get("transformers").model(neox_config().to_dict()).table
    assert set(neox_table.groups) == {"all", "embedding", "attention", "mlp", "norm", "layer0", "layer1"}
    assert neox_table.groups["embedding"] == ("gpt_neox.embed_in.weight", "lm_head.weight")
    llama = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    table = get("transformers").model(llama.to_dict()).table
    assert table.groups["mlp"] == tuple(f"model.layers.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
    assert "model.norm.weight" in table.groups["norm"] and "lm_head.weight" in table.groups["embedding"]
    assert table.partition().keys() == {"embedding", "attention", "mlp", "norm"}  # every parameter has a group


def test_tied_sharded_gpt2_is_stored_once_and_tied_again(gpt2_sharded, tmp_path):
    assert (gpt2_sharded / "checkpoint-2" / "model.safetensors.index.json").is_file()
    assert cli.main(["ingest", str(gpt2_sharded), str(tmp_path / "s.zarr"), "--no-flatness", "--quiet"]) == 0
    with geostore.open_store(tmp_path / "s.zarr") as store:
        assert not any(key == "lm_head.weight" for p in store.table.parameters for key in p.keys)
        model = store.model_at(4)
        assert model.lm_head.weight is model.transformer.wte.weight
        reference = from_folder(gpt2_sharded / "checkpoint-4").state_dict()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_pytorch_model_bin_goes_through_the_weights_only_loader(tmp_path, capsys):
    run = train_run(tmp_path / "run", gpt2_config(), (2, 4), pickled=True)
    ingest(run, tmp_path / "s.zarr", flatness=None, progress=False)
    with geostore.open_store(tmp_path / "s.zarr") as store:
        saved = torch.load(run / "checkpoint-4" / "pytorch_model.bin", weights_only=True)
        assert all(torch.equal(store.model_at(4).state_dict()[k], v) for k, v in saved.items())
    torch.save({"weights": print}, run / "checkpoint-4" / "pytorch_model.bin")  # would run code if unpickled
    rc = cli.main(["ingest", str(run), str(tmp_path / "t.zarr"), "--no-flatness", "--quiet"])
    assert rc != 0 and not (tmp_path / "t.zarr" / "zarr.json").exists()
    assert "refused: the file would run code" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bad_shard_is_one_line_and_leaves_the_store(gpt2_sharded, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(gpt2_sharded / "checkpoint-2", run / "checkpoint-2")
    store = tmp_path / "s.zarr"
    assert cli.main(["ingest", str(run), str(store), "--no-flatness", "--quiet"]) == 0
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    for step in (4, 6):
        shutil.copytree(gpt2_sharded / f"checkpoint-{step}", run / f"checkpoint-{step}")
    shard = run / "checkpoint-6" / "model-00003-of-00006.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert cli.main(["ingest", str(run), str(store), "--no-flatness", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(shard) in err and "Traceback" not in err
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before


def test_metrics_take_the_latest_value_logged_by_each_step():
    log = [{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 3}, {"eval_loss": 5.0, "step": 3}]
    assert step_metrics(log, [0, 2, 3, 9]) == {"train_loss": {2: 3.0, 3: 2.0, 9: 2.0},
                                               "test_loss": {3: 5.0, 9: 5.0}}


def test_the_viewer_renders_a_step_indexed_store(neox, tmp_path):
    from viewer import app

    assert app.main([str(neox[1]), "--screenshot", str(tmp_path / "hf.png")]) == 0
    assert (tmp_path / "hf.png").stat().st_size > 10_000
