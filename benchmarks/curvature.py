"""Per-checkpoint cost of each curvature estimator, as a ratio to the one-sided flatness measured in the same run.

On one paper-size checkpoint (a seeded random init of the p=113, d_model=128 model; cost does not depend on the
weights), with the same torch thread count throughout (2 by default), each measurement the best of interleaved
repeats of what ingest runs per epoch (`geostore.landscape.epoch_landscape`):

- one-sided flatness (`--directions` directions and the baseline): the unit every other line is divided by;
- flatness with `--antithetic` (each direction at -epsilon too), and the antithetic pair added later alone;
- the multi-epsilon profile (`--profile-epsilons`, +-epsilon each) and its cost per epsilon;
- one loss evaluation, one exact Hessian-vector product (a Lanczos step) and one Hutchinson probe (products
  taken in blocks of `PROBE_BLOCK`, vectorised);
- the Hessian at the `--hessian` defaults (32 probes, 20 Lanczos steps), measured once: the total alone, with
  every component group's block beside it (what `--hessian` computes: the groups' traces from the same probe
  products, a Lanczos run per group), and the groups' blocks added later to a store holding the total.

Run with `.venv/bin/python benchmarks/curvature.py` on an otherwise idle machine, with `OMP_WAIT_POLICY=PASSIVE`
in the environment when other processes share the cores (see benchmarks/flatness.py).
"""

from __future__ import annotations

import argparse

import torch
from timing import timed

from geostore.analysis.curvature import PROBE_BLOCK, hessian_for_params, loss_hvp, rademacher
from geostore.analysis.evaluator import batched_loss
from geostore.family import modular_addition as fam
from geostore.landscape import FlatnessSettings, HessianSettings, ProfileSettings, epoch_landscape, hessian_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--profile-epsilons", default="0.01,0.03,0.1,0.3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = fam.MODULAR_ADDITION.model(fam.model_config(args.p, d_model=args.d_model))
    params = model.stored(model.build(seed=0))
    defaults = HessianSettings()
    profile = ProfileSettings(tuple(float(e) for e in args.profile_epsilons.split(",")))
    settings = FlatnessSettings(n_directions=args.directions, epsilon=args.epsilon, seed=0, antithetic=True,
                                profile=profile, hessian=defaults)
    hvp, n_params = loss_hvp(params, model)
    probes = rademacher(n_params, PROBE_BLOCK, seed=0)
    weights, loss = batched_loss(model, params)  # the fast path for this model
    weights = {name: value[None] for name, value in weights.items()}

    runs = {
        "flatness": lambda: epoch_landscape(params, model, None, settings, ["flatness"]),
        "flatness + antithetic": lambda: epoch_landscape(params, model, None, settings, ["flatness", "antithetic"]),
        "antithetic alone": lambda: epoch_landscape(params, model, None, settings, ["antithetic"]),
        "profile": lambda: epoch_landscape(params, model, None, settings, ["profile"]),
        "loss": lambda: loss(weights),
        "hvp": lambda: hvp(probes[:1]),
        "probe block": lambda: hvp(probes),
    }
    for fn in runs.values():  # warm-up
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):  # interleaved, so a busy moment on the machine hits every measurement alike
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn))
    def hessian(**options: object) -> float:
        return timed(lambda: hessian_for_params(params, model, n_probes=defaults.n_probes,
                                                iterations=defaults.iterations, seed=0, **options))

    groups = {group: model.table.flat_indices(group) for group in hessian_groups(model.table)}
    hessian_s, grouped_s, later_s = hessian(), hessian(groups=groups), hessian(groups=groups, total=False)

    unit = best["flatness"]
    k = len(profile.epsilons)
    rows = [
        (f"one-sided flatness ({args.directions} directions + baseline)", unit),
        ("flatness with --antithetic (-eps too)", best["flatness + antithetic"]),
        ("antithetic pair added later (both signs)", best["antithetic alone"]),
        (f"profile, {k} epsilons (+-eps each)", best["profile"]),
        ("  per epsilon", best["profile"] / k),
        ("one loss evaluation (fast path)", best["loss"]),
        ("one Hessian-vector product = one Lanczos step", best["hvp"]),
        (f"one Hutchinson probe (in blocks of {PROBE_BLOCK})", best["probe block"] / PROBE_BLOCK),
        (f"--hessian defaults ({defaults.n_probes} probes + {defaults.iterations} Lanczos steps), once", hessian_s),
        (f"  with the blocks of {', '.join(groups)}, once", grouped_s),
        ("  the blocks alone, added later, once", later_s),
    ]
    print(f"curvature cost per checkpoint: p={args.p} d_model={args.d_model} (D={n_params:,}), "
          f"{args.directions} directions, epsilon {args.epsilon}, {args.threads} torch threads, "
          f"best of {args.repeats}")
    width = max(len(label) for label, _ in rows)
    print(f"  {'':<{width}}  {'seconds':>8}  {'x one-sided':>11}")
    for label, seconds in rows:
        print(f"  {label:<{width}}  {seconds:8.3f}  {seconds / unit:11.2f}")
    print(f"  one Hessian-vector product = {best['hvp'] / best['loss']:.1f} loss evaluations; one-sided flatness = "
          f"{unit / best['loss']:.1f}; the groups' blocks cost {grouped_s / hessian_s:.2f}x --hessian without them")


if __name__ == "__main__":
    main()
