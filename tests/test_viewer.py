"""geoview's window on a real store, offscreen (pytest-qt)."""

from __future__ import annotations

import geostore
from tests.conftest import random_params
from viewer.app import build_window


def test_window_shows_the_store(qtbot, tmp_path, tiny_config):
    from geostore.store.writer import StoreWriter

    path = tmp_path / "run.zarr"
    StoreWriter.open(path, config=tiny_config, task={"family": "modular_addition", "p": 7}).append(
        [0, 10], random_params(tiny_config, range(2)))
    window = build_window(geostore.open_store(path))
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    assert "run.zarr" in window.windowTitle()
    assert "2 stored, 0..10" in window.centralWidget().toPlainText()
    assert window.grab().width() > 0
