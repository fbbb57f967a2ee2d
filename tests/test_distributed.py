"""Flatness on a real dask.distributed LocalCluster: the same bits as a serial run, also when a worker dies."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np

import geostore
from geostore.cli import main
from geostore.cluster import open_client
from geostore.family.modular_addition import model_config
from geostore.ingestion import ingest
from geostore.landscape import FlatnessSettings, compute_store_flatness
from geostore.plane import compute_plane
from tests.conftest import snapshot
from tests.test_ingest import state_dict_dir

SETTINGS = FlatnessSettings(n_directions=8, seed=1)


def test_cluster_flatness_equals_serial_bit_for_bit_even_when_a_worker_dies(tmp_path):
    source = tmp_path / "run"
    state_dict_dir(source, range(0, 300, 10), config=model_config(31, d_model=32, n_heads=4))
    serial = tmp_path / "serial.zarr"
    ingest(source, serial, flatness=SETTINGS, progress=False)

    weights_only = tmp_path / "weights.zarr"
    ingest(source, weights_only, flatness=None, progress=False)
    parallel, killed = tmp_path / "parallel.zarr", tmp_path / "killed.zarr"
    shutil.copytree(weights_only, parallel)
    shutil.copytree(weights_only, killed)
    compute_plane(weights_only, resolution=4, progress=False)
    plane_copy = tmp_path / "plane.zarr"
    shutil.copytree(weights_only, plane_copy)
    env_before = os.environ.get("OMP_NUM_THREADS")
    with open_client(workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert os.environ.get("OMP_NUM_THREADS") == env_before  # LocalCluster's setting does not leak here
        compute_store_flatness(parallel, SETTINGS, progress=False, client=client)
        # the loss plane's rows as cluster tasks, too (the PCA cached by the serial plane, copied with it)
        assert compute_plane(plane_copy, progress=False, recompute=True, client=client).computed == 4

        def kill_a_worker_once_work_is_done() -> None:
            store_done = 0
            while store_done == 0:
                time.sleep(0.05)
                store = geostore.open_store(killed)
                store_done = store.analysis_epochs("flatness").size if store.analyses() else 0
            victim = next(iter(client.scheduler_info()["workers"]))
            client.run(os._exit, 1, workers=[victim], on_error="ignore")  # the nanny restarts it; tasks move

        killer = threading.Thread(target=kill_a_worker_once_work_is_done)
        killer.start()
        report = compute_store_flatness(killed, SETTINGS, progress=False, client=client)
        killer.join()
    assert os.environ.get("OMP_NUM_THREADS") == env_before  # nor the restarted worker's, once the cluster is closed
    assert report.computed + report.already == 30
    assert snapshot(parallel) == snapshot(serial)
    assert snapshot(killed) == snapshot(serial)
    planes = [geostore.open_store(path).loss_plane()["loss"].values for path in (weights_only, plane_copy)]
    assert planes[0].tobytes() == planes[1].tobytes() and np.isfinite(planes[0]).all()


def test_cli_workers_and_scheduler_errors(tmp_path, capsys):
    source = tmp_path / "run"
    state_dict_dir(source, [0, 10, 20])
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(source), str(path), "--no-flatness", "--quiet"]) == 0
    assert main(["flatness", str(path), "--workers", "0"]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["flatness", str(path), "--scheduler", "tcp://127.0.0.1:9"]) == 1
    assert "--scheduler tcp://127.0.0.1:9: cannot connect" in capsys.readouterr().err
    assert geostore.open_store(path).analyses() == []
    assert np.isfinite(geostore.open_store(path).params["W_E"].compute()).all()
