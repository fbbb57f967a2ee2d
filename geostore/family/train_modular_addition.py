"""Train a modular-addition run and write it as a geostore run directory (checkpoints + run.json).

The loop follows the reference implementation of the grokking runs: full-batch AdamW on a seeded
`train_fraction` of the `p * p` grid, biases frozen at zero so only the 9 weight matrices train,
and checkpoints dense early in the run. Epoch `e` is the state after `e` optimiser steps
(epoch 0 is the initialisation). After every checkpoint `run.json` is rewritten atomically, so a
run killed mid-way still leaves a readable run directory.

The initial weights are geostore's seeded draw (`hooked.initial_params`), so a spec starts from the same
weights on every TransformerLens version; checkpoints are written in the HookedTransformer layout on every
version. The training itself runs on the installed version's model: TransformerBridge (4.x) and
HookedTransformer (3.x) compute the same function but round differently, so runs agree to ~1e-3 after 50
steps and may grok an epoch or so apart.

Importing this module imports torch and TransformerLens (~5 s): keep it off start-up paths.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from geostore.errors import GeostoreError
from geostore.family import modular_addition, tl_compat

RUN_FORMAT = "geostore-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
DEFAULT_SCHEDULE = "auto"


class RunDirError(GeostoreError, ValueError):
    """The output directory of a training run cannot be used (it exists and is not empty)."""


class TrainSpecError(GeostoreError, ValueError):
    """A training spec or checkpoint schedule is invalid (bad schedule grammar, sizes or rates)."""


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines a training run; the defaults are a small run that groks in ~2 minutes.

    Defaults: p=53, d_model=64, 4 heads, d_mlp=256, 40% of the grid for training, AdamW lr 3e-3,
    weight decay 1.0, betas (0.9, 0.98), 6,000 full-batch epochs, "auto" schedule (166 checkpoints).
    Measured on 2 CPU cores, as (model_seed, data_seed): epoch train accuracy hit 100% / epoch test accuracy
    first > 95%:

    - (0, 0), the default, from geostore's own initialisation: 90 / 810 on TransformerLens 4.3
      (TransformerBridge), 90 / 780 on 3.9 (HookedTransformer): the same initial weights, rounded differently;
    - with TransformerLens 3.9's own HookedTransformer initialisation (before geostore drew the weights itself):
      (0, 0) 96 / 2,160 in 129 s (~21 ms per step); (4, 4) 90 / 2,100; (5, 6) 84 / 450 (an early grokker);
      5,000-epoch runs: (1, 1) 90 / 4,000; (2, 2) 95 / 3,400; (3, 0) 95 / 1,950; (0, 3) 95 / 4,250 (the slowest
      seen, hence 6,000 epochs).

    Test accuracy sits at 10-40% for ~2,000 epochs after memorisation before it jumps. Late in
    the run the float32 loss "slingshots" (train loss ~1e-7, then a spike and a fast recovery);
    a checkpoint may catch one. With 30% data it had not grokked by 4,000 epochs; with 50% (or 45%)
    the test accuracy rises too early for a clear delay; lr 1e-3 was too slow.

    `TrainSpec.paper()` is the paper's run (p=113, d_model=128, 30% data, lr 1e-3, 40,000 epochs;
    hours on 2 cores), i.e. `geostore train --p 113 --d-model 128 --train-fraction 0.3 --lr 1e-3
    --weight-decay 1.0 --epochs 40000`.
    """

    p: int = 53
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int | None = None  # None -> 4 * d_model
    train_fraction: float = 0.4
    lr: float = 3e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    epochs: int = 6000
    model_seed: int = 0
    data_seed: int = 0
    schedule: str = DEFAULT_SCHEDULE

    @classmethod
    def paper(cls, **overrides: Any) -> TrainSpec:
        """The run of Nanda et al. 2023 (p=113, d_model=128, 30% data, lr 1e-3, wd 1.0, 40k epochs)."""
        fields = {"p": 113, "d_model": 128, "n_heads": 4, "d_mlp": None, "train_fraction": 0.3, "lr": 1e-3,
                  "weight_decay": 1.0, "betas": (0.9, 0.98), "epochs": 40_000}
        fields.update(overrides)
        return cls(**fields)

    def model_config(self) -> dict[str, object]:
        """The HookedTransformer config of this run (`modular_addition.model_config`)."""
        return modular_addition.model_config(self.p, d_model=self.d_model, n_heads=self.n_heads, d_mlp=self.d_mlp)


