"""Stores on fsspec URLs: a real S3-compatible server (moto's standalone server) on loopback, and memory://.

Every write path (create, append, staged insert, flatness, rollback, the derived PCA cache) and every
read path (open_store, xarray, the CLI, the viewer) runs against the object store, and the result is
compared with the same ingest into a local folder, bit for bit.
"""

from __future__ import annotations

import shutil
import socket

import fsspec
import numpy as np
import pytest
import xarray as xr

import geostore
from geostore.cli import main
from geostore.errors import GeostoreError
from geostore.family.modular_addition import model_config
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings
from geostore.store.writer import StoreWriter
from tests.checkpoint_factories import truncate
from tests.conftest import ma_model, random_params
from tests.test_ingest import state_dict_dir

SETTINGS = FlatnessSettings(n_directions=4, seed=3)
BUCKET = "geostore-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on loopback with one empty bucket; the environment points s3fs and subprocesses at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        patch.setenv(key, value)
    patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # fsspec read its env at import
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    patch.undo()
    server.stop()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Checkpoints of one run, split in three sources: early epochs, all but two, and the missing two."""
    root = tmp_path_factory.mktemp("sources")
    state_dict_dir(root / "all", range(0, 200, 10))
    for name, epochs in (("first", range(0, 100, 10)), ("more", [e for e in range(0, 200, 10) if e not in (50, 150)])):
        (root / name).mkdir()
        for epoch in epochs:
            shutil.copy(root / "all" / f"model_step{epoch}.safetensors", root / name)
    return root


def remote_files(fs, url: str) -> dict[str, bytes]:
    """Every object under `url` with its bytes."""
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return {path.removeprefix(root): fs.cat_file(path) for path in sorted(fs.find(root))}


def assert_same_store(a: geostore.Store, b: geostore.Store) -> None:
    np.testing.assert_array_equal(a.epochs, b.epochs)
    assert a.table == b.table
    for name in a.table.names:
        np.testing.assert_array_equal(a.params[name].compute(), b.params[name].compute())
    xr.testing.assert_equal(a.analysis("flatness"), b.analysis("flatness"))


def test_ingest_reopen_append_insert_on_s3_equals_local(s3, sources, tmp_path):
    url = f"s3://{BUCKET}/run.zarr"
    ingest(sources / "first", url, flatness=SETTINGS, progress=False)
    assert geostore.open_store(url).epochs.tolist() == list(range(0, 100, 10))
    ingest(sources / "more", url, flatness=SETTINGS, progress=False)  # appends after the stored epochs
    ingest(sources / "all", url, flatness=SETTINGS, progress=False)  # inserts 50 and 150: staged, then shifted
    local = tmp_path / "run.zarr"
    ingest(sources / "all", local, flatness=SETTINGS, progress=False)

    store = geostore.open_store(url)
    assert str(store.path) == url and store.name == "run.zarr"
    assert not store.interrupted and not s3.exists(f"{BUCKET}/run.zarr/_pending")
    assert_same_store(store, geostore.open_store(local))
    ds = xr.open_zarr(url, consolidated=True)
    np.testing.assert_array_equal(ds["W_E"].values, geostore.open_store(local).params["W_E"].compute())
    pca = store.pca("all", 2)
    assert s3.exists(f"{BUCKET}/run.zarr/derived/trajectory/mlp.npz")  # the cache lives beside the store
    np.testing.assert_allclose(pca["projections"], geostore.open_store(local).pca("all", 2)["projections"])


def test_cluster_workers_read_the_s3_store_and_write_the_same_bits(s3, sources, tmp_path):
    from geostore.cluster import open_client

    url = f"s3://{BUCKET}/cluster.zarr"
    ingest(sources / "first", url, flatness=None, progress=False)
    with open_client(workers=2) as client:  # worker processes open the store by its URL
        ingest(sources / "first", url, flatness=SETTINGS, progress=False, client=client)
    local = tmp_path / "serial.zarr"
    ingest(sources / "first", local, flatness=SETTINGS, progress=False)
    assert_same_store(geostore.open_store(url), geostore.open_store(local))


def test_bad_input_leaves_an_s3_store_untouched_and_rerun_completes(s3, sources, tmp_path):
    url = f"s3://{BUCKET}/untouched.zarr"
    ingest(sources / "first", url, flatness=SETTINGS, progress=False)
    before = remote_files(s3, url)
    broken = tmp_path / "broken"
    state_dict_dir(broken, range(0, 140, 10))
    truncate(broken / "model_step130.safetensors")
    with pytest.raises(GeostoreError, match="model_step130"):
        ingest(broken, url, flatness=SETTINGS, progress=False)
    assert remote_files(s3, url) == before  # rolled back on the object store as on a disk

    ingest(sources / "all", url, flatness=SETTINGS, progress=False)
    assert geostore.open_store(url).analysis_epochs("flatness").tolist() == list(range(0, 200, 10))


def test_concurrent_ingests_into_a_new_s3_store_end_as_one_ingest_of_the_union(s3, tmp_path):
    """An object store has no file locks: writers take the conditional-PUT lock object (lock.py) in turn."""
    from tests.test_concurrency import assert_labelled, finish, geostore_cli, labelled_source

    url = f"s3://{BUCKET}/concurrent.zarr"
    epochs = {"a": range(0, 100, 10), "overlap": range(50, 150, 10), "early": [1, 2, 3]}
    procs = [geostore_cli("ingest", str(labelled_source(tmp_path / name, span)), url, "--no-flatness", "--quiet")
             for name, span in epochs.items()]
    results = finish(procs)
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert_labelled(geostore.open_store(url), sorted(set().union(*epochs.values())))
    assert not s3.exists(f"{BUCKET}/concurrent.zarr/.geostore-lock")


def test_a_failed_recompute_on_s3_puts_the_old_values_back(s3, sources):
    url = f"s3://{BUCKET}/recompute.zarr"
    ingest(sources / "first", url, flatness=SETTINGS, progress=False)
    before, opened = remote_files(s3, url), geostore.open_store(url)
    with pytest.raises(MemoryError), StoreWriter.open(url, model=opened.model, task=opened.task) as writer:
        writer.enable_flatness({"epsilon": 0.1, "n_directions": 2, "seed": 0}, recompute=True)
        assert s3.exists(f"{BUCKET}/recompute.zarr/_replaced/delta_losses")  # set aside, not deleted
        raise MemoryError
    assert remote_files(s3, url) == before


def test_cli_and_viewer_read_an_s3_store(s3, sources, tmp_path, capsys, qapp):
    from viewer.app import main as geoview

    url = f"s3://{BUCKET}/cli.zarr"
    assert main(["ingest", str(sources / "first"), url, "--directions", "4", "--seed", "3", "--quiet"]) == 0
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert url in out and "4 directions" in out
    shot = tmp_path / "view.png"
    assert geoview([url, "--screenshot", str(shot), "--size", "800x600"]) == 0
    assert shot.stat().st_size > 10_000


def test_memory_store_round_trip():
    url = "memory://geostore-test/mem.zarr"
    model = ma_model(model_config(7, d_model=16, n_heads=2))
    params = random_params(model, range(6))
    writer = StoreWriter.open(url, model=model, task={"family": "modular_addition", "p": 7})
    writer.append([0, 2, 4], {k: v[[0, 2, 4]] for k, v in params.items()})
    writer.insert([1, 3], {k: v[[1, 3]] for k, v in params.items()})
    store = geostore.open_store(url)
    assert store.epochs.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(store.params["W_E"].compute(), params["W_E"][:5])
    fsspec.filesystem("memory").rm("/geostore-test", recursive=True)


def test_unusable_urls_get_one_line_errors(capsys):
    assert main(["info", "nosuchprotocol://bucket/x.zarr"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nosuchprotocol://bucket/x.zarr" in err and "Traceback" not in err
    assert main(["info", "memory://nothing/here.zarr"]) != 0
    assert "no such store" in capsys.readouterr().err
