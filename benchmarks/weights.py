"""Weights over time: `store.histograms` and `store.spectrum` against numpy on the same arrays, same run.

Builds a store of synthetic random-walk checkpoints of the p=113, d_model=128 modular-addition model
(`pca.build_store`: 400 checkpoints by default, every parameter), then times, in this one process:
- `histograms`: `store.histograms("all", bins=64)` without a cache (the extremes pass and the counting
  pass), then reopened (the cache), then after 10 epochs are appended (their rows only);
- `numpy histograms`: every weight matrix read whole by zarr into memory, the run-wide min and max, then
  `numpy.histogram` of each epoch over the same edges (checked equal to `store.histograms`);
- `spectrum`: `store.spectrum(name)` of W_Q (per head), W_in and W_E; `numpy svd`: the same parameter read
  by zarr and `numpy.linalg.svd(compute_uv=False)` of the float64 stack (checked equal), with one BLAS
  thread as each of `store.spectrum`'s tasks (with its default threads it took 24 s for W_in of 40 epochs
  on 2 shared cores, against 0.04 s for W_Q: threads oversubscribed).

Run `.venv/bin/python benchmarks/weights.py [--epochs N] [--dir DIR]`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from pca import build_store
from threadpoolctl import threadpool_limits
from timing import timed

import geostore

BINS = 64
SPECTRA = ("W_Q", "W_in", "W_E")


def numpy_histograms(path: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Edges and per-epoch counts of `names` read whole by zarr: numpy's reference."""
    group = zarr.open_group(str(path), mode="r")
    arrays = [np.asarray(group[name][:]).reshape(group[name].shape[0], -1) for name in names]
    values = np.concatenate(arrays, axis=1).astype(np.float64)
    edges = np.histogram_bin_edges(values, BINS)
    return edges, np.stack([np.histogram(row, edges)[0] for row in values])


def numpy_spectrum(path: Path, name: str) -> np.ndarray:
    """Singular values of every matrix of `name`, read whole by zarr."""
    stack = np.asarray(zarr.open_group(str(path), mode="r")[name][:], dtype=np.float64)
    with threadpool_limits(limits=1, user_api="blas"):  # as store.spectrum's tasks: no oversubscription
        return np.linalg.svd(stack, compute_uv=False)


def clocked(fn: Callable[[], object]) -> tuple[object, float]:
    """`fn()` and the seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=400, help="checkpoints in the store (default 400)")
    parser.add_argument("--dir", type=Path, help="where to build the store (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        path = folder / "run.zarr"
        start = time.perf_counter()
        build_store(path, args.epochs)
        store = geostore.open_store(path)
        names = store.resolve("all")
        width = sum(int(np.prod(store.member(n).shape[1:])) for n in names)
        print(f"store: {args.epochs} epochs, D = {width:,} ('all'), built in {time.perf_counter() - start:.1f} s")

        found, seconds = clocked(lambda: store.histograms("all", bins=BINS))
        print(f"histograms(all, {BINS}) uncached: {seconds:.2f} s")
        print(f"histograms reopened (cache):  {timed(lambda: geostore.open_store(path).histograms('all', BINS)):.3f} s")
        (edges, counts), seconds = clocked(lambda: numpy_histograms(path, names))
        print(f"numpy (zarr read + histogram): {seconds:.2f} s")
        assert np.array_equal(found.attrs["edges"], edges) and np.array_equal(found.values, counts)

        for name in SPECTRA:
            result, seconds = clocked(lambda n=name: store.spectrum(n))
            expected, baseline = clocked(lambda n=name: numpy_spectrum(path, n))
            assert np.allclose(result["singular_values"].values, expected, rtol=1e-10)
            print(f"spectrum({name}) {store.member(name).shape[1:]}: {seconds:.2f} s; numpy: {baseline:.2f} s")

        _append(path, store, 10)
        seconds = timed(lambda: geostore.open_store(path).histograms("all", BINS))
        print(f"histograms after 10 more epochs (inside the range: their rows only): {seconds:.2f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _append(path: Path, store, n: int) -> None:
    """`n` more epochs, a small step from the last one (inside the cached range)."""
    from geostore.family.modular_addition import MODULAR_ADDITION
    from geostore.store.writer import StoreWriter

    rng = np.random.default_rng(1)
    last = store.params_at(int(store.epochs[-1]))
    batch = {k: np.stack([v * 0.9 + 1e-3 * rng.standard_normal(v.shape, dtype=np.float32) for _ in range(n)])
             for k, v in last.items()}
    StoreWriter.open(path, model=MODULAR_ADDITION.model(store.config), task=store.task).append(
        store.epochs[-1] + 10 * np.arange(1, n + 1), batch)


if __name__ == "__main__":
    main()
