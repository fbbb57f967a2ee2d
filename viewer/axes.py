"""Axes whose log-scale tick labels stay readable: decades only (1-2-5 within a decade), one number style, no
more labels than the axis has room for.

pyqtgraph labels every minor tick of a log axis spanning less than three decades (0.1, 0.09, 0.08, ... piled
on top of each other), switches between plain numbers and powers of ten tick by tick (0.0001 beside
10⁻⁶) and labels every decade however short the axis (six decades piled up on an 80-pixel plot).
`log_tick_labels` is the pure rule; `Axis` applies it and is otherwise pyqtgraph's `AxisItem`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg

SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
# Labels written as plain numbers when every labelled power of ten lies within these exponents.
PLAIN_EXPONENTS = (-3, 4)
# Pixels of axis length one label needs: a line of text on a vertical axis, a number's width on a horizontal one.
LABEL_ROOM_PX = {"vertical": 20, "horizontal": 56}


def log_tick_labels(powers: Sequence[float], low: float, high: float, max_labels: int | None = None) -> list[str]:
    """Labels of log-axis ticks at `powers` (log10 of the values) on an axis showing `low..high` (log10):
    decades only when two or more are in view, else the 1, 2 and 5 multiples; "" for ticks left unlabelled.
    With `max_labels`, at most that many labels in view (every second, third ... decade; within a decade 1 and 5,
    then 1), decided from the view alone so that every tick level pyqtgraph asks about agrees.
    One style per axis: plain numbers (0.001, 20) when every label fits them, else powers of ten (2·10⁻⁶)."""
    powers = np.asarray(powers, dtype=float)
    first, last = int(np.ceil(low - 1e-9)), int(np.floor(high + 1e-9))
    decades_in_view = last - first + 1
    room = None if max_labels is None else max(int(max_labels), 1)
    exponent = np.floor(powers + 1e-9)
    mantissa = np.round(10 ** (powers - exponent), 6)
    if decades_in_view >= 2:
        step = 1 if room is None else int(np.ceil(decades_in_view / room))
        keep = (mantissa == 1) & (exponent % step == 0)
    else:
        keep = np.isin(mantissa, _multiples(low, high, room))
    # the style too is decided from the view, so all tick levels agree
    plain = PLAIN_EXPONENTS[0] <= np.floor(low + 1e-9) and np.floor(high + 1e-9) <= PLAIN_EXPONENTS[1]
    labels = []
    for e, m, k in zip(exponent, mantissa, keep, strict=True):
        if not k:
            labels.append("")
        elif plain:
            labels.append(f"{m * 10.0 ** e:.{max(0, -int(e))}f}")
        else:
            power = f"10{str(int(e)).translate(SUPERSCRIPT)}"
            labels.append(power if m == 1 else f"{m:g}·{power}")
    return labels


def _multiples(low: float, high: float, room: int | None) -> tuple[int, ...]:
    """Which multiples of a power of ten to label on an axis spanning less than two decades: 1, 2 and 5, or fewer
    when more of them are in view than `room` (never none in view)."""
    choices = ((1, 2, 5), (1, 5), (1,))
    in_view = [sum(low - 1e-9 <= e + np.log10(m) <= high + 1e-9
                   for e in range(int(np.floor(low)), int(np.ceil(high)) + 1) for m in chosen) for chosen in choices]
    fitting = [c for c, n in zip(choices, in_view, strict=True) if n and (room is None or n <= room)]
    return fitting[0] if fitting else next((c for c, n in zip(choices[::-1], in_view[::-1], strict=True) if n),
                                           choices[0])


class Axis(pg.AxisItem):
    """pyqtgraph's axis with `log_tick_labels` in log mode, as many labels as its length has room for."""

    def logTickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:
        low, high = sorted(self.range)
        shift = float(np.log10(scale)) if scale > 0 else 0.0
        vertical = self.orientation in ("left", "right")
        length = self.geometry().height() if vertical else self.geometry().width()
        room = int(length // LABEL_ROOM_PX["vertical" if vertical else "horizontal"]) if length > 0 else None
        return log_tick_labels(np.asarray(values, dtype=float) + shift, low + shift, high + shift, room)
