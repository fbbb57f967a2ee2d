"""Per-epoch statistics of stored flatness distributions: pure numpy, no torch (the viewer and
`Store.flatness_summary` call it on every open)."""

from __future__ import annotations

import numpy as np


def flatness_summary(baseline_loss: np.ndarray, delta_losses: np.ndarray, threshold: float = 0.1
                     ) -> dict[str, np.ndarray]:
    """Per-epoch statistics of `delta_losses` `(n_epoch, n_dir)`: each `(n_epoch,)` float64, NaN where an epoch's
    baseline or any of its deltas is NaN (not computed); `baseline_loss` is passed through.

    `flatness_ratio` is the fraction of directions with `delta < threshold * baseline` (`threshold` itself
    where the baseline is 0, as the reference implementation does); percentiles interpolate linearly.
    """
    baseline = np.asarray(baseline_loss, dtype=np.float64)
    deltas = np.asarray(delta_losses, dtype=np.float64)
    missing = np.isnan(baseline) | np.isnan(deltas).any(axis=1)
    limit = np.where(baseline == 0, threshold, threshold * baseline)
    ratio = (deltas < limit[:, None]).mean(axis=1)
    p10, p90 = np.percentile(deltas, [10, 90], axis=1)
    out = {
        "mean_delta_loss": deltas.mean(axis=1), "median_delta_loss": np.median(deltas, axis=1),
        "max_delta_loss": deltas.max(axis=1), "std_delta_loss": deltas.std(axis=1),
        "p10_delta_loss": p10, "p90_delta_loss": p90, "flatness_ratio": ratio,
    }
    for value in out.values():
        value[missing] = np.nan
    return {**out, "baseline_loss": baseline.copy()}
