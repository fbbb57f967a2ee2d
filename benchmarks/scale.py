"""GPT-2-small scale: ingest, PCA, velocity, the viewer and flatness on a 124 M-parameter HookedTransformer run.

Writes `--checkpoints` safetensors checkpoints of a HookedTransformer (default: GPT-2 small's shape, 12 layers,
d_model 768, d_vocab 50257, n_ctx 1024: 124 M parameters, ~500 MB per checkpoint), each a random-walk step of
the last, then measures, each phase in a fresh process (its peak RSS is the process's own):

- numpy: each checkpoint read with safetensors, then its tensors written with `np.save` (write timed apart:
  the raw write speed of the same bytes on the same disk). Both this and the ingest end with `os.sync()`, timed:
  10 GB outgrow the page cache's dirty limit, so what is compared is the disk's pace, not how much of each
  run the cache happened to absorb (unsynced, the two differed by 2x from run to run here);
- ingest: `geostore.ingestion.ingest(run, store, flatness=None)` into a fresh store: MB/s, the ratio to the numpy
  write, peak RSS against one checkpoint's size; then the largest chunk file and the store's size;
- PCA and velocity of `'all'` (the exact float64 Gram pass, then the velocity from the cached pass): time and
  peak RSS; at sizes that fit in memory, checked against numpy's Gram of the checkpoints;
- viewer: `geoview`'s window opened offscreen on the store (trajectory cached by the PCA phase) and the time
  per epoch change (slider moved, every dock repainted);
- flatness: the generic evaluator on a `--probe-batch` x `--probe-seq` token probe with `--directions`
  directions at one epoch (`geostore.landscape.epoch_landscape`): time and peak RSS.

Small runs take seconds (`--layers 2 --d-model 64 --d-vocab 1000 --n-ctx 64 --checkpoints 4`). Run with
`OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/scale.py` (GPT-2 small: ~25 GB of disk under --tmp).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import in_child


def config_of(args: argparse.Namespace) -> dict:
    """A HookedTransformerConfig-like dict of the benchmark's model."""
    return {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.d_model // 64 or 1,
            "d_head": min(64, args.d_model), "d_mlp": 4 * args.d_model, "d_vocab": args.d_vocab,
            "n_ctx": args.n_ctx, "act_fn": "gelu_new", "normalization_type": "LN"}


def write_run(root: Path, config: dict, n: int) -> int:
    """`n` checkpoints `checkpoint_<step>.safetensors` in `root` (a random walk from geostore's initialisation)
    and a config.json; returns the bytes of one checkpoint."""
    import torch
    from safetensors.torch import save_file

    from geostore.family import hooked
    from geostore.family.transformer import HOOKED_TRANSFORMER

    model = HOOKED_TRANSFORMER.model(config)
    state = {k: torch.as_tensor(np.ascontiguousarray(v))
             for k, v in model.table.state_dict(hooked.initial_params(model.table, config, 0)).items()}
    generator = torch.Generator().manual_seed(1)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    for i in range(n):
        for value in state.values():
            value.add_(torch.randn(value.shape, generator=generator), alpha=1e-3)
        save_file(state, root / f"checkpoint_{(i + 1) * 1000}.safetensors")
    return sum(v.numel() * 4 for v in state.values())


def numpy_baseline(run: Path, out: Path) -> tuple[float, float]:
    """Seconds to read every checkpoint with safetensors, and to write its tensors with np.save (apart; the write
    time includes flushing them to the disk at the end)."""
    from safetensors.numpy import load_file

    out.mkdir()
    os.sync()
    read = write = 0.0
    for file in sorted(run.glob("*.safetensors")):
        start = time.perf_counter()
        tensors = load_file(file)
        read += time.perf_counter() - start
        start = time.perf_counter()
        with (out / f"{file.stem}.npy").open("wb") as f:
            for value in tensors.values():
                np.save(f, value)
        write += time.perf_counter() - start
        del tensors
    start = time.perf_counter()
    os.sync()
    return read, write + time.perf_counter() - start


