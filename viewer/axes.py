"""Axes whose log-scale tick labels stay readable: decades only (1-2-5 within a decade), one number style.

pyqtgraph labels every minor tick of a log axis spanning less than three decades (0.1, 0.09, 0.08, ... piled
on top of each other) and switches between plain numbers and powers of ten tick by tick (0.0001 beside
10⁻⁶). `log_tick_labels` is the pure rule; `Axis` applies it and is otherwise pyqtgraph's `AxisItem`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg

SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
# Labels written as plain numbers when every labelled power of ten lies within these exponents.
PLAIN_EXPONENTS = (-3, 4)


def log_tick_labels(powers: Sequence[float], low: float, high: float) -> list[str]:
    """Labels of log-axis ticks at `powers` (log10 of the values) on an axis showing `low..high` (log10):
    decades only when two or more are in view, else the 1, 2 and 5 multiples; "" for ticks left unlabelled.
    One style per axis: plain numbers (0.001, 20) when every label fits them, else powers of ten (2·10⁻⁶)."""
    powers = np.asarray(powers, dtype=float)
    decades_in_view = np.floor(high + 1e-9) - np.ceil(low - 1e-9) + 1
    exponent = np.floor(powers + 1e-9)
    mantissa = np.round(10 ** (powers - exponent), 6)
    keep = mantissa == 1 if decades_in_view >= 2 else np.isin(mantissa, (1, 2, 5))
    plain = all(PLAIN_EXPONENTS[0] <= e <= PLAIN_EXPONENTS[1] for e in exponent[keep])
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


class Axis(pg.AxisItem):
    """pyqtgraph's axis with `log_tick_labels` in log mode."""

    def logTickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:
        low, high = sorted(self.range)
        shift = float(np.log10(scale)) if scale > 0 else 0.0
        return log_tick_labels(np.asarray(values, dtype=float) + shift, low + shift, high + shift)
