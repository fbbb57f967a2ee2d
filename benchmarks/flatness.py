"""Flatness speed and exactness on one paper-size checkpoint: the seed's loop against geostore's fast path.

In one run, on the same checkpoint (a seeded random init of the p=113, d_model=128 model), the same seeded
directions and the same torch thread count (torch's default, which the fast path fits to the free cores),
interleaving repeats and keeping the best of each:

- matmul peak: float32 `torch.mm` on large square matrices;
- the irreducible matmul: `act(.) @ (W_out @ W_U)` over all pairs in the evaluator's blocks, alone: the one
  large matmul the loss cannot avoid (the MLP output over every pair), so its rate at this shape bounds the
  fraction of peak any exact evaluation reaches;
- seed loop: the seed's clone, add epsilon * d, forward the full grid, restore (`evaluator.plain_directional_losses`
  on the installed TransformerLens' model, along the same directions);
- fast path: `flatness_for_params` (what ingest runs), with its counted matmul FLOPs against the peak.

It then compares the deltas of both paths with each other and, for the first few directions, with the
float64 forward of the same loop, and checks that one torch thread gives bit-identical fast deltas.

With `--family mlp` (the reference project's 2-layer MLP, `modulo_addition_2layer_mlp`, p=113, d_hidden=512 by
default) or `--family transformer` (a 2-layer LayerNorm HookedTransformer language model, d_model 128, probe 64 x 32
tokens), each after 50 AdamW steps from its seeded initialisation, it times instead the generic evaluator
(`flatness.directional_losses`, what every family without a fast path runs) against the plain loop
(`evaluator.plain_directional_losses`: perturb the module in place, forward the whole probe, restore), and
compares both paths' deltas in float32 and float64.

With `--contention N` it measures both paths on the modular-addition checkpoint quiet and then beside busy
processes it starts itself (and ends on exit, Ctrl-C or error): 1..N plain Python busy loops and N CPU-bound
multithreaded torch jobs (default torch threads, like a test suite), `--busy` choosing which. It prints one row
per condition (seed loop and fast path ms/direction, speedup, the fast path's loaded/quiet ratio), and checks that
the fast path's results are bit-identical in every condition (geostore fits its thread count to the free cores,
`geostore.threads`). `--fixed` also times the fast path with its thread count held (what a user's
`OMP_NUM_THREADS` does), to show what fitting it buys.

Run with `.venv/bin/python benchmarks/flatness.py` on an otherwise idle machine. `--threads N` sets torch's
count (a count other than torch's default is the user's and geostore keeps it); by default torch's own.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from timing import best_time, timed

from geostore.analysis.evaluator import plain_directional_losses
from geostore.analysis.flatness import flatness_for_params
from geostore.family import modular_addition as fam
from geostore.family.modular_addition_fast import BLOCK_PAIRS, flops_per_weight_set


def matmul_peak(shapes: list[tuple[int, int, int]], repeats: int) -> float:
    """Best float32 `torch.mm` GFLOP/s over `shapes` `(m, k, n)`."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        best = max(best, 2 * m * k * n / best_time(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), repeats) / 1e9)
    return best


