"""geoview speed on a 2,000-epoch store: window open time and time per epoch change (scrubbing).

Writes a real store of synthetic weights (a random walk of a small modular-addition transformer) with
flatness (64 directions), then, offscreen in this process:

- open (cold): `MainWindow` built and shown until every dock has its data; the store's PCA and velocity
  cache is computed here, as on a store's first viewing;
- open (warm): the same on a second window, the cache now in the store;
- epoch change: `slider.setValue(i)` (every dock moves its highlight), then `processEvents()`; and the
  same followed by `window.repaint()`, which paints every dock synchronously — the full cost a user waits.
  Measured over a sequential scrub and over random jumps.

Run with `QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/viewer.py` (the variable is set if absent).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Run as a script, this file's folder comes first on sys.path and its name would hide the `viewer` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def make_store(path: Path, n_epochs: int, n_directions: int) -> None:
    """A store of `n_epochs` random-walk checkpoints with flatness at every epoch."""
    from geostore.family.modular_addition import MODULAR_ADDITION, model_config
    from geostore.store.writer import StoreWriter

    model = MODULAR_ADDITION.model(model_config(23, d_model=32, n_heads=4))
    rng = np.random.default_rng(0)
    epochs = np.arange(n_epochs) * 10
    writer = StoreWriter.open(path, model=model, task={"family": "modular_addition", "p": 23})
    state = {q.name: rng.standard_normal(q.shape).astype(np.float32) for q in model.table.parameters}
    batch = 250
    for start in range(0, n_epochs, batch):
        rows = range(start, min(start + batch, n_epochs))
        params = {name: np.empty((len(rows), *value.shape), np.float32) for name, value in state.items()}
        for k, _ in enumerate(rows):
            for name, value in state.items():
                value += 0.01 * rng.standard_normal(value.shape).astype(np.float32)
                params[name][k] = value
        steps = np.asarray(rows) / n_epochs
        writer.append(epochs[list(rows)], params, {"train_loss": 4 * np.exp(-8 * steps), "test_loss": 4 - 3.9 * steps,
                                                   "train_accuracy": np.minimum(1, 10 * steps), "test_accuracy": steps})
    steps = np.arange(n_epochs) / n_epochs
    baseline = 4 * np.exp(-8 * steps)
    deltas = np.abs(rng.standard_normal((n_epochs, n_directions))) * baseline[:, None] * (1.05 - steps)[:, None]
    writer.write_flatness(epochs, baseline, deltas, epsilon=0.1, seed=0)


def open_window(path: Path):
    """(seconds until the window is on screen, seconds until every dock has its data, the window)."""
    from PySide6.QtWidgets import QApplication

    import geostore
    from viewer.data import ViewerData
    from viewer.window import MainWindow

    start = time.perf_counter()
    window = MainWindow(ViewerData(geostore.open_store(path)))
    window.resize(1600, 1000)
    window.show()
    QApplication.processEvents()
    shown = time.perf_counter() - start
    assert window.jobs.wait(600_000)
    return shown, time.perf_counter() - start, window


def scrub(app, window, indices: list[int], *, repaint: bool) -> list[float]:
    """Milliseconds per epoch change over `indices`."""
    out = []
    for index in indices:
        start = time.perf_counter()
        window.epoch_control.slider.setValue(index)
        app.processEvents()
        if repaint:
            window.repaint()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--directions", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="epoch changes per measurement")
    parser.add_argument("--store", type=Path, help="keep the store here (reused if present; default: a temp dir)")
    args = parser.parse_args()

    from PySide6.QtWidgets import QApplication

    from viewer import palette

    app = QApplication.instance() or QApplication([])
    palette.apply_theme()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "bench.zarr"
        if not path.exists():
            start = time.perf_counter()
            make_store(path, args.epochs, args.directions)
            print(f"store: {args.epochs} epochs, {args.directions} flatness directions, written in "
                  f"{time.perf_counter() - start:.1f} s")
        *cold, first = open_window(path)
        first.close()
        *warm, window = open_window(path)
        sequential = list(range(1, min(args.steps, args.epochs - 1) + 1))
        jumps = random.Random(0).choices(range(args.epochs), k=args.steps)
        scrub(app, window, sequential[:20], repaint=True)  # warm-up
        rows = [(f"{name}{' + repaint' if repaint else ''}", scrub(app, window, indices, repaint=repaint))
                for name, indices in (("sequential scrub", sequential), ("random jumps", jumps))
                for repaint in (False, True)]
        window.close()

    print(f"\n{'window open (ms)':<44} {'on screen':>10} {'all loaded':>11}")
    for name, (shown, loaded) in (("cold: PCA and velocity cache computed", cold), ("warm: cache in the store", warm)):
        print(f"{name:<44} {shown * 1e3:10.0f} {loaded * 1e3:11.0f}")
    print(f"\n{'epoch change (ms)':<28} {'median':>8} {'p95':>8} {'max':>8}")
    for name, times in rows:
        p95 = float(np.percentile(times, 95))
        print(f"{name:<28} {statistics.median(times):8.2f} {p95:8.2f} {max(times):8.2f}")


if __name__ == "__main__":
    main()
