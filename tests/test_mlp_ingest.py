"""The reference project's MLP families end to end: runs in its layout (miscope directories) ingest, their loss on
the full grid equals a plain torch forward, `model_at` is exact, PCA equals scikit-learn, flatness equals the
plain loop, and the viewer renders them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_runs import checkpoint, grid, reference_logits, reference_loss, write_mlp_run
from sklearn.decomposition import PCA

import geostore
from geostore.analysis.flatness import compute_landscape_flatness
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings

EPOCHS = (0, 5, 10)


@pytest.mark.parametrize("kind", ["two_layer_mlp", "learned_emb_mlp"])
def test_reference_mlp_runs_ingest_and_analyse(tmp_path, kind):
    run = write_mlp_run(tmp_path / kind, kind, epochs=EPOCHS)
    report = ingest(run, tmp_path / "s.zarr", flatness=FlatnessSettings(n_directions=4), progress=False)
    assert report.kind == "miscope" and report.added == len(EPOCHS)
    store = geostore.open_store(tmp_path / "s.zarr")
    assert store.family == {"two_layer_mlp": "modulo_addition_2layer_mlp",
                            "learned_emb_mlp": "modulo_addition_learned_emb_mlp"}[kind]
    assert store.metrics()["train_loss"].shape == (len(EPOCHS),)
    assert store.train_mask().shape == (11, 11)
    labels = grid(11)[2]
    flat = []
    names = store.table.trainable
    for i, epoch in enumerate(EPOCHS):
        state = checkpoint(run, epoch)
        module = store.model_at(epoch)
        rebuilt = module.state_dict()
        assert set(rebuilt) == set(state) and all(torch.equal(rebuilt[k], v) for k, v in state.items())
        with torch.no_grad():
            expected = reference_loss(reference_logits(module, 11), labels).item()
        assert store.analysis("flatness")["baseline_loss"].values[i] == pytest.approx(expected, rel=1e-6)
        keys = [key for name in names for key in store.table[name].keys]
        flat.append(np.concatenate([state[k].double().numpy().ravel() for k in keys]))
        plain = compute_landscape_flatness(module, None, lambda m, _: reference_loss(reference_logits(m, 11), labels),
                                           n_directions=4, epsilon=0.1, seed=0, trainable=keys)
        np.testing.assert_allclose(store.analysis("flatness")["delta_losses"][i], plain["delta_losses"], atol=2e-6)
    ours = store.pca("all", n_components=2)
    theirs = PCA(n_components=2).fit(np.stack(flat))
    np.testing.assert_allclose(ours["explained_variance"], theirs.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(ours["projections"]), np.abs(theirs.transform(np.stack(flat))), atol=1e-6)
    assert set(store.velocities()) == {"all", *store.table.partition()}

    from viewer.app import main as geoview

    assert geoview([str(tmp_path / "s.zarr"), "--screenshot", str(tmp_path / "shot.png")]) == 0
