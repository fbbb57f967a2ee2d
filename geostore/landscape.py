"""Loss-landscape flatness of a store's epochs: the settings, per-batch rows, and filling in what is missing.

Ingest computes flatness for the checkpoints it loads; `geostore flatness STORE` computes it from the
weights already stored (each model rebuilt from the store alone). Either way only epochs whose
flatness is missing are computed, each from its own weights and the seeded directions alone, so
incremental, resumed and reordered runs give bit-identical `delta_losses`. Importing this module is
cheap; torch loads when the first epoch is computed.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from geostore.errors import GeostoreError, StoreError
from geostore.store import schema
from geostore.store.location import Location
from geostore.store.writer import StoreWriter

if TYPE_CHECKING:
    from distributed import Client

    from geostore.store.reader import Store

LOSS_DEFINITION = "mean float32 cross-entropy at the final position over the first p logits, full p*p grid"
DIRECTIONS_DEFINITION = (
    "standard normal over the 9 weight matrices as one vector (schema order), unit L2 norm, "
    "drawn on the CPU from torch.Generator(seed); the same directions at every epoch"
)


@dataclass(frozen=True)
class FlatnessSettings:
    """How flatness is measured: directions per epoch, perturbation size, direction seed, device."""

    n_directions: int = 50
    epsilon: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.n_directions < 1:
            raise StoreError(f"--directions must be at least 1, got {self.n_directions}")
        if not np.isfinite(self.epsilon) or self.epsilon <= 0:
            raise StoreError(f"--epsilon must be a positive number, got {self.epsilon}")

    def attrs(self) -> dict[str, object]:
        """The settings as recorded in the store (the device is informational)."""
        return {
            "epsilon": float(self.epsilon), "n_directions": int(self.n_directions), "seed": int(self.seed),
            "loss": LOSS_DEFINITION, "directions": DIRECTIONS_DEFINITION, "device": self.device,
        }


DEFAULT_FLATNESS = FlatnessSettings()

# Finished epochs are written at least this often (each write rewrites two small chunks).
FLUSH_SECONDS = 0.2


@dataclass(frozen=True)
class FlatnessReport:
    """What a flatness fill did: epochs computed, epochs already complete, seconds spent."""

    computed: int
    already: int
    seconds: float


def check_supported(config: Mapping[str, object], hint: str = "") -> None:
    """Refuse, before anything is written, a model whose loss the flatness evaluator does not implement."""
    from geostore.family.modular_addition_fast import check_config

    try:
        check_config(config)
    except GeostoreError as exc:
        raise GeostoreError(f"flatness: {exc}{hint}") from None


def epoch_flatness(params: Mapping[str, np.ndarray], config: Mapping[str, object], settings: FlatnessSettings
                   ) -> tuple[float, np.ndarray]:
    """Flatness of one epoch from its parameters: `(baseline_loss, delta_losses (n_directions,))`."""
    from geostore.analysis.flatness import flatness_for_params

    return flatness_for_params(params, config, n_directions=settings.n_directions, epsilon=settings.epsilon,
                               seed=settings.seed, device=settings.device)


def fill_missing(
    writer: StoreWriter, settings: FlatnessSettings, *, progress: bool = True, client: Client | None = None
) -> FlatnessReport:
    """Compute flatness for every stored epoch that lacks it, from the stored weights.

    Serially, each stored chunk holding missing epochs is read once; with a `dask.distributed`
    client, each epoch is a task that reads its own weights on a worker. Either way this process
    alone writes, finished epochs at least every `FLUSH_SECONDS`, so a killed run loses little work.
    """
    from geostore.store.reader import open_store

    began = time.perf_counter()
    missing = writer.flatness_missing()
    already = int(writer.epochs.size - missing.size)
    if missing.size == 0:
        return FlatnessReport(0, already, 0.0)
    store = open_store(writer.location)
    results = (_serial_results(store, missing, settings) if client is None
               else _distributed_results(client, store, missing, settings))
    done: list[tuple[int, float, np.ndarray]] = []
    last_flush = time.perf_counter()
    with progress_bar(missing.size, "flatness", progress) as bar:
        for epoch, baseline, deltas in results:
            done.append((epoch, baseline, deltas))
            bar.update(1)
            bar.set_postfix_str(f"{settings.n_directions * bar.n / (time.perf_counter() - began):.0f} dir/s",
                                refresh=False)
            if time.perf_counter() - last_flush > FLUSH_SECONDS:
                _flush(writer, done)
                last_flush = time.perf_counter()
        _flush(writer, done)
    return FlatnessReport(int(missing.size), already, time.perf_counter() - began)


def _flush(writer: StoreWriter, done: list[tuple[int, float, np.ndarray]]) -> None:
    if done:
        epochs, baselines, deltas = zip(*done, strict=True)
        writer.write_flatness(list(epochs), np.array(baselines), np.stack(deltas))
        done.clear()


def _serial_results(store: Store, epochs: np.ndarray, settings: FlatnessSettings
                    ) -> Iterator[tuple[int, float, np.ndarray]]:
    """`(epoch, baseline, deltas)` in epoch order, reading each chunk that holds `epochs` once."""
    index = np.searchsorted(store.epochs, epochs)
    chunk = store.chunk_epochs
    for block in np.unique(index // chunk):
        rows = index[index // chunk == block]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        stored = {name: np.asarray(store.params[name][lo:hi]) for name in schema.PARAMETERS}
        for row in rows:
            params = {name: value[row - lo] for name, value in stored.items()}
            yield (int(store.epochs[row]), *epoch_flatness(params, store.config, settings))


def _distributed_results(client: Client, store: Store, epochs: np.ndarray, settings: FlatnessSettings
                         ) -> Iterator[tuple[int, float, np.ndarray]]:
    """`(epoch, baseline, deltas)` as the cluster's workers finish them (one task per epoch)."""
    from distributed import as_completed

    futures = [client.submit(remote_epoch_flatness, store.location, int(epoch), settings,
                             key=f"geostore-flatness-{store.name}-{int(epoch)}-{uuid.uuid4().hex[:8]}")
               for epoch in epochs]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.cancel(futures)


def remote_epoch_flatness(path: str | Location, epoch: int, settings: FlatnessSettings
                          ) -> tuple[int, float, np.ndarray]:
    """One epoch's flatness on a worker: its weights read from the store, torch on one thread.

    One torch thread per task: a worker runs as many tasks at once as it has dask threads, so the
    cluster uses exactly the cores its workers were given.
    """
    import torch

    from geostore.store.reader import open_store

    torch.set_num_threads(1)
    store = open_store(path)
    return (epoch, *epoch_flatness(store.params_at(epoch), store.config, settings))


def compute_store_flatness(
    store: str | os.PathLike | Location, settings: FlatnessSettings, *, recompute: bool = False,
    progress: bool = True, client: Client | None = None,
) -> FlatnessReport:
    """Add or extend flatness on an existing store from its weights alone (`geostore flatness`)."""
    from geostore.store.reader import open_store

    store = Location.of(store)
    attrs = open_store(store).attrs  # refuses a missing path or a non-store before anything is opened for writing
    check_supported(attrs["model_config"])
    writer = StoreWriter.open(store, config=attrs["model_config"], task=attrs.get("task", {}))
    writer.enable_flatness(settings.attrs(), recompute=recompute)
    return fill_missing(writer, settings, progress=progress, client=client)


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A checkpoint progress bar on stderr, shown on terminals only (logs and pipes get clean lines)."""
    return tqdm(total=total, unit="ckpt", desc=desc, disable=None if progress else True, file=sys.stderr,
                dynamic_ncols=True)
