"""Loss-plane cost per grid point against one flatness direction, same model, same run, same thread count.

Builds a real store of random-walk checkpoints of the p=113, d_model=128 modular-addition model (`pca.py`'s
`build_store`), then, interleaving repeats and keeping the best of each:

- flatness: `flatness.directional_losses` at the last epoch (what ingest runs), seconds per direction;
- plane: `geostore.plane.plane_losses` over rows of the 41-point grid (what `geostore plane` runs), seconds per
  grid point, from the same basis `geostore plane` builds (`geostore.plane.basis`);

and prints their ratio. Both go through the family's batched loss in blocks of `DIRECTION_BLOCK` weight sets; a
row of 41 points is 5 full blocks and one of a single point. With `--full` it then times the whole
`geostore.loss_plane` (41 x 41 by default, PCA included) on the store, as the command runs it.

Run with `.venv/bin/python benchmarks/plane.py` on an otherwise idle machine (see `flatness.py` on OpenMP
threads under contention: `OMP_WAIT_POLICY=PASSIVE`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from pca import build_store
from timing import best_time

import geostore
from geostore.analysis.flatness import directional_losses
from geostore.analysis.plane import plane_axes
from geostore.plane import DEFAULT_SPAN, basis, plane_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="checkpoints in the store")
    parser.add_argument("--resolution", type=int, default=41, help="grid points per axis")
    parser.add_argument("--rows", type=int, default=2, help="grid rows timed per repeat")
    parser.add_argument("--directions", type=int, default=40, help="flatness directions timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--full", action="store_true", help="also time the whole `geostore.loss_plane`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p113.zarr"
        build_store(path, args.epochs)
        store = geostore.open_store(path)
        model = store.model
        params = store.params_at(int(store.epochs[-1]))
        mean, u1, u2 = basis(store, model, "all")
        pc1, pc2 = plane_axes(store.pca("all", 2)["projections"].values, args.resolution, DEFAULT_SPAN)

        def flatness() -> None:
            directional_losses(params, model, n_directions=args.directions, scales=[0.1], seed=0)

        def plane() -> None:
            list(plane_losses(model, None, mean, u1, u2, pc1, pc2, range(args.rows)))

        per_direction = min(best_time(flatness, 1) for _ in range(args.repeats)) / args.directions
        per_point = min(best_time(plane, 1) for _ in range(args.repeats)) / (args.rows * args.resolution)
        print(f"p=113 d_model=128 (D = {model.table.n_trainable():,}), {args.threads} torch threads")
        print(f"flatness: {per_direction * 1e3:.1f} ms per direction ({args.directions} directions)")
        print(f"plane:    {per_point * 1e3:.1f} ms per grid point ({args.rows} rows of {args.resolution})")
        print(f"ratio plane point / flatness direction: {per_point / per_direction:.2f}")
        print(f"estimate of a {args.resolution} x {args.resolution} plane's losses: "
              f"{per_point * args.resolution**2:.0f} s")
        if args.full:
            start = time.perf_counter()
            report = geostore.loss_plane(path, resolution=args.resolution, device="cpu", progress=False)
            seconds = time.perf_counter() - start
            print(f"geostore.loss_plane {args.resolution} x {args.resolution}: {seconds:.1f} s wall "
                  f"({report.computed} rows)")


if __name__ == "__main__":
    main()