def checkpoint_epochs(epochs: int, schedule: str = DEFAULT_SCHEDULE) -> list[int]:
    """The sorted, unique epochs in [0, epochs] at which a run of `epochs` steps saves a checkpoint.

    Grammar (epoch 0 and the final epoch are always included):

    - `"auto"`: dense early, scaled to the run: every `epochs/1000` to 5% of the run, every
      `epochs/200` to 25%, then every `epochs/100` (steps rounded, at least 1): ~165 checkpoints
      for runs of a few thousand epochs or more, every epoch for runs under 150 epochs;
    - `"start:stop:step,..."`: explicit segments, each `range(start, stop, step)` clipped to the run,
      e.g. `"0:1000:10,1000:5000:100"`.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise TrainSpecError(f"epochs must be a non-negative integer, got {epochs!r}")
    spec = schedule.strip()
    points: set[int] = {0, epochs}
    if spec == "auto":
        for start, stop, step in ((0, 0.05, 0.001), (0.05, 0.25, 0.005), (0.25, 1.0, 0.01)):
            points.update(range(round(start * epochs), round(stop * epochs), max(1, round(step * epochs))))
    else:
        if not spec:
            raise TrainSpecError("empty checkpoint schedule: use 'auto' or segments 'start:stop:step,...'")
        for segment in spec.split(","):
            parts = segment.strip().split(":")
            try:
                start, stop, step = (int(x) for x in parts)  # wrong counts fail to unpack
            except ValueError:
                raise TrainSpecError(f"bad checkpoint schedule segment {segment.strip()!r} in {schedule!r}: "
                                     "use 'auto' or segments 'start:stop:step' of integers") from None
            if start < 0 or stop <= start or step < 1:
                raise TrainSpecError(f"bad checkpoint schedule segment {segment.strip()!r}: "
                                     "need 0 <= start < stop and step >= 1")
            points.update(range(start, min(stop, epochs + 1), step))
    return sorted(e for e in points if 0 <= e <= epochs)


def grokking_summary(run: dict) -> dict[str, Any]:
    """When a run memorised and when it generalised, from its run.json dict.

    Keys: `train_100` (first checkpoint epoch with train accuracy 1.0), `test_95` (first with test
    accuracy > 0.95), `final_train_accuracy`, `final_test_accuracy`, `final_epoch`; epochs are None
    when never reached.
    """
    checkpoints = sorted(run["checkpoints"], key=lambda c: c["epoch"])
    if not checkpoints:
        raise ValueError("run has no checkpoints")

    def first(predicate) -> int | None:
        return next((c["epoch"] for c in checkpoints if predicate(c)), None)

    last = checkpoints[-1]
    return {
        "train_100": first(lambda c: c["train_accuracy"] >= 1.0),
        "test_95": first(lambda c: c["test_accuracy"] > 0.95),
        "final_epoch": last["epoch"],
        "final_train_accuracy": last["train_accuracy"],
        "final_test_accuracy": last["test_accuracy"],
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` via a temporary file in the same directory and os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parameters_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as a HookedTransformer state dict (buffers dropped), float32 and contiguous copies."""
    return {key: value.detach().to(torch.float32).contiguous().clone()
            for key, value in tl_compat.hooked_state(model).items()}


