"""Weight histograms over bins fixed for a run, and singular-value spectra of weight matrices, with Dask.

Both read a parameter trajectory (arrays `(n_epoch, ...)` chunked along epoch only) once per pass, one
stored chunk per task, so memory holds a few chunks whatever the run's length. Histograms need their
bins before counting: a first pass takes each epoch's min and max (cheap, and cacheable per epoch), the
bins span the run-wide range, a second pass counts. Counting is numpy's own (`numpy.histogram` over
equal bins: the last bin closed), so a row equals `numpy.histogram(values, bins=edges)`.

A spectrum takes the last two axes of an array as the matrix and any axes before them (layer, head) as
a batch; the participation ratio `(sum s)^2 / sum s^2` of singular values `s` (REQ_030's effective
dimensionality) is 1 for a rank-1 matrix and `n` for `n` equal singular values (the `n x n` identity).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
from threadpoolctl import threadpool_limits


# --------------------------------------------------------------------------------- histograms
def bin_edges(low: float, high: float, bins: int) -> np.ndarray:
    """`bins + 1` equal float64 edges over `[low, high]`, as `numpy.histogram` makes them for that range
    (a range of one value is widened by 0.5 each side)."""
    return np.histogram_bin_edges(np.empty(0), bins, range=(float(low), float(high)))


def row_extremes(block: np.ndarray) -> np.ndarray:
    """`(rows, 2)` float64 min and max of each row of `block` `(rows, ...)`."""
    flat = block.reshape(block.shape[0], -1)
    return np.stack([flat.min(axis=1), flat.max(axis=1)], axis=1).astype(np.float64)


def row_counts(block: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """`(rows, bins)` int64 histogram of each row of `block` over equal bins `edges` (see `bin_edges`)."""
    flat = block.reshape(block.shape[0], -1)
    bins, span = len(edges) - 1, (edges[0], edges[-1])
    return np.stack([np.histogram(row, bins, range=span)[0] for row in flat]).astype(np.int64)


def _per_row(arrays: Sequence[da.Array], rows: np.ndarray, fn, width: int, dtype: type) -> list[np.ndarray]:
    """`fn(block)` `(rows, width)` of each array's `rows`, one task per stored chunk, computed together."""
    lazy = []
    for array in arrays:
        picked = array[rows] if rows.size < array.shape[0] else array
        picked = picked.rechunk({axis: -1 for axis in range(1, picked.ndim)})
        lazy.append(picked.map_blocks(fn, drop_axis=list(range(2, picked.ndim)),
                                      chunks=(picked.chunks[0], (width,)), dtype=dtype))
    return list(dask.compute(*lazy))


def extremes(arrays: Sequence[da.Array], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max over all `arrays` of each of their rows `rows` (sorted positions along axis 0)."""
    found = _per_row(arrays, rows, row_extremes, 2, np.float64)
    return np.min([f[:, 0] for f in found], axis=0), np.max([f[:, 1] for f in found], axis=0)


def histogram_rows(arrays: Sequence[da.Array], rows: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """`(len(rows), bins)` counts of the values of all `arrays` in each of their rows `rows` over `edges`."""
    counts = _per_row(arrays, rows, lambda block: row_counts(block, edges), len(edges) - 1, np.int64)
    return np.sum(counts, axis=0, dtype=np.int64)


# ----------------------------------------------------------------------------------- spectra
def singular_values(stack: np.ndarray) -> np.ndarray:
    """Singular values (descending, float64) of the matrices on the last two axes of `stack`."""
    return np.linalg.svd(np.asarray(stack, dtype=np.float64), compute_uv=False)


def participation_ratio(values: np.ndarray) -> np.ndarray:
    """`(sum s)^2 / sum s^2` over the last axis of singular values `s`: 1 at rank 1, `n` for `n` equal ones;
    NaN for a zero matrix."""
    total, squares = values.sum(axis=-1), np.square(values).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(squares > 0, np.square(total) / np.where(squares > 0, squares, 1.0), np.nan)


def spectrum(array: da.Array) -> np.ndarray:
    """Singular values `(n, *batch, min(a, b))` of every epoch of `array` `(n, *batch, a, b)`, one task per
    stored chunk, one BLAS thread per dask thread (as the trajectory pass)."""
    whole = array.rechunk({axis: -1 for axis in range(1, array.ndim)})
    k = min(array.shape[-2:])
    lazy = whole.map_blocks(singular_values, drop_axis=array.ndim - 1, chunks=(*whole.chunks[:-2], (k,)),
                            dtype=np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        return lazy.compute()


def batch_labels(name: str, sizes: dict[str, int]) -> list[str]:
    """One label per matrix of a batch, in C order (`layer0.head1`); `name` alone when there is no batch."""
    if not sizes:
        return [name]
    return [".".join(f"{dim}{i}" for dim, i in zip(sizes, index, strict=True))
            for index in itertools.product(*(range(s) for s in sizes.values()))]
