"""Export of a dock: its plots as PNG or SVG, its data as CSV.

SVG is rendered by Qt itself (`QSvgGenerator` as the paint device of `QWidget.render`): pyqtgraph's
own SVG exporter raises on every plot with Qt 6.11 (pyqtgraph issue 3485, ECOSYSTEM.md).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PySide6.QtCore import QRect, QRectF
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtSvg import QSvgGenerator
from PySide6.QtWidgets import QGraphicsItem, QGraphicsView


@contextmanager
def export_mode(view: QGraphicsView) -> Iterator[None]:
    """Let a graphics view's items draw for export, then restore them.

    Item caches are turned off (the docks cache static curves as pixmaps for fast scrubbing) and
    pyqtgraph's export mode is on (scatter points as paths, not pixmaps from its symbol atlas), so SVG
    holds vectors and PNG is sharp at twice the screen resolution.
    """
    items = view.scene().items()
    modes = [item.cacheMode() for item in items]
    exporting = [item for item in items if hasattr(item, "setExportMode")]
    for item in items:
        item.setCacheMode(QGraphicsItem.CacheMode.NoCache)
    for item in exporting:
        item.setExportMode(True, {"antialias": True})
    try:
        yield
    finally:
        for item in exporting:
            item.setExportMode(False)
        for item, mode in zip(items, modes, strict=True):
            item.setCacheMode(mode)


def render(view: QGraphicsView, painter: QPainter, target: QRectF) -> None:
    """Draw what `view` shows into `target` of `painter`'s device, scaled to fit."""
    with export_mode(view):
        view.render(painter, target, view.viewport().rect())


def export_png(view: QGraphicsView, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """Render a graphics view into a PNG at `scale` times its on-screen size (sharp in documents)."""
    image = QImage(round(view.width() * scale), round(view.height() * scale), QImage.Format.Format_ARGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    render(view, painter, QRectF(image.rect()))
    painter.end()
    if not image.save(str(path)):
        raise OSError(f"{path}: could not write the PNG")
    return Path(path)


def export_svg(view: QGraphicsView, path: str | os.PathLike, *, title: str = "") -> Path:
    """Render a graphics view as vector graphics into an SVG file."""
    generator = QSvgGenerator()
    generator.setFileName(str(path))
    generator.setSize(view.size())
    generator.setViewBox(QRect(0, 0, view.width(), view.height()))
    # the screen's dpi, not the generator's default 72: pyqtgraph replays its cached pictures at the device's
    # resolution, so at 72 dpi axes, grid and curves came out at 0.75x the scale of the labels around them
    generator.setResolution(view.logicalDpiX())
    generator.setTitle(title)
    generator.setDescription("geoview export")
    painter = QPainter()
    if not painter.begin(generator):
        raise OSError(f"{path}: could not write the SVG")
    render(view, painter, QRectF(0, 0, view.width(), view.height()))
    painter.end()
    return Path(path)


def write_csv(path: str | os.PathLike, columns: Mapping[str, np.ndarray]) -> Path:
    """Write equal-length columns with a header row; NaN (not computed) becomes an empty field."""
    arrays = [np.asarray(v) for v in columns.values()]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        for row in zip(*arrays, strict=True):
            writer.writerow(["" if isinstance(v, float | np.floating) and np.isnan(v) else
                             (f"{v:.10g}" if isinstance(v, float | np.floating) else v) for v in row])
    return Path(path)