def _prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`, refusing one that exists and is not an empty directory."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise RunDirError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()):
            raise RunDirError(f"{out_dir}: directory is not empty; choose a new output directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def train(spec: TrainSpec, out_dir: Path, *, progress: bool = True, threads: int | None = None,
          on_checkpoint: Callable[[int, torch.nn.Module, dict], None] | None = None) -> dict:
    """Train `spec` full-batch and write checkpoints and run.json into the new directory `out_dir`.

    Returns the final run.json dict. `threads` sets torch's intra-op threads (default: unchanged).
    `on_checkpoint(epoch, model, run)` runs after each checkpoint is written (`run`: the run.json dict, the new
    checkpoint's entry last), e.g. to record it into a store as it trains (`geostore.recorder`).
    """
    out_dir = Path(out_dir)
    # Everything that can be wrong with the spec fails here, before any file is written.
    if spec.lr <= 0 or spec.weight_decay < 0 or len(spec.betas) != 2 or not all(0 <= b < 1 for b in spec.betas):
        raise TrainSpecError(f"need lr > 0, weight_decay >= 0 and two betas in [0, 1): got lr={spec.lr}, "
                             f"weight_decay={spec.weight_decay}, betas={spec.betas}")
    sizes = {"p": spec.p, "d_model": spec.d_model, "n_heads": spec.n_heads}
    if spec.d_mlp is not None:
        sizes["d_mlp"] = spec.d_mlp
    bad = [f"{k}={v}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise TrainSpecError(f"sizes must be positive integers: got {', '.join(bad)}")
    if not 0 < spec.train_fraction <= 1:
        raise TrainSpecError(f"train_fraction must be in (0, 1] (some pairs to train on), got {spec.train_fraction}")
    epochs_to_save = checkpoint_epochs(spec.epochs, spec.schedule)
    try:
        config = spec.model_config()
        train_indices = modular_addition.split(spec.p, spec.train_fraction, spec.data_seed)
    except GeostoreError:
        raise
    except ValueError as e:
        raise TrainSpecError(str(e)) from None
    p = spec.p
    _prepare_out_dir(out_dir)
    if threads is not None:
        torch.set_num_threads(threads)

    tokens, labels = modular_addition.probe(p)
    is_train = torch.zeros(p * p, dtype=torch.bool)
    is_train[torch.as_tensor(train_indices)] = True
    train_tokens, train_labels = tokens[is_train], labels[is_train]
    test_labels = labels[~is_train]

    model = modular_addition.MODULAR_ADDITION.model(config).build(seed=spec.model_seed)  # biases zero and frozen
    model.train()
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay, betas=tuple(spec.betas))

    run: dict[str, Any] = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "family": modular_addition.NAME,
        "model_config": dict(config),
        "task": {"p": p, "train_fraction": spec.train_fraction, "data_seed": spec.data_seed,
                 "model_seed": spec.model_seed, "train_indices": [int(i) for i in train_indices]},
        "training": {"optimizer": "AdamW", "lr": spec.lr, "weight_decay": spec.weight_decay,
                     "betas": list(spec.betas), "epochs": spec.epochs, "schedule": spec.schedule},
        "checkpoints": [],
    }
    save_at = set(epochs_to_save)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.epochs, desc="train", unit="epoch", file=sys.stderr, dynamic_ncols=True)

    def checkpoint(epoch: int) -> None:
        with torch.no_grad():
            logits = model(tokens)
        entry = {
            "epoch": epoch,
            "file": f"checkpoint_{epoch:06d}.safetensors",
            "train_loss": modular_addition.loss(logits[is_train], train_labels, p).item(),
            "test_loss": modular_addition.loss(logits[~is_train], test_labels, p).item(),
            "train_accuracy": modular_addition.accuracy(logits[is_train], train_labels, p),
            "test_accuracy": modular_addition.accuracy(logits[~is_train], test_labels, p),
        }
        save_file(_parameters_state(model), str(out_dir / entry["file"]))
        run["checkpoints"].append(entry)
        _write_json_atomic(out_dir / RUN_FILE, run)
        if on_checkpoint is not None:
            on_checkpoint(epoch, model, run)
        if bar is not None:
            bar.set_postfix(train_acc=f"{entry['train_accuracy']:.3f}", test_acc=f"{entry['test_accuracy']:.3f}",
                            refresh=False)

    try:
        model.train()
        if 0 in save_at:
            checkpoint(0)
        for epoch in range(1, spec.epochs + 1):
            optimizer.zero_grad(set_to_none=True)
            modular_addition.loss(model(train_tokens), train_labels, p).backward()
            optimizer.step()
            if epoch in save_at:
                checkpoint(epoch)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return run


def train_into_store(spec: TrainSpec, out_dir: str | os.PathLike, store: str | os.PathLike, *, progress: bool = True,
                     threads: int | None = None, storage_options: dict | None = None) -> dict:
    """`geostore train OUT_DIR --store STORE`: train `spec` into the run directory `out_dir` as `train` does, and
    record every checkpoint into `store` as it is written, with the same task, split, metrics and source record
    that `geostore ingest OUT_DIR STORE --no-flatness` would give (so a later ingest of the run adds nothing)."""
    from geostore.recorder import Recorder
    from geostore.sources import open_source
    from geostore.store.schema import METRICS

    recorder: Recorder | None = None

    def record(epoch: int, model: torch.nn.Module, run: dict) -> None:
        nonlocal recorder
        if recorder is None:  # the first checkpoint is written: the run directory says what an ingest would store
            recorder = Recorder.of_run(open_source(out_dir), store, storage_options=storage_options)
        entry = run["checkpoints"][-1]
        recorder.record(epoch, model, {name: entry[name] for name in METRICS})

    return train(spec, Path(out_dir), progress=progress, threads=threads, on_checkpoint=record)
