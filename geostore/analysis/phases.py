"""Phases of a grokking run from its recorded loss curves, as the reference project (training-dynamics-workbench,
`variant_analysis_summary.py`, REQ_091) defines its windows:

- **memorisation** from the first epoch until the train loss first falls to `train_loss_threshold` (1e-6) or the
  train accuracy reaches 100%;
- **second descent** from the first epoch at which the test loss has fallen `descent_fraction` (80%) of the way
  from its peak (the highest test loss from the end of memorisation on) to zero, until the test loss first falls to
  `test_loss_threshold` (1e-6), else until its minimum (a run that never gets there);
- **plateau** between the two; **final** from the end of the second descent to the end of the run.

Curves are those stored, one value per checkpoint, so every boundary is a stored epoch. Only the phases a run
reaches are returned (a run that never memorises has none). Pure numpy.
"""

from __future__ import annotations

import numpy as np

PHASES = ("memorisation", "plateau", "second_descent", "final")


def training_phases(epochs: np.ndarray, train_loss: np.ndarray, test_loss: np.ndarray,
                    train_accuracy: np.ndarray | None = None, *, train_loss_threshold: float = 1e-6,
                    test_loss_threshold: float = 1e-6, descent_fraction: float = 0.8) -> dict[str, tuple[int, int]]:
    """`{phase: (first epoch, last epoch)}` in training order, for the phases of `PHASES` the curves reach; the
    curves are per stored epoch (`epochs` ascending), NaN where not recorded (never a boundary)."""
    if not 0 < descent_fraction <= 1:
        raise ValueError(f"descent_fraction must be in (0, 1], got {descent_fraction}")
    epochs = np.asarray(epochs, dtype=np.int64)
    train, test = np.asarray(train_loss, dtype=np.float64), np.asarray(test_loss, dtype=np.float64)
    memorised = train <= train_loss_threshold
    if train_accuracy is not None:
        memorised |= np.asarray(train_accuracy, dtype=np.float64) >= 1.0
    phases: dict[str, tuple[int, int]] = {}
    memorisation_end = _first(memorised)
    if memorisation_end is not None:
        phases["memorisation"] = (int(epochs[0]), int(epochs[memorisation_end]))
    after = np.arange(test.size) >= (memorisation_end or 0)
    if not np.isfinite(test[after]).any():
        return phases
    peak_at = int(np.nanargmax(np.where(after, test, np.nan)))
    peak = test[peak_at]
    onset = _first((np.arange(test.size) >= peak_at) & (peak - test >= descent_fraction * peak)) if peak > 0 else None
    if onset is None:
        return phases
    if memorisation_end is not None and onset > memorisation_end:
        phases["plateau"] = (int(epochs[memorisation_end]), int(epochs[onset]))
    later = np.arange(test.size) >= onset
    end = _first(later & (test <= test_loss_threshold))
    if end is None:
        end = int(np.nanargmin(np.where(later, test, np.nan)))
    phases["second_descent"] = (int(epochs[onset]), int(epochs[end]))
    if end < epochs.size - 1:
        phases["final"] = (int(epochs[end]), int(epochs[-1]))
    return phases


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True of `mask`, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None
