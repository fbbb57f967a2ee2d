"""Antithetic curvature against Hutchinson's Hessian trace, epoch by epoch: do they agree within their errors?

Reads a STORE holding flatness, the multi-epsilon profile and the Hessian (for instance
`geostore ingest RUN STORE --antithetic --profile-epsilons 0.003,0.01,0.03,0.1,0.3 --hessian`) and prints, per
epoch: the loss, `Tr(H)/D` from Hutchinson with its standard error, the top eigenvalue, and for each profile
epsilon the estimate `2 c/eps^2` of the same quantity (c the mean antithetic curvature over the flatness
directions) with its standard error and `z`, the difference over the combined standard error. The last column
is the standard error of the one-sided estimate `2 mean(delta)/eps^2` at the flatness epsilon: the gradient
term's noise that the antithetic pair cancels. Run with `.venv/bin/python benchmarks/curvature_agreement.py STORE`.
"""

from __future__ import annotations

import argparse

import numpy as np

import geostore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", metavar="STORE")
    args = parser.parse_args()
    store = geostore.open_store(args.store)
    d = store.n_trainable
    hessian = store.analysis("hessian").compute()
    trace, trace_err = hessian["hessian_trace"].values / d, hessian["hessian_trace_stderr"].values / d
    top = hessian["top_eigenvalue"].values
    profile = store.curvature_profile()
    flatness = store.analysis_settings("flatness")
    eps, n_dir = float(flatness["epsilon"]), int(flatness["n_directions"])
    deltas = store.analysis("flatness")["delta_losses"].values  # NaN rows where incomplete
    one_sided_err = 2 / eps**2 * deltas.std(axis=1, ddof=1) / np.sqrt(n_dir)
    baseline = store.analysis("flatness")["baseline_loss"].values
    factors = profile["factors"]
    unit = " x |theta|" if store.analysis_settings("profile")["relative"] else ""
    print(f"{args.store}: D={d:,}, {n_dir} directions, Hutchinson {store.analysis_settings('hessian')['n_probes']} "
          f"probes; estimates of Tr(H)/D (z: difference from Hutchinson over the combined standard error)")
    header = ["epoch", "loss", "Hutchinson Tr/D", "top eig",
              *(f"eps {f:g}{unit}" for f in factors), f"one-sided s.e. (eps {eps:g})"]
    rows = []
    for i, epoch in enumerate(store.epochs):
        cells = [str(epoch), f"{baseline[i]:.3g}", f"{trace[i]:.3g} ± {trace_err[i]:.1g}", f"{top[i]:.3g}"]
        for k in range(len(factors)):
            value, error = profile["normalised_curvature"][i, k], profile["normalised_stderr"][i, k]
            z = (value - trace[i]) / np.hypot(error, trace_err[i])
            cells.append(f"{value:.3g} ± {error:.1g} (z {z:+.1f})")
        cells.append(f"{one_sided_err[i]:.2g}")
        rows.append(cells)
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
