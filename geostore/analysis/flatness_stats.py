"""Per-epoch statistics of stored flatness and curvature distributions: pure numpy, no torch (the viewer,
`Store.flatness_summary` and `Store.curvature_summary` call them on every open)."""

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
    out = _distribution(baseline, np.asarray(delta_losses, dtype=np.float64), "delta_loss", threshold)
    for value in out.values():
        value[np.isnan(baseline)] = np.nan
    return {**out, "baseline_loss": baseline.copy()}


def curvature_summary(baseline_loss: np.ndarray, curvature: np.ndarray, slope: np.ndarray, *, epsilon: float,
                      n_params: int, threshold: float = 0.1) -> dict[str, np.ndarray]:
    """Per-epoch statistics of the antithetic `curvature` and `slope` `(n_epoch, n_dir)` measured at `epsilon`.

    As `flatness_summary` with `curvature` for `delta_loss` (`flatness_ratio`: curvature below `threshold`
    times the baseline, NaN where the baseline is), plus `stderr_curvature` (standard error of the mean),
    `mean_slope` and `rms_slope` (`g.d` averages: the RMS estimates `||g|| / sqrt(D)`), and `trace_estimate`
    with `trace_estimate_stderr`: `2 D / epsilon^2` times the mean curvature, an estimate of the Hessian trace
    (`E[d'Hd] = Tr(H) / D` over unit directions) to compare with Hutchinson's. NaN where not computed.
    """
    baseline = np.asarray(baseline_loss, dtype=np.float64)
    curvature = np.asarray(curvature, dtype=np.float64)
    slope = np.asarray(slope, dtype=np.float64)
    out = _distribution(baseline, curvature, "curvature", threshold)
    missing = np.isnan(curvature).any(axis=1)
    n = curvature.shape[1]
    stderr = curvature.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(curvature), np.nan)
    scale = 2.0 * n_params / epsilon**2
    out.update({
        "stderr_curvature": stderr, "mean_slope": slope.mean(axis=1), "rms_slope": np.sqrt(np.mean(slope**2, axis=1)),
        "trace_estimate": scale * out["mean_curvature"], "trace_estimate_stderr": scale * stderr,
    })
    for value in out.values():
        value[missing] = np.nan
    return out


def _distribution(baseline: np.ndarray, values: np.ndarray, name: str, threshold: float) -> dict[str, np.ndarray]:
    """Mean, median, max, std, p10 and p90 of each row of `values` (keys `mean_<name>`, ...) and the share of
    values below `threshold` times the baseline (`threshold` itself where it is 0); NaN where the row has a NaN,
    and the ratio also where the baseline is NaN."""
    missing = np.isnan(values).any(axis=1)
    limit = np.where(baseline == 0, threshold, threshold * baseline)
    ratio = (values < limit[:, None]).mean(axis=1)
    p10, p90 = np.percentile(values, [10, 90], axis=1)
    out = {
        f"mean_{name}": values.mean(axis=1), f"median_{name}": np.median(values, axis=1),
        f"max_{name}": values.max(axis=1), f"std_{name}": values.std(axis=1),
        f"p10_{name}": p10, f"p90_{name}": p90, "flatness_ratio": ratio,
    }
    for value in out.values():
        value[missing] = np.nan
    out["flatness_ratio"][np.isnan(baseline)] = np.nan
    return out
