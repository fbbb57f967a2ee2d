"""Exact PCA and velocity of a parameter trajectory, from the Gram matrix of its epochs, with Dask.

A trajectory is an `(n_epoch, D)` matrix `X` with `n_epoch << D`. PCA needs only the `n x n` Gram
matrix `G = X X^T` (float64): centring over any set of fit epochs, the eigenvalues and the projection
of every epoch follow from it exactly. Stored chunks are row (epoch) blocks, so `G` is built by row
panels: a panel of rows, held as stored (float32), is multiplied in float64, a block of columns at a time,
with itself (a symmetric rank-k update) and with every row outside it that it still needs, streamed chunk
by chunk. When one panel holds every row (the data fit the memory budget) the data are read once; otherwise
peak memory is the budget and the rows before a panel are read again for it. The rows may be any subset of
epochs: extending a cached `G` with new epochs is the same computation, with the new rows as panels and the
old rows as the stream. A large parameter stored in column blocks too (chunked along its own axes) is summed
block by block, each block's panels as wide as the block.

Velocities (consecutive steps) come from the same pass, as differences of the rows themselves: taking
them from `G` would cancel catastrophically (`||x||^2 ~ 1e3` against late steps of `~1e-3`).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

# Columns converted to float64 at once: panels keep the stored dtype (float32 weights: half the memory of float64
# panels, so twice the rows per panel and fewer re-reads), and every product is taken in float64 over blocks of
# this many columns.
_COLUMN_BLOCK = 2**14


@dataclass(frozen=True)
class TrajectoryPass:
    """What one pass found for one unit (a group of arrays) over its `n` rows.

    `gram` is `(n, n)` float64 with every entry in a computed row or column filled (others 0);
    `steps2[i]` is `||x[i+1] - x[i]||^2` for the requested steps, NaN elsewhere.
    """

    gram: np.ndarray
    steps2: np.ndarray


class _Chunk:
    """One stored chunk of an array, read by the task that uses it.

    Tasks read their own chunks rather than depend on read tasks: dask runs dependency-free read tasks
    early, and the chunks would pile up in memory ahead of the products that consume them. The read runs
    the chunk's task of the array's graph, optimised once (computing a dask slice per chunk costs 20-90 ms
    of graph handling here, against 5 ms for the read itself). A plain class: dask would compute a
    collection held in a dataclass before the task runs.
    """

    __slots__ = ("graph", "key")

    def __init__(self, graph: Mapping, key: tuple) -> None:
        self.graph = graph
        self.key = key

    def read(self, pick: np.ndarray) -> np.ndarray:
        """Rows `pick` (sorted positions in the chunk), flattened; a view when they are consecutive."""
        block = np.asarray(dask.get(self.graph, self.key))
        rows = block.reshape(block.shape[0], -1)
        consecutive = pick.size and pick[-1] - pick[0] + 1 == pick.size
        return rows[pick[0]:pick[-1] + 1] if consecutive else rows[pick]


# --------------------------------------------------------------------------------------- threads
def scheduler_threads() -> int:
    """Threads of the active dask scheduler: all of a distributed client's workers, else the local pool's.

    On a cluster this counts every worker's threads: lanes run in parallel across workers, and a panel
    size fitting the budget for all of them holds in any one process, however tasks are placed.
    """
    if "distributed" in sys.modules:  # no client can be active before distributed is imported
        from distributed import default_client

        try:
            return max(1, sum(default_client().nthreads().values()))
        except ValueError:
            pass
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def panel_rows(width: int, memory_budget: int, *, threads: int, chunk: int, itemsize: int = 8) -> int:
    """Rows per panel so that `threads` panels `width` wide of `itemsize`-byte values fit `memory_budget` bytes.

    Whole stored chunks when possible (a chunk split between two panels is read twice); at least one row.
    """
    rows = memory_budget // (threads * itemsize * max(1, width))
    return int(max(1, rows // chunk * chunk if rows >= chunk else rows))


# ------------------------------------------------------------------------------------ the pass
def trajectory_pass(
    units: Mapping[str, Sequence[da.Array]],
    rows: np.ndarray,
    steps: np.ndarray,
    *,
    memory_budget: int,
) -> dict[str, TrajectoryPass]:
    """Gram rows and squared steps of each unit: arrays `(n, ...)`, each stored column block a piece of work.

    `rows`: positions whose Gram rows to compute, against every row; `steps`: positions `i` whose step
    `x[i+1] - x[i]` to measure, each touching a row of `rows`. Float64 throughout, under the active dask
    scheduler (threaded or distributed) with one BLAS thread per dask thread. Arrays run in one lane per
    dask thread, one after the other within a lane, so at most one panel per thread is held: panels take
    at most `memory_budget` bytes per process. One dask computation per panel.
    """
    arrays = [(unit, piece) for unit, group in units.items() for a in group for piece in _column_pieces(a)]
    n = arrays[0][1].shape[0]
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    steps = np.unique(np.asarray(steps, dtype=np.int64))
    in_rows = np.zeros(n, dtype=bool)
    in_rows[rows] = True
    if steps.size and not np.all(in_rows[steps] | in_rows[steps + 1]):
        raise ValueError("every step to measure must touch a computed row")
    threads = scheduler_threads()
    widths = [int(np.prod(a.shape[1:])) for _, a in arrays]
    size = panel_rows(max(widths), memory_budget, threads=threads, chunk=max(arrays[0][1].chunks[0]),
                      itemsize=max(a.dtype.itemsize for _, a in arrays))
    lanes = _lanes(widths, threads)
    results = {u: TrajectoryPass(np.zeros((n, n)), np.full(max(n - 1, 0), np.nan)) for u in units}
    # Panel of each row; rows outside `rows` (-1) are only read as the stream.
    panel_of = np.full(n, -1)
    panels = [rows[i:i + size] for i in range(0, rows.size, size)]
    for index, panel in enumerate(panels):
        panel_of[panel] = index
    for index, panel in enumerate(panels):
        stream = np.flatnonzero((panel_of < index) | ~in_rows)
        # A step belongs to the pass of the later panel of its two rows.
        mine = steps[np.maximum(panel_of[steps], panel_of[steps + 1]) == index]
        tasks, places = [], []
        for lane in lanes:
            previous: list = []
            for k in lane:
                unit, array = arrays[k]
                mine_tasks = []
                for task, place in _panel_tasks(array, panel, stream, mine, after=previous):
                    mine_tasks.append(task)
                    places.append((unit, place))
                tasks += mine_tasks
                previous = mine_tasks
        with threadpool_limits(limits=1, user_api="blas"):
            outputs = dask.compute(*tasks)
        for (unit, (grows, gcols, step_index)), (block, step_values) in zip(places, outputs, strict=True):
            result = results[unit]
            result.gram[np.ix_(grows, gcols)] += block
            if grows is not gcols:
                result.gram[np.ix_(gcols, grows)] += block.T
            partial = result.steps2[step_index]
            result.steps2[step_index] = np.where(np.isnan(partial), 0.0, partial) + step_values
    return results


def _column_pieces(array: da.Array) -> list[da.Array]:
    """An array's stored column blocks (one per chunk of its own axes), each `(n, ...)` chunked along axis 0 only.

    The Gram matrix and the squared steps are sums over columns, so each piece is a unit of work of its own:
    a panel holds one piece's width, and a parameter split into chunks along its own axes (a large one) is
    read once, in panels of many rows, where its whole width would leave room for one row per panel.
    """
    grid = itertools.product(*(range(k) for k in array.numblocks[1:]))
    return [array.blocks[(slice(None), *index)] for index in grid]


def _lanes(widths: list[int], threads: int) -> list[list[int]]:
    """Arrays (by index) dealt to `threads` lanes, widest first to the least loaded lane."""
    lanes: list[list[int]] = [[] for _ in range(max(1, min(threads, len(widths))))]
    loads = [0] * len(lanes)
    for k in sorted(range(len(widths)), key=lambda k: -widths[k]):
        lane = loads.index(min(loads))
        lanes[lane].append(k)
        loads[lane] += widths[k]
    return lanes


def _panel_tasks(array: da.Array, panel: np.ndarray, stream: np.ndarray, steps: np.ndarray, *, after: list):
    """Delayed tasks of one array in one pass, each with where its output goes: (grows, gcols, steps).

    `panel` and `stream` are sorted, disjoint row positions; every step has a row in the panel. The
    panel is read only once the tasks `after` are done.
    """
    bounds = np.cumsum((0, *array.chunks[0]))
    chunk_of = np.searchsorted(bounds, np.arange(bounds[-1]), side="right") - 1
    blocks = array.to_delayed().reshape(array.numblocks[0])
    graph = dict(blocks[0].__dask_graph__())  # optimised once, shared by every block

    def chunk(c: int) -> _Chunk:
        return _Chunk(graph, blocks[c].key)

    panel_chunks = np.unique(chunk_of[panel])
    loaded = dask.delayed(_gather)([chunk(c) for c in panel_chunks],
                                   [panel[chunk_of[panel] == c] - bounds[c] for c in panel_chunks], after)
    low_in, high_in = np.isin(steps, panel), np.isin(steps + 1, panel)
    inside = steps[low_in & high_in]
    yield (dask.delayed(_self_products)(loaded, np.searchsorted(panel, inside), np.searchsorted(panel, inside + 1)),
           (panel, panel, inside))
    across = steps[low_in ^ high_in]
    mine = np.where(low_in[low_in ^ high_in], across, across + 1)  # the row in the panel
    other = np.where(low_in[low_in ^ high_in], across + 1, across)  # the row in the stream
    for c in np.unique(chunk_of[stream]):
        picked = stream[chunk_of[stream] == c]
        here = chunk_of[other] == c
        yield (dask.delayed(_cross_products)(loaded, chunk(c), picked - bounds[c],
                                             np.searchsorted(panel, mine[here]),
                                             np.searchsorted(picked, other[here])),
               (panel, picked, across[here]))


def _gather(chunks: list[_Chunk], picks: list[np.ndarray], after: list) -> np.ndarray:
    """The panel: the picked rows of each chunk in one array of their dtype, read one chunk at a time."""
    out = None
    start = 0
    for chunk, pick in zip(chunks, picks, strict=True):
        rows = chunk.read(pick)
        if out is None:
            out = np.empty((sum(len(p) for p in picks), rows.shape[1]), dtype=rows.dtype)
        out[start:start + len(pick)] = rows
        start += len(pick)
    return out


def _column_blocks(width: int) -> list[slice]:
    return [slice(start, start + _COLUMN_BLOCK) for start in range(0, width, _COLUMN_BLOCK)]


def _products(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(a @ b.T, ||a[ia[k]] - b[ib[k]]||^2 for each k)` in float64, block of columns by block of columns (no
    float64 copy of a whole panel)."""
    gram = np.zeros((len(a), len(b)))
    steps = np.zeros(len(ia))
    for columns in _column_blocks(a.shape[1]):
        left = a[:, columns].astype(np.float64)
        right = left if b is a else b[:, columns].astype(np.float64)
        gram += np.dot(left, right.T)
        for k, (i, j) in enumerate(zip(ia, ib, strict=True)):
            step = left[i] - right[j]
            steps[k] += step @ step
    return gram, steps


