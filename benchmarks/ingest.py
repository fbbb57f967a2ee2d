"""Snapshot-ingest speed of a paper-size run against writing the same bytes with numpy.

Builds a directory of N safetensors checkpoints of the p=113, d_model=128 model (a real
HookedTransformer's weights with a per-epoch drift), then measures, on the same disk and in the same run:

- baseline: `np.save` of every checkpoint's parameters (already in memory) into one file per checkpoint;
- baseline+load: reading each safetensors file and `np.save`-ing it (the same I/O an ingest must do);
- geostore: `geostore.ingestion.ingest(source, store, flatness=None)` into a fresh store (weights only;
  benchmarks/flatness.py measures flatness);
- the store-safety share of it: taking and releasing the writer lock plus the check every writer runs
  on a stored store before writing (metadata, presence and size of every committed chunk), and the
  `crc32c` checksums (one write of every parameter array of the run with and without the codec).

Prints checkpoints/s and MB/s for each and the ratios; run with `.venv/bin/python benchmarks/ingest.py`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors.numpy import load_file
from safetensors.torch import save_file
from timing import timed

from geostore.family.modular_addition import MODULAR_ADDITION, model_config
from geostore.ingestion import ingest


def make_run(directory: Path, n: int, p: int, d_model: int) -> list[dict[str, np.ndarray]]:
    """Write n checkpoints `checkpoint_{epoch}.safetensors` and return their parameters."""
    model = MODULAR_ADDITION.model(model_config(p, d_model=d_model))
    table = model.table  # HookedTransformer-layout checkpoints, as geostore train writes on every TransformerLens
    state = {k: torch.as_tensor(v) for k, v in table.state_dict(model.stored(model.build(seed=0))).items()}
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        for value in state.values():
            value.add_(torch.randn(value.shape, generator=generator) * 1e-3)
        save_file({k: v.contiguous() for k, v in state.items()}, directory / f"checkpoint_{i * 100}.safetensors")
        out.append({k: v.numpy().copy() for k, v in state.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    scratch = Path(tempfile.mkdtemp(prefix="geostore-bench-", dir=args.dir))
    try:
        source = scratch / "run"
        source.mkdir()
        params = make_run(source, args.checkpoints, args.p, args.d_model)
        nbytes = sum(v.nbytes for checkpoint in params for v in checkpoint.values())
        files = sorted(source.iterdir())

        def numpy_write() -> None:
            out = scratch / "npy"
            out.mkdir()
            for i, checkpoint in enumerate(params):
                np.save(out / f"{i}.npy", np.concatenate([v.ravel() for v in checkpoint.values()]))

        def numpy_load_write() -> None:
            out = scratch / "npy"
            out.mkdir()
            for i, path in enumerate(files):
                np.save(out / f"{i}.npy", np.concatenate([v.ravel() for v in load_file(path).values()]))

        def geostore_ingest() -> None:
            ingest(source, scratch / "store.zarr", flatness=None, progress=False)

        results = {}
        for name, fn, target in [("numpy write", numpy_write, scratch / "npy"),
                                 ("numpy load+write", numpy_load_write, scratch / "npy"),
                                 ("geostore ingest", geostore_ingest, scratch / "store.zarr")]:
            times = []
            for _ in range(args.repeats):
                shutil.rmtree(target, ignore_errors=True)
                times.append(timed(fn))
            results[name] = statistics.median(times)

        mb = nbytes / 1e6
        print(f"paper-size run: p={args.p}, d_model={args.d_model}, {args.checkpoints} checkpoints, "
              f"{mb:.1f} MB of parameters (median of {args.repeats})")
        for name, seconds in results.items():
            print(f"  {name:<18} {seconds:7.3f} s  {args.checkpoints / seconds:8.1f} ckpt/s  {mb / seconds:8.1f} MB/s")
        base = results["numpy write"]
        print(f"ratio geostore ingest / numpy write (throughput): {base / results['geostore ingest']:.2f}")
        print(f"ratio geostore ingest / numpy load+write (throughput): "
              f"{results['numpy load+write'] / results['geostore ingest']:.2f}")
        print_safety_cost(scratch, params, results["geostore ingest"], args.repeats)
        store_bytes = sum(f.stat().st_size for f in (scratch / "store.zarr").rglob("*") if f.is_file())
        print(f"store size on disk: {store_bytes / 1e6:.1f} MB ({store_bytes / nbytes:.2f} of raw)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def print_safety_cost(scratch: Path, params: list[dict[str, np.ndarray]], ingest_seconds: float,
                      repeats: int) -> None:
    """What one writer's lock and pre-write check, and the chunk checksums, cost beside an ingest."""
    from geostore.store import integrity, lock
    from geostore.store.location import Location

    location = Location.of(scratch / "store.zarr")

    def lock_and_check() -> None:
        key = lock.acquire(location)
        integrity.verify(location)
        lock.release(key)

    guard = statistics.median(timed(lock_and_check) for _ in range(repeats))
    stacked = {name: np.stack([checkpoint[name] for checkpoint in params]) for name in params[0]}

    def write(codecs: tuple) -> None:
        target = scratch / "codec.zarr"
        shutil.rmtree(target, ignore_errors=True)
        group = zarr.open_group(target, mode="w")
        for name, value in stacked.items():
            group.create_array(name, data=value, chunks=(16, *value.shape[1:]), compressors=codecs)

    plain = statistics.median(timed(lambda: write(())) for _ in range(repeats))
    checked = statistics.median(timed(lambda: write((zarr.codecs.Crc32cCodec(),))) for _ in range(repeats))
    print(f"store safety: lock + pre-write check {guard * 1e3:.1f} ms per writer "
          f"({guard / ingest_seconds:.1%} of the ingest); crc32c checksums: write {checked / plain:.2f}x "
          f"the time without ({checked:.3f} s vs {plain:.3f} s)")


if __name__ == "__main__":
    main()
