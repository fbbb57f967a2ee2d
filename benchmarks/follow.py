"""`geoview --follow` latency: from a Recorder's commit in a training process to the followed window's repaint.

Writes a store of `--start` random-walk checkpoints of a small modular-addition transformer (p=23, d_model=32) with
metrics through `geostore.Recorder`, opens a `MainWindow(follow=True)` offscreen on it (the default 1 s poll), then
starts a second process that records `--epochs` more, one every `--every` seconds, each printing the wall-clock
time at which `record` returned (the epoch is committed then). This process runs the window's event loop and, as
soon as the window shows a new epoch with every dock loaded (the slider's range grew, no job running), repaints it
synchronously (`window.repaint()`) and takes the time: latency = repaint time - commit time, per epoch. Also prints
how long each `record` took in the training process.

Run with `.venv/bin/python benchmarks/follow.py` (offscreen; QT_QPA_PLATFORM is set if absent).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Run as a script, this file's folder comes first on sys.path and its name would hide the `viewer` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

P, D_MODEL, N_HEADS = 23, 32, 4


def recorder(path: Path):
    """A Recorder of the benchmark's model into `path`."""
    from geostore import Recorder
    from geostore.family.modular_addition import model_config

    return Recorder(path, family="modular_addition", config=model_config(P, d_model=D_MODEL, n_heads=N_HEADS),
                    task={"p": P})


def walk(model, n: int, seed: int):
    """`n` random-walk state dicts of `model` (a geostore family `Model`)."""
    rng = np.random.default_rng(seed)
    state = {q.name: rng.standard_normal(q.shape).astype(np.float32) for q in model.table.parameters}
    for _ in range(n):
        for value in state.values():
            value += 0.01 * rng.standard_normal(value.shape).astype(np.float32)
        yield model.table.state_dict(state)


def metrics(epoch: int) -> dict[str, float]:
    return {"train_loss": 4 * np.exp(-epoch / 100), "test_loss": 4 - epoch / 100, "test_accuracy": epoch / 1000}


def write(path: Path, first: int, n: int, every: float) -> None:
    """The training process: record `n` epochs after `first`, one every `every` seconds, printing commit times."""
    rec = recorder(path)
    for k, state in enumerate(walk(rec.model, n, seed=1)):
        time.sleep(every)
        epoch = first + k
        began = time.perf_counter()
        rec.record(epoch, state, metrics(epoch))
        print(epoch, time.time(), time.perf_counter() - began, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=50, help="epochs in the store when the window opens")
    parser.add_argument("--epochs", type=int, default=10, help="epochs recorded while the window follows")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between two records")
    parser.add_argument("--writer", nargs=4, metavar=("STORE", "FIRST", "N", "EVERY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        store, first, n, every = args.writer
        write(Path(store), int(first), int(n), float(every))
        return

    import geostore
    from viewer import palette
    from viewer.app import application
    from viewer.data import ViewerData
    from viewer.window import MainWindow

    path = Path(tempfile.mkdtemp()) / "live.zarr"
    rec = recorder(path)
    for epoch, state in enumerate(walk(rec.model, args.start, seed=0)):
        rec.record(epoch, state, metrics(epoch))
    app = application()
    palette.apply_theme()
    data = ViewerData(geostore.open_store(path))
    window = MainWindow(data, index=data.n_epochs - 1, follow=True)
    window.resize(1600, 1000)
    window.show()
    window.jobs.wait()
    app.processEvents()

    committed: dict[int, float] = {}
    record_seconds: list[float] = []
    child = subprocess.Popen([sys.executable, __file__, "--writer", str(path), str(args.start), str(args.epochs),
                              str(args.every)], stdout=subprocess.PIPE, text=True)

    def read() -> None:
        for line in child.stdout:
            epoch, at, took = line.split()
            committed[int(epoch)] = float(at)
            record_seconds.append(float(took))

    reader = threading.Thread(target=read)
    reader.start()
    latencies: dict[int, float] = {}
    shown = data.n_epochs
    last = args.start + args.epochs - 1
    deadline = time.time() + args.epochs * args.every + 60
    while len(latencies) < args.epochs and time.time() < deadline:
        app.processEvents()
        time.sleep(0.002)
        n = window.epoch_control.slider.maximum() + 1
        if n > shown and not window.jobs.busy:
            window.repaint()
            now = time.time()
            for epoch in window.data.epochs[shown:n].tolist():
                latencies[epoch] = now - committed.get(epoch, now)
            shown = n
            assert window.state.index == n - 1, "the slider did not follow the newest epoch"
    child.wait()
    reader.join()
    window.close()
    window.deleteLater()  # gone before the interpreter tears Qt down (else a segfault at exit)
    app.processEvents()
    values = [latencies[e] for e in range(args.start, last + 1) if e in latencies]
    print(f"store of {args.start} epochs (p={P}, d_model={D_MODEL}), {args.epochs} recorded every {args.every:g} s "
          f"by another process; poll every {window.follow_timer.interval()} ms")
    print(f"record (commit) in the training process: median {statistics.median(record_seconds) * 1e3:.0f} ms, "
          f"max {max(record_seconds) * 1e3:.0f} ms")
    print(f"commit -> repaint in geoview --follow: median {statistics.median(values):.2f} s, max {max(values):.2f} s "
          f"over {len(values)} epochs (of {args.epochs}); each: {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
