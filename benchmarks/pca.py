"""Trajectory PCA: `store.pca` against scikit-learn's PCA and IncrementalPCA, time and peak memory, same run.

Builds real stores of synthetic random-walk weights (steps shrinking over training, like a real run):
- paper size: 400 checkpoints of the p=113, d_model=128 model (D = 226,048 for the 9 weight matrices);
- large: more checkpoints of the same model, several times the memory budget given to `store.pca`.

Each method runs in a fresh subprocess that reports its wall time and peak RSS (VmHWM); the
reference is scikit-learn's exact `PCA(svd_solver="full")` on the float64 matrix (paper size only: it
needs the whole matrix in memory twice over). Methods:
- `geostore`: `store.pca(n_components=3, ...)` on a store without a cache (then the cached reopen);
- `sklearn`: load the group into memory (float32), `PCA(3).fit_transform` (the default solver);
- `ipca`: `IncrementalPCA(3, batch_size=100)`, `partial_fit` over the store in batches, then `transform`;
- `dask-matmul`, `rechunked-syrk`: the designs `store.pca` did not choose (`--designs`).

Run `.venv/bin/python benchmarks/pca.py` (add `--designs` for the design comparison).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COMPONENTS = 3


def build_store(path: Path, n_epochs: int, *, p: int = 113, d_model: int = 128, seed: int = 0) -> None:
    """A store of `n_epochs` random-walk checkpoints of the modular-addition model, written chunk by chunk."""
    from geostore.family.modular_addition import MODULAR_ADDITION, model_config
    from geostore.store.writer import StoreWriter

    model = MODULAR_ADDITION.model(model_config(p, d_model=d_model))
    writer = StoreWriter.open(path, model=model, task={"family": "modular_addition", "p": p})
    rng = np.random.default_rng(seed)
    state = {q.name: rng.standard_normal(q.shape).astype(np.float32) * 0.1 for q in model.table.parameters}
    for start in range(0, n_epochs, writer.chunk_epochs):
        epochs = np.arange(start, min(n_epochs, start + writer.chunk_epochs))
        batch = {n: np.empty((epochs.size, *v.shape), np.float32) for n, v in state.items()}
        for i, epoch in enumerate(epochs):
            scale = 0.02 / (1 + epoch / 50)  # large early steps, small late ones
            for name, value in state.items():
                value += scale * rng.standard_normal(value.shape, dtype=np.float32)
                batch[name][i] = value
        writer.append(epochs * 10, batch)


# ------------------------------------------------------------------------------- child methods
def _geostore(store, budget: int | None) -> np.ndarray:
    return store.pca("all", COMPONENTS, memory_budget=budget)["projections"].values


def _sklearn(store, dtype) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = store.flatten("all").compute().astype(dtype, copy=False)
    solver = "full" if dtype == np.float64 else "auto"
    return PCA(COMPONENTS, svd_solver=solver).fit_transform(x)


def _ipca(store) -> np.ndarray:
    from sklearn.decomposition import IncrementalPCA

    x = store.flatten("all")
    ipca = IncrementalPCA(COMPONENTS, batch_size=100)
    for start in range(0, x.shape[0], 100):
        ipca.partial_fit(x[start:start + 100].compute())
    return np.concatenate([ipca.transform(x[s:s + 100].compute()) for s in range(0, x.shape[0], 100)])


def _gram_projections(gram: np.ndarray) -> np.ndarray:
    from geostore.analysis.trajectory import pca_from_gram

    return pca_from_gram(gram, COMPONENTS).projections


def _dask_matmul(store) -> np.ndarray:
    x = store.flatten("all").astype(np.float64)
    return _gram_projections((x @ x.T).compute())


def _rechunked_syrk(store) -> np.ndarray:
    import dask

    grams = [dask.delayed(lambda a: np.dot(a, a.T))(v.reshape(v.shape[0], -1).astype(np.float64)
                                                   .rechunk((v.shape[0], -1)))
             for v in (store.params[n] for n in ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out",
                                                 "W_U"))]
    return _gram_projections(sum(dask.compute(*grams)))


def child(method: str, path: Path, budget: int | None, out: Path) -> None:
    """Run one method, write its projections to `out`, print {seconds, peak_bytes} as JSON."""
    import geostore

    store = geostore.open_store(path)
    start = time.perf_counter()
    result = {
        "geostore": lambda: _geostore(store, budget),
        "sklearn": lambda: _sklearn(store, np.float32),
        "sklearn-full64": lambda: _sklearn(store, np.float64),
        "ipca": lambda: _ipca(store),
        "dask-matmul": lambda: _dask_matmul(store),
        "rechunked-syrk": lambda: _rechunked_syrk(store),
    }[method]()
    seconds = time.perf_counter() - start
    np.save(out, result)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak_rss()}))


def peak_rss() -> int:
    """Peak RSS of this process image (VmHWM; ru_maxrss would include the parent's RSS at fork)."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(method: str, path: Path, scratch: Path, budget: int | None = None) -> dict:
    out = scratch / f"{method}.npy"
    cmd = [sys.executable, __file__, "--child", method, "--store", str(path), "--out", str(out)]
    if budget:
        cmd += ["--budget", str(budget)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "projections": np.load(out)}


def error(result: np.ndarray, reference: np.ndarray) -> float:
    """Largest error relative to the largest projection, component signs aligned."""
    signs = np.sign((result * reference).sum(axis=0))
    return float(np.abs(result * signs - reference).max() / np.abs(reference).max())


def report(title: str, results: dict, reference: np.ndarray | None, store_bytes: int) -> None:
    base = results["geostore"]
    print(f"\n{title}: store {store_bytes / 1e6:.0f} MB")
    print(f"  {'method':<22}{'seconds':>9}{'peak MB':>9}{'time / geostore':>17}{'peak / geostore':>17}"
          f"{'rel error':>11}")
    for name, r in results.items():
        err = "" if reference is None else f"{error(r['projections'], reference):.1e}"
        print(f"  {name:<22}{r['seconds']:9.2f}{r['peak_bytes'] / 1e6:9.0f}{r['seconds'] / base['seconds']:17.2f}"
              f"{r['peak_bytes'] / base['peak_bytes']:17.2f}{err:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-epochs", type=int, default=400)
    parser.add_argument("--large-epochs", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=256 * 2**20, help="store.pca memory budget on the large store")
    parser.add_argument("--designs", action="store_true", help="also time the designs store.pca did not choose")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.store, args.budget if args.child == "geostore" else None, args.out)
        return

    scratch = Path(tempfile.mkdtemp(prefix="geostore-pca-", dir=args.dir))
    try:
        import geostore

        paper = scratch / "paper.zarr"
        build_store(paper, args.paper_epochs)
        results = {"geostore": run("geostore", paper, scratch, 2**30)}
        results["geostore (cached)"] = run("geostore", paper, scratch, 2**30)
        shutil.rmtree(paper / "derived")
        reference = run("sklearn-full64", paper, scratch)
        results["sklearn PCA"] = run("sklearn", paper, scratch)
        results["sklearn PCA full f64"] = reference
        results["IncrementalPCA"] = run("ipca", paper, scratch)
        if args.designs:
            results["dask X @ X.T"] = run("dask-matmul", paper, scratch)
            results["rechunked syrk"] = run("rechunked-syrk", paper, scratch)
        report(f"paper size: {args.paper_epochs} x 226,048", results, reference["projections"],
               geostore.open_store(paper).nbytes_on_disk())
        shutil.rmtree(paper)

        large = scratch / "large.zarr"
        build_store(large, args.large_epochs)
        size = geostore.open_store(large).nbytes_on_disk()
        results = {"geostore": run("geostore", large, scratch, args.budget)}
        shutil.rmtree(large / "derived")
        results["sklearn PCA"] = run("sklearn", large, scratch)
        results["IncrementalPCA"] = run("ipca", large, scratch)
        report(f"large: {args.large_epochs} x 226,048, store.pca budget {args.budget / 2**20:.0f} MiB "
               f"(reference: geostore)", results, results["geostore"]["projections"], size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
