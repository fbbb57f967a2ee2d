"""CPU against GPU: flatness (one-sided and antithetic) and the Hessian (Hutchinson + Lanczos) per checkpoint of the
p=113, d_model=128 model, each device timed in the same run on the same store (`benchmarks/pca.py`'s random-walk
checkpoints). Without a CUDA GPU it prints the CPU figures and says so. The trajectory PCA has no GPU path: it is
a float64 Gram pass over the stored chunks, bound by reading them (`benchmarks/pca.py`).

Run `.venv/bin/python benchmarks/device.py [--checkpoints 8 --directions 50]`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pca import build_store


def timed(path: Path, analyses: list[str], device: str, args: argparse.Namespace) -> float:
    """Seconds per checkpoint to add `analyses` to a copy of the store at `path` on `device`."""
    import geostore

    copy = path.with_name(f"{path.stem}-{device}-{'-'.join(analyses)}.zarr")
    shutil.copytree(path, copy)
    start = time.perf_counter()
    hessian = {"hessian_probes": args.probes, "lanczos_steps": args.lanczos} if "hessian" in analyses else {}
    geostore.compute(copy, analyses, n_directions=args.directions, seed=0, device=device, progress=False, **hessian)
    seconds = time.perf_counter() - start
    shutil.rmtree(copy)
    return seconds / args.checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--directions", type=int, default=50)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--lanczos", type=int, default=10)
    args = parser.parse_args()
    import torch

    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    scratch = Path(tempfile.mkdtemp(prefix="geostore-device-"))
    try:
        path = scratch / "run.zarr"
        build_store(path, args.checkpoints)
        print(f"p=113, d_model=128, {args.checkpoints} checkpoints; {args.directions} directions, "
              f"{args.probes} Hutchinson probes, {args.lanczos} Lanczos steps; torch threads {torch.get_num_threads()}")
        if len(devices) == 1:
            print("no CUDA GPU on this machine: CPU figures only")
        else:
            print(f"GPU: {torch.cuda.get_device_name(0)}")
        print(f"  {'analysis':<26}" + "".join(f"{d + ' s/ckpt':>14}" for d in devices)
              + ("" if len(devices) == 1 else f"{'cpu / cuda':>12}"))
        for label, analyses in (("flatness", ["flatness"]), ("flatness + antithetic", ["antithetic"]),
                                ("Hessian (with flatness)", ["hessian"])):
            seconds = [timed(path, analyses, device, args) for device in devices]
            print(f"  {label:<26}" + "".join(f"{s:14.3f}" for s in seconds)
                  + ("" if len(seconds) == 1 else f"{seconds[0] / seconds[1]:12.1f}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
