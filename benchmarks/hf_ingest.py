"""The `transformers` family on a Pythia-70M-shaped GPT-NeoX: ingest, PCA and flatness against baselines.

Writes `--checkpoints` save_pretrained folders (`checkpoint-<step>/model.safetensors`) of a randomly initialised
GPT-NeoX with the config of EleutherAI/pythia-70m (hidden 512, 6 layers, 8 heads, intermediate 2048, vocab 50304,
rotary_pct 0.25, 2048 positions: 70.4 M parameters, 282 MB per checkpoint in float32), each a small drift of the
last, then measures in the same run, each phase in a fresh process (its peak RSS is the process's):

- ingest: `geostore.ingest.ingest(run, store, flatness=None)`, against the baseline of reading every checkpoint
  with safetensors and `np.save`-ing its tensors (the I/O an ingest must do); MB/s and peak RSS of both;
- PCA: `store.pca("all", 3)` on a fresh store (the Gram pass over every trainable number), against the baseline of
  one read of every checkpoint;
- flatness: ms per direction of the generic evaluator (`analysis.flatness.directional_losses`) on a `--batch` x
  `--seq` token probe, against the plain loop (perturb, forward, restore: `plain_directional_losses`).

Run with `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/hf_ingest.py` (about 3 GB of disk under --tmp).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import in_child


def pythia_70m_config(layers: int):
    """GPT-NeoX with EleutherAI/pythia-70m's architecture (written out here: nothing is downloaded)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=layers, num_attention_heads=8,
                         intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                         use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def write_run(root: Path, n: int, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(pythia_70m_config(layers))
    for i in range(n):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=1e-3)
        model.save_pretrained(root / f"checkpoint-{1000 * (i + 1)}")


def read_and_save(run: Path, out: Path) -> None:
    """The baseline: every checkpoint read with safetensors and its tensors written with np.save."""
    from safetensors.numpy import load_file

    out.mkdir()
    for folder in sorted(run.iterdir()):
        tensors = load_file(folder / "model.safetensors")
        with (out / f"{folder.name}.npy").open("wb") as f:
            for value in tensors.values():
                np.save(f, value)


def read_only(run: Path) -> None:
    from safetensors.numpy import load_file

    for folder in sorted(run.iterdir()):
        load_file(folder / "model.safetensors")


def ingest_run(run: Path, store: Path) -> None:
    from geostore.ingestion import ingest

    ingest(run, store, flatness=None, progress=False)


def pca(store: Path) -> float:
    import geostore

    with geostore.open_store(store) as opened:
        return float(opened.pca("all", min(3, opened.epochs.size))["explained_variance_ratio"][0])


def flatness(store: Path, batch: int, seq: int, directions: int) -> tuple[float, float, float]:
    """`(generic s, plain s, largest |difference|)` of one checkpoint's directional losses."""
    import torch

    import geostore
    from geostore.analysis.evaluator import plain_directional_losses
    from geostore.analysis.flatness import directional_losses

    with geostore.open_store(store) as opened:
        model, epoch = opened.model, int(opened.epochs[-1])
        params = opened.params_at(epoch)
    tokens = torch.randint(0, 50304, (batch, seq), generator=torch.Generator().manual_seed(0)).numpy()
    probe = model.probe(tokens)
    kwargs = {"n_directions": directions, "scales": [0.1], "seed": 0}
    start = time.perf_counter()
    _, generic = directional_losses(params, model, probe, **kwargs)
    generic_s = time.perf_counter() - start
    start = time.perf_counter()
    _, plain = plain_directional_losses(params, model, probe, **kwargs)
    plain_s = time.perf_counter() - start
    return generic_s, plain_s, float(np.abs(generic - plain).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--tmp", default=None, help="folder for the run and the stores (default: the system's)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hf_bench_", dir=args.tmp))
    try:
        run = root / "run"
        seconds, _, _ = in_child(write_run, run, args.checkpoints, args.layers)
        mb = sum(f.stat().st_size for f in run.rglob("*.safetensors")) / 1e6
        print(f"{args.checkpoints} checkpoints of a Pythia-70M-shaped GPT-NeoX ({args.layers} layers): "
              f"{mb:.0f} MB of safetensors, written in {seconds:.1f} s")
        base_s, base_rss, _ = in_child(read_and_save, run, root / "copy")
        ingest_s, ingest_rss, _ = in_child(ingest_run, run, root / "store.zarr")
        print(f"baseline read + np.save  {mb / base_s:7.1f} MB/s  peak RSS {base_rss:7.0f} MB")
        print(f"geostore ingest          {mb / ingest_s:7.1f} MB/s  peak RSS {ingest_rss:7.0f} MB   "
              f"(speed x{base_s / ingest_s:.2f}, RSS x{ingest_rss / base_rss:.2f})")
        read_s, _, _ = in_child(read_only, run)
        pca_s, pca_rss, ratio = in_child(pca, root / "store.zarr")
        print(f"PCA of 'all' (3 components, first time: Gram pass): {pca_s:.2f} s, peak RSS {pca_rss:.0f} MB; "
              f"one safetensors read of the run {read_s:.2f} s (x{pca_s / read_s:.2f}); PC1 holds {ratio:.1%}")
        _, _, (generic_s, plain_s, diff) = in_child(flatness, root / "store.zarr", args.batch, args.seq,
                                                   args.directions)
        n = args.directions
        print(f"flatness, probe {args.batch} x {args.seq} tokens, {n} directions: generic evaluator "
              f"{1e3 * generic_s / n:.0f} ms/direction, plain loop {1e3 * plain_s / n:.0f} ms/direction "
              f"(x{plain_s / generic_s:.2f}); largest |difference| {diff:.1e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