def run_ingest(run: Path, store: Path) -> float:
    """Seconds of the ingest (imports excluded), flushed to the disk as the numpy baseline is."""
    from geostore.ingestion import ingest

    os.sync()
    start = time.perf_counter()
    ingest(run, store, flatness=None, progress=False)
    os.sync()
    return time.perf_counter() - start


def run_trajectory(store: Path) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Seconds of `pca('all')` (the Gram pass) and of `velocity('all')` after it, with their values."""
    import geostore

    with geostore.open_store(store) as opened:
        start = time.perf_counter()
        pca = opened.pca("all", 3)
        pca_seconds = time.perf_counter() - start
        start = time.perf_counter()
        speed = np.asarray(opened.velocity("all"))
        velocity_seconds = time.perf_counter() - start
        return pca_seconds, velocity_seconds, np.asarray(pca["explained_variance"]), speed


def reference_trajectory(run: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Explained variance (3 components) and velocity of the checkpoints in numpy float64 (small runs only)."""
    from safetensors.numpy import load_file

    from geostore.family.transformer import HOOKED_TRANSFORMER

    model = HOOKED_TRANSFORMER.model(json.loads((run / "config.json").read_text()))
    rows = []
    for file in sorted(run.glob("*.safetensors"), key=lambda f: int(f.stem.split("_")[-1])):
        stored = model.table.stored(load_file(file), str(file))
        rows.append(np.concatenate([stored[name].ravel() for name in names]).astype(np.float64))
    x = np.stack(rows)
    centred = x - x.mean(axis=0)
    values = np.linalg.svd(centred, compute_uv=False) ** 2 / (len(x) - 1)
    return values[:3], np.linalg.norm(np.diff(x, axis=0), axis=1)


def run_viewer(store: Path, steps: int) -> tuple[float, float, float]:
    """Seconds until geoview's window is on screen and until every dock has its data (`benchmarks/viewer.py`'s
    `open_window`), and the median seconds of an epoch change with every dock repainted."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # benchmarks/viewer.py, under another name: `viewer` is the package (loading the file takes this folder off
    # sys.path, where its name would hide the package)
    spec = importlib.util.spec_from_file_location("viewer_benchmark", Path(__file__).with_name("viewer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from PySide6.QtWidgets import QApplication

    from viewer import palette

    app = QApplication.instance() or QApplication([])
    palette.apply_theme()
    shown, loaded, window = bench.open_window(store)
    n = window.epoch_control.slider.maximum() + 1
    times = bench.scrub(app, window, [(i + 1) % n for i in range(steps)], repaint=True)
    window.close()
    return shown, loaded, float(np.median(times)) / 1e3


def run_flatness(store: Path, batch: int, seq: int, directions: int) -> float:
    """Seconds of flatness with a token probe at the store's first epoch (generic evaluator, float32)."""
    import geostore
    from geostore.landscape import FlatnessSettings, epoch_landscape, model_params

    with geostore.open_store(store) as opened:
        model = opened.model
        probe = np.random.default_rng(0).integers(0, int(opened.config["d_vocab"]), (batch, seq))
        params = model_params(opened, model, opened.params_at(int(opened.epochs[0])))
        settings = FlatnessSettings(n_directions=directions, device="cpu")
        start = time.perf_counter()
        rows = epoch_landscape(params, model, probe, settings, ("flatness",))
        seconds = time.perf_counter() - start
        assert np.isfinite(rows["flatness"]["delta_losses"]).all()
        return seconds