def irreducible_matmul(config: dict, repeats: int) -> tuple[float, float]:
    """`(seconds, GFLOP/s)` of `(pairs, d_mlp) @ (d_mlp, p)` over the whole grid in `BLOCK_PAIRS` blocks."""
    p, m = fam.prime_of(config), int(config["d_mlp"])
    rows = max(1, BLOCK_PAIRS // p) * p
    act, fold = torch.rand(p * p, m), torch.randn(m, p)
    seconds = best_time(lambda: [act[i:i + rows] @ fold for i in range(0, p * p, rows)], repeats)
    return seconds, 2 * p * p * m * p / seconds / 1e9


def max_relative(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Largest per-direction relative difference (inf where `want` is exactly 0, as float32 losses can give),
    and largest difference relative to the largest |want|."""
    diff = np.abs(got - want)
    with np.errstate(divide="ignore"):
        return float((diff / np.abs(want)).max()), float(diff.max() / np.abs(want).max())


def trained_mlp(args: argparse.Namespace):
    """The reference project's 2-layer MLP after `--train-steps` full-batch AdamW steps, with its stored params."""
    from geostore.family.mlp import TWO_LAYER_MLP

    model = TWO_LAYER_MLP.model({"p": args.p, "d_hidden": args.d_hidden})
    torch.manual_seed(args.seed)
    module, probe = model.build(None), model.probe()
    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    for _ in range(args.train_steps):  # away from the initialisation, where every delta is ~1e-6
        F.cross_entropy(module(*probe[:2]), probe[2]).backward()
        optimiser.step()
        optimiser.zero_grad()
    params = model.table.stored({k: v.detach().numpy() for k, v in module.state_dict().items()}, "benchmark")
    hidden, w_out = torch.rand(args.p * args.p, args.d_hidden), torch.as_tensor(params["W_out.weight"])
    dense = ("irreducible matmul relu(hidden) @ W_out^T, all pairs", lambda: F.linear(hidden, w_out))
    title = f"family modulo_addition_2layer_mlp: p={args.p} d_hidden={args.d_hidden}"
    return title, model, params, probe, dense


def trained_transformer(args: argparse.Namespace):
    """A 2-layer LayerNorm HookedTransformer language model (d_model 128) after `--train-steps` AdamW steps on
    random tokens, with a probe of `--batch` x `--seq` tokens."""
    from geostore.family.transformer import HOOKED_TRANSFORMER

    config = {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_head": 32, "d_mlp": 512, "d_vocab": args.vocab,
              "n_ctx": args.seq, "act_fn": "gelu", "normalization_type": "LN"}
    model = HOOKED_TRANSFORMER.model(config)
    module = model.build(seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for _ in range(args.train_steps):
        module(tokens, return_type="loss").backward()
        optimiser.step()
        optimiser.zero_grad()
    params = model.stored(module)
    probe = model.probe(torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).numpy())
    title = (f"family hooked_transformer: 2 layers, LN, d_model 128, d_vocab {args.vocab}, probe {args.batch} x "
             f"{args.seq} tokens")
    return title, model, params, probe, None


def generic_benchmark(args: argparse.Namespace) -> None:
    """The generic evaluator against the plain loop on a family without a fast path, and their agreement."""
    from geostore.analysis.flatness import directional_losses

    title, model, params, probe, dense = (trained_mlp if args.family == "mlp" else trained_transformer)(args)
    n = args.directions
    kwargs = {"n_directions": n, "scales": [args.epsilon], "seed": args.seed}

    def generic(dtype: torch.dtype = torch.float32) -> tuple[float, np.ndarray]:
        return directional_losses(params, model, probe, dtype=dtype, **kwargs)

    def plain(dtype: torch.dtype = torch.float32) -> tuple[float, np.ndarray]:
        return plain_directional_losses(params, model, probe, dtype=dtype, **kwargs)

    generic(), plain()  # warm-up
    plain_s, generic_s, dense_s = float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so a busy moment on the machine hits every measurement alike
        if dense is not None:
            dense_s = min(dense_s, best_time(dense[1], 3))
        plain_s = min(plain_s, timed(plain))
        generic_s = min(generic_s, timed(generic))
    (g32_base, g32), (p32_base, p32) = generic(), plain()
    (g64_base, g64), (p64_base, p64) = generic(torch.float64), plain(torch.float64)
    scale = np.abs(g64).max()
    rows = [
        ("plain loop (perturb in place, forward the probe, restore)", f"{1e3 * plain_s / n:8.1f} ms/direction"),
        ("generic evaluator (functional_call, probe blocks)", f"{1e3 * generic_s / n:8.1f} ms/direction"),
        ("speedup", f"{plain_s / generic_s:8.2f} x"),
        *([(dense[0], f"{1e3 * dense_s:8.1f} ms/weight set")] if dense is not None else []),
        ("baseline loss float32 / float64; largest |delta|", f"{g32_base:.9f} / {g64_base:.9f}; {scale:.3e}"),
        ("float64 generic vs plain: max |diff| / max |delta|", f"{np.abs(g64 - p64).max() / scale:.2e} "
         f"(baselines differ by {abs(g64_base - p64_base):.1e})"),
        ("float32 generic vs plain: max |diff| / max |delta|", f"{np.abs(g32 - p32).max() / scale:.2e} "
         f"(baselines differ by {abs(g32_base - p32_base):.1e})"),
        ("float32 generic vs float64: max |diff| / max |delta|", f"{np.abs(g32 - g64).max() / scale:.2e}"),
    ]
    print(f"flatness, {title}, after {args.train_steps} AdamW steps, {n} directions, epsilon={args.epsilon}, "
          f"{args.threads} torch threads, best of {args.repeats}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


# Busy jobs beside the benchmark; each ends itself once its parent is gone (e.g. killed with SIGKILL).
BUSY_JOBS = {
    "python": "import os\nparent = os.getppid()\nprint('ready', flush=True)\nwhile os.getppid() == parent:\n"
              "    for _ in range(10**6):\n        pass\n",
    # like a test suite or a build's CPU-bound steps: torch's default threads, mid-size matmuls and elementwise ops
    "multithreaded": "import os\nimport torch\nparent = os.getppid()\na, x = torch.randn(384, 384), "
                     "torch.randn(200_000)\nprint('ready', flush=True)\nwhile os.getppid() == parent:\n"
                     "    for _ in range(5):\n        a @ a\n    for _ in range(20):\n"
                     "        x = torch.tanh(x) + 0.5 * x.sin()\n",
}


@contextmanager
def busy_jobs(kind: str, n: int) -> Iterator[None]:
    """`n` busy jobs of `kind` (see `BUSY_JOBS`) running beside this process within; killed on exit."""
    jobs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            jobs.append(subprocess.Popen([sys.executable, "-c", BUSY_JOBS[kind]], stdout=subprocess.PIPE, text=True))
        for job in jobs:
            if job.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a busy {kind} job did not start (exit code {job.wait()})")
        yield
    finally:
        for job in jobs:
            job.kill()
        for job in jobs:
            job.wait()


@contextmanager
def fixed_threads() -> Iterator[None]:
    """geostore's thread fitting off within, as a user's `OMP_NUM_THREADS` turns it off (torch is already loaded,
    so its count does not change)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    try:
        yield
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def contention_benchmark(args: argparse.Namespace, seed_loop: Callable[[], object],
                         fast_path: Callable[[], tuple[float, np.ndarray]]) -> None:
    """Seed loop and fast path quiet and beside busy jobs, one row per condition, and whether the fast path's
    results are the same in every condition."""
    conditions = [("quiet", "python", 0)]
    if args.busy in ("python", "both"):
        conditions += [(f"{k} busy-loop process{'es' if k > 1 else ''} beside it", "python", k)
                       for k in range(1, args.contention + 1)]
    if args.busy in ("multithreaded", "both"):
        conditions.append((f"{args.contention} CPU-bound multithreaded torch job{'s' if args.contention > 1 else ''}",
                           "multithreaded", args.contention))
    n, rows, results = args.directions, [], []
    seed_loop(), fast_path()  # warm-up (directions drawn, caches filled)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `busy_jobs` kills its jobs then too
    for label, kind, count in conditions:
        with busy_jobs(kind, count):
            seed_s = fast_s = fixed_s = float("inf")
            for _ in range(args.repeats):  # interleaved: a change of load hits every path alike
                seed_s = min(seed_s, timed(seed_loop))
                fast_s = min(fast_s, timed(lambda: results.append(fast_path())))
                if args.fixed:
                    with fixed_threads():
                        fixed_s = min(fixed_s, timed(fast_path))
        rows.append((label, seed_s, fast_s, fixed_s))
        print(f"  measured: {label}", file=sys.stderr, flush=True)
    quiet = rows[0][2]
    print(f"flatness under contention: p={args.p}, {n} directions, epsilon={args.epsilon}, torch threads "
          f"{torch.get_num_threads()} on {os.cpu_count()} cores (the fast path fits them to the free cores), "
          f"best of {args.repeats}")
    print("| condition | seed loop ms/dir | fast path ms/dir | speedup | fast path loaded/quiet |"
          + (" fast path, threads fixed, ms/dir |" if args.fixed else ""))
    print("|---|---|---|---|---|" + ("---|" if args.fixed else ""))
    for label, seed_s, fast_s, fixed_s in rows:
        print(f"| {label} | {1e3 * seed_s / n:.1f} | {1e3 * fast_s / n:.1f} | {seed_s / fast_s:.1f}x | "
              f"{fast_s / quiet:.2f} |" + (f" {1e3 * fixed_s / n:.1f} |" if args.fixed else ""))
    same = all(r[0] == results[0][0] and np.array_equal(r[1], results[0][1]) for r in results)
    print(f"fast path results bit-identical in every condition: {'yes' if same else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["modular_addition", "mlp", "transformer"], default="modular_addition",
                        help="modular_addition: the fast path against the seed loop; mlp, transformer: the generic "
                             "evaluator against the plain loop on the 2-layer MLP / a 2-layer LN language model")
    parser.add_argument("--vocab", type=int, default=512, help="--family transformer: vocabulary size")
    parser.add_argument("--batch", type=int, default=64, help="--family transformer: probe sequences")
    parser.add_argument("--seq", type=int, default=32, help="--family transformer: probe sequence length")
    parser.add_argument("--d-hidden", type=int, default=512, help="hidden width of --family mlp (the reference's)")
    parser.add_argument("--train-steps", type=int, default=50,
                        help="--family mlp/transformer: AdamW steps from the seeded initialisation")
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--directions", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's own, which geostore fits to the free cores)")
    parser.add_argument("--contention", type=int, metavar="N",
                        help="time both paths quiet and beside busy jobs this benchmark starts (see --busy)")
    parser.add_argument("--busy", choices=["python", "multithreaded", "both"], default="both",
                        help="--contention: 1..N plain Python busy loops, N multithreaded torch jobs, or both")
    parser.add_argument("--fixed", action="store_true",
                        help="--contention: also time the fast path with its thread count held fixed")
    parser.add_argument("--truth", type=int, default=4, help="directions also computed in float64 (slow)")
    args = parser.parse_args()
    if args.contention is not None and args.contention < 1:
        parser.error(f"--contention {args.contention}: must be at least 1 (busy jobs to start)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.family != "modular_addition":
        return generic_benchmark(args)

    config = fam.model_config(args.p, d_model=args.d_model)
    family_model = fam.MODULAR_ADDITION.model(config)
    params = family_model.stored(family_model.build(seed=0))
    probe = fam.probe(args.p)
    n = args.directions
    kwargs = {"n_directions": n, "epsilon": args.epsilon, "seed": args.seed}
    # the seed's loop (clone, perturb, forward, restore) along geostore's directions, on either TransformerLens
    plain_kwargs = {"n_directions": n, "scales": [args.epsilon], "seed": args.seed}
    d, m = int(config["d_model"]), int(config["d_mlp"])
    if args.contention is not None:
        return contention_benchmark(args, lambda: plain_directional_losses(params, family_model, probe, **plain_kwargs),
                                    lambda: flatness_for_params(params, family_model, **kwargs))

    peak, seed_s, fast_s, dense_s = 0.0, float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so a busy moment on the machine hits every measurement alike
        peak = max(peak, matmul_peak([(2048, 2048, 2048), (4096, 1024, 1024)], 3))
        dense_s = min(dense_s, irreducible_matmul(config, 3)[0])
        seed_s = min(seed_s, best_time(lambda: plain_directional_losses(params, family_model, probe, **plain_kwargs),
                                       1))
        fast_s = min(fast_s, best_time(lambda: flatness_for_params(params, family_model, **kwargs), 1))

    seed = plain_directional_losses(params, family_model, probe, **plain_kwargs)[1][0]
    truth = plain_directional_losses(  # the definition in float64: theta + eps d and the loss, no rounding
        params, family_model, probe, **{**plain_kwargs, "n_directions": args.truth}, dtype=torch.float64)[1][0]
    baseline, fast = flatness_for_params(params, family_model, **kwargs)
    torch.set_num_threads(1)
    one_thread = flatness_for_params(params, family_model, **kwargs)
    torch.set_num_threads(args.threads)

    k = args.truth
    flops = flops_per_weight_set(config)
    achieved = flops * (n + 1) / fast_s / 1e9  # n directions and the baseline
    dense_rate = 2 * args.p ** 3 * m / dense_s / 1e9
    per_set_ms = 1e3 * fast_s / (n + 1)
    rows = [
        ("matmul peak (float32 torch.mm, best shape)", f"{peak:8.1f} GFLOP/s"),
        ("seed loop (clone, perturb, forward, restore)", f"{1e3 * seed_s / n:8.1f} ms/direction"),
        ("geostore fast path (flatness_for_params)", f"{1e3 * fast_s / n:8.1f} ms/direction"),
        ("speedup", f"{seed_s / fast_s:8.1f} x"),
        ("counted FLOPs per direction (fast path matmuls)", f"{flops / 1e9:8.3f} GFLOP"),
        ("fast path achieved", f"{achieved:8.1f} GFLOP/s = {100 * achieved / peak:.0f}% of peak"),
        ("irreducible matmul act @ (W_out W_U), alone", f"{dense_rate:8.1f} GFLOP/s = {100 * dense_rate / peak:.0f}% "
         f"of peak, {1e3 * dense_s:.1f} ms = {100 * 1e3 * dense_s / per_set_ms:.0f}% of a loss evaluation"),
        ("baseline loss / largest |delta_loss|", f"{baseline:.6f} / {np.abs(fast).max():.3e}"),
        ("fast vs seed loop: max rel diff (per dir; of max)", "{:.2e}; {:.2e}".format(*max_relative(fast, seed))),
        (f"fast vs float64 forward, {args.truth} dirs", "{:.2e}; {:.2e}".format(*max_relative(fast[:k], truth))),
        (f"seed loop vs float64 forward, {args.truth} dirs", "{:.2e}; {:.2e}".format(*max_relative(seed[:k], truth))),
        ("fast path bit-identical with 1 thread", "yes" if np.array_equal(one_thread[1], fast)
         and one_thread[0] == baseline else "NO"),
    ]
    print(f"flatness: p={args.p} d_model={d} n_heads={config['n_heads']} d_mlp={m}, {n} directions, "
          f"epsilon={args.epsilon}, {args.threads} torch threads, best of {args.repeats}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


if __name__ == "__main__":
    main()
