"""The viewer's one palette and theme: colours of every curve, the colour maps, fonts.

Colours follow Okabe-Ito (distinguishable with the common colour-vision deficiencies) on a light
background, so screenshots read well in papers and on projectors.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QBrush, QColor, QPen

BACKGROUND = "#ffffff"
FOREGROUND = "#2b2b2b"
GRID_ALPHA = 0.18
PATH = "#b8b8b8"

TRAIN = "#0072B2"
TEST = "#D55E00"
GROUPS = {"all": "#2b2b2b", "embedding": "#0072B2", "attention": "#D55E00", "mlp": "#009E73", "norm": "#CC79A7"}
# Colours of other groups (a family's own), in order (Okabe-Ito).
MORE_GROUPS = ("#E69F00", "#56B4E9", "#F0E442", "#999999", "#6a3d9a")


def group_colour(group: str, position: int) -> str:
    """The colour of a component group: its own, else the `position`-th of the spare colours."""
    return GROUPS.get(group, MORE_GROUPS[position % len(MORE_GROUPS)])
METRIC = "#6a3d9a"
BAND = "#b9a6d6"
BASELINE = "#E69F00"
HISTOGRAM = "#56B4E9"
MEAN = "#0072B2"
MEDIAN = "#009E73"
THRESHOLD = "#7f7f7f"
CURRENT = "#CC1D5B"
RUG = "#7f7f7f"
# Training phases shaded behind every epoch axis (`Store.phases`): faint, so curves stay what the eye reads first.
PHASES = {"memorisation": "#56B4E9", "plateau": "#F0E442", "second_descent": "#009E73", "final": "#999999"}
PHASE_ALPHA = 34

EPOCH_MAP = "viridis"
LOSS_MAP = "plasma"
N_SHADES = 256
"""Scatter colours are quantized to this many shared brushes: distinct brushes per point make
`ScatterPlotItem.setData` 10x slower (ECOSYSTEM.md)."""


def apply_theme() -> None:
    """pyqtgraph's global options for every plot the viewer draws."""
    pg.setConfigOptions(background=BACKGROUND, foreground=FOREGROUND, antialias=True)


def pen(color: str, width: float = 1.6, style=None) -> QPen:
    """A cosmetic pen of `color`; `style` is a `Qt.PenStyle` for dashed and dotted lines."""
    p = pg.mkPen(color, width=width)
    if style is not None:
        p.setStyle(style)
    return p


def translucent(color: str, alpha: int) -> QColor:
    """`color` with opacity `alpha` (0-255)."""
    c = QColor(color)
    c.setAlpha(alpha)
    return c


def shade_brushes(name: str) -> list[QBrush]:
    """`N_SHADES` shared brushes along colour map `name`."""
    cmap = pg.colormap.get(name)
    return [QBrush(cmap.mapToQColor(x)) for x in np.linspace(0.0, 1.0, N_SHADES)]


def shade_indices(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Index into `shade_brushes` of each value on the range `[low, high]` (NaN -> 0)."""
    span = high - low if high > low else 1.0
    scaled = np.nan_to_num((np.asarray(values, dtype=np.float64) - low) / span, nan=0.0)
    return np.clip((scaled * (N_SHADES - 1)).round(), 0, N_SHADES - 1).astype(np.intp)