def _files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-vocab", type=int, default=50257)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--checkpoints", type=int, default=16)
    parser.add_argument("--phases", default="ingest,pca,viewer,flatness",
                        help="comma-separated subset of ingest,pca,viewer,flatness (ingest is always run)")
    parser.add_argument("--viewer-steps", type=int, default=10)
    parser.add_argument("--probe-batch", type=int, default=4)
    parser.add_argument("--probe-seq", type=int, default=32)
    parser.add_argument("--directions", type=int, default=2)
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: the system's)")
    args = parser.parse_args()
    phases = set(args.phases.split(","))

    scratch = Path(tempfile.mkdtemp(prefix="geostore-scale-", dir=args.tmp))
    run, store = scratch / "run", scratch / "store.zarr"
    try:
        config = config_of(args)
        _, _, checkpoint = in_child(write_run, run, config, args.checkpoints)
        total = checkpoint * args.checkpoints
        mb = total / 1e6
        print(f"model: {json.dumps(config)}")
        print(f"run: {args.checkpoints} checkpoints of {checkpoint / 1e6:.1f} MB ({mb:.0f} MB); machine: "
              f"{os.cpu_count()} cores")

        _, numpy_rss, (read, write) = in_child(numpy_baseline, run, scratch / "npy")
        shutil.rmtree(scratch / "npy")
        _, ingest_rss, ingest_s = in_child(run_ingest, run, store)
        print(f"numpy: read {mb / read:7.1f} MB/s, write {mb / write:7.1f} MB/s, read+write "
              f"{mb / (read + write):7.1f} MB/s (peak RSS {numpy_rss:.0f} MB)")
        print(f"ingest: {ingest_s:.2f} s, {mb / ingest_s:7.1f} MB/s; ratio to numpy write {write / ingest_s:.2f}, "
              f"to numpy read+write {(read + write) / ingest_s:.2f}")
        print(f"ingest peak RSS: {ingest_rss:.0f} MB = {ingest_rss * 1e6 / checkpoint:.2f} checkpoints")
        files = _files(store)
        largest = max(files, key=lambda f: f.stat().st_size)
        print(f"store: {sum(f.stat().st_size for f in files) / 1e6:.0f} MB in {len(files)} files "
              f"({sum(f.stat().st_size for f in files) / total:.3f} of raw); largest chunk "
              f"{largest.stat().st_size / 2**20:.1f} MiB ({largest.relative_to(store)})")

        if "pca" in phases:
            _, pca_rss, (pca_s, velocity_s, variance, speed) = in_child(run_trajectory, store)
            print(f"pca('all', 3): {pca_s:.2f} s ({mb / pca_s:.0f} MB/s of the store), peak RSS {pca_rss:.0f} MB; "
                  f"velocity after it: {velocity_s:.3f} s")
            if total <= 2**30:
                from geostore.family.transformer import HOOKED_TRANSFORMER

                names = HOOKED_TRANSFORMER.model(config).table.trainable
                ref_variance, ref_speed = reference_trajectory(run, names)
                print(f"  against numpy float64: explained variance rel. error "
                      f"{np.max(np.abs(variance - ref_variance) / ref_variance):.1e}, velocity rel. error "
                      f"{np.max(np.abs(speed - ref_speed) / ref_speed):.1e}")
        if "viewer" in phases:
            _, viewer_rss, (shown, loaded, step_s) = in_child(run_viewer, store, args.viewer_steps)
            print(f"viewer: window on screen {shown:.2f} s, every dock loaded {loaded:.2f} s; epoch change with "
                  f"repaint {step_s * 1e3:.1f} ms (median of {args.viewer_steps}); peak RSS {viewer_rss:.0f} MB")
        if "flatness" in phases:
            _, flat_rss, flat_s = in_child(run_flatness, store, args.probe_batch, args.probe_seq, args.directions)
            print(f"flatness ({args.directions} directions, probe {args.probe_batch} x {args.probe_seq} tokens): "
                  f"{flat_s:.2f} s, peak RSS {flat_rss:.0f} MB = {flat_rss * 1e6 / checkpoint:.2f} checkpoints")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