def _self_products(panel: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _products(panel, panel, ia, ib)


def _cross_products(panel: np.ndarray, chunk: _Chunk, pick: np.ndarray, ia: np.ndarray,
                    ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _products(panel, chunk.read(pick), ia, ib)


# -------------------------------------------------------------------------------- PCA from G
@dataclass(frozen=True)
class GramPCA:
    """PCA of a trajectory from its Gram matrix; `weights` `(m, k)` map the fit rows to unit components."""

    projections: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    fit: np.ndarray
    weights: np.ndarray


def pca_from_gram(gram: np.ndarray, n_components: int, fit: np.ndarray | None = None) -> GramPCA:
    """PCA of the rows behind `gram`, fitted on rows `fit` (default: all), projecting every row.

    Centres over the fit rows as scikit-learn does; `explained_variance` divides by `m - 1`. Sign: each
    component's largest-magnitude projection among the fit rows is positive (scikit-learn's
    `svd_flip(u_based_decision=True)`), deterministic and independent of the rows outside the fit.
    Components of zero variance (`k` above the rank) get zero projections.
    """
    n = len(gram)
    fit = np.arange(n) if fit is None else np.asarray(fit, dtype=np.int64)
    m = fit.size
    if m < 2:
        raise ValueError(f"PCA needs at least 2 fit epochs, got {m}")
    if not 1 <= n_components <= m:
        raise ValueError(f"n_components must be between 1 and {m} (the fit epochs), got {n_components}")
    g_all_fit = gram[:, fit]
    dot_mean = g_all_fit.mean(axis=1)  # x_i . mean of the fit rows, for every row i
    mean_sq = dot_mean[fit].mean()  # mean . mean
    cross = g_all_fit - dot_mean[:, None] - dot_mean[fit][None, :] + mean_sq  # (x_i - mean) . (x_j - mean)
    centred = (cross[fit] + cross[fit].T) / 2
    values, vectors = scipy.linalg.eigh(centred, subset_by_index=[m - n_components, m - 1])
    values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
    nonzero = values > values[0] * m * np.finfo(np.float64).eps
    weights = np.where(nonzero, vectors / np.sqrt(np.where(nonzero, values, 1.0)), 0.0)
    weights -= weights.mean(axis=0)  # exactly centred: components = weights^T X_fit, projections unchanged
    projections = cross @ weights
    biggest = np.abs(projections[fit]).argmax(axis=0)
    signs = np.where(projections[fit][biggest, np.arange(n_components)] < 0, -1.0, 1.0)
    total = float(np.trace(centred))
    return GramPCA(
        projections=projections * signs,
        explained_variance=values / (m - 1),
        explained_variance_ratio=values / total if total > 0 else np.zeros_like(values),
        fit=fit,
        weights=weights * signs,
    )


def components(x: da.Array, pca: GramPCA) -> da.Array:
    """Lazy `(k, D)` unit principal axes of `x` (the matrix behind the Gram), matching the projections' signs."""
    return da.from_array(pca.weights.T) @ x[pca.fit].astype(np.float64)


def velocity(steps2: np.ndarray, epochs: np.ndarray, *, per_epoch: bool = False) -> np.ndarray:
    """REQ_029's `||theta[i+1] - theta[i]||` from squared steps; divided by the epoch gap when `per_epoch`."""
    speed = np.sqrt(steps2)
    return speed / np.diff(np.asarray(epochs, dtype=np.float64)) if per_epoch else speed
