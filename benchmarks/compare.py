"""Comparing runs: `sweep.pca` (one shared basis) against scikit-learn's PCA on the concatenated runs, and
`sweep.divergence` against numpy on both runs loaded whole; time and peak memory, same run.

Builds a sweep of `--runs` runs (default 3) of `--epochs` random-walk checkpoints (default 400) of the p=113,
d_model=128 model (D = 226,048), each run from its own seed (`benchmarks/pca.py`'s `build_store`). Every method
runs in a fresh subprocess reporting wall time and peak RSS (VmHWM). The reference is scikit-learn's exact
`PCA(svd_solver="full")` on the float64 concatenation of all runs' rows.

Run `.venv/bin/python benchmarks/compare.py [--runs 3 --epochs 400]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pca import build_store, error, peak_rss

COMPONENTS = 3


def child(method: str, path: Path, out: Path) -> None:
    """Run one method on the sweep at `path`, save its result to `out`, print {seconds, peak_bytes} as JSON."""
    import geostore

    sweep = geostore.open_sweep(path)
    runs = sweep.runs
    start = time.perf_counter()
    if method == "shared":
        result = sweep.pca("all", COMPONENTS)["projections"].values
        result = result.reshape(-1, COMPONENTS)[np.isfinite(result.reshape(-1, COMPONENTS)).all(axis=1)]
    elif method == "sklearn":
        from sklearn.decomposition import PCA

        x = np.concatenate([sweep[r].flatten("all").compute().astype(np.float64) for r in runs])
        result = PCA(COMPONENTS, svd_solver="full").fit_transform(x)
    elif method == "divergence":
        result = sweep.divergence(runs[0], runs[1])["distance"].values
    elif method == "numpy-divergence":
        a, b = (sweep[r].flatten("all").compute().astype(np.float64) for r in runs[:2])
        result = np.linalg.norm(a - b, axis=1)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    np.save(out, result)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak_rss()}))


def run(method: str, path: Path, scratch: Path) -> dict:
    out = scratch / f"{method}.npy"
    done = subprocess.run([sys.executable, __file__, "--child", method, "--sweep", str(path), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "result": np.load(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.sweep, args.out)
        return

    from geostore.store.location import Location
    from geostore.store.sweep import create_sweep

    scratch = Path(tempfile.mkdtemp(prefix="geostore-compare-", dir=args.dir))
    try:
        path = scratch / "sweep.zarr"
        create_sweep(Location.of(path))
        for seed in range(args.runs):
            build_store(path / "runs" / f"seed{seed}", args.epochs, seed=seed)
        shared = run("shared", path, scratch)
        cached = run("shared", path, scratch)
        shutil.rmtree(path / "derived")
        reference = run("sklearn", path, scratch)
        divergence = run("divergence", path, scratch)
        plain = run("numpy-divergence", path, scratch)
        print(f"{args.runs} runs x {args.epochs} epochs x 226,048 weights (p=113, d_model=128)")
        print(f"  {'method':<34}{'seconds':>9}{'peak MB':>9}{'time / geostore':>17}{'peak / geostore':>17}"
              f"{'rel error':>11}")
        for name, r, base, err in (
                ("sweep.pca (shared basis)", shared, shared, error(shared["result"], reference["result"])),
                ("sweep.pca, cached", cached, shared, error(cached["result"], reference["result"])),
                ("sklearn PCA full f64, concatenated", reference, shared, 0.0),
                ("sweep.divergence (2 runs)", divergence, divergence, 0.0),
                ("numpy norms, both runs in memory", plain, divergence,
                 float(np.abs(plain["result"] - divergence["result"]).max() / plain["result"].max()))):
            print(f"  {name:<34}{r['seconds']:9.2f}{r['peak_bytes'] / 1e6:9.0f}{r['seconds'] / base['seconds']:17.2f}"
                  f"{r['peak_bytes'] / base['peak_bytes']:17.2f}{err:11.1e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
