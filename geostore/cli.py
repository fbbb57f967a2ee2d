"""The `geostore` command: argument parsing and messages only; the work lives in the library.

Heavy imports (torch, TransformerLens, zarr, dask) happen inside the handlers that need them, so
`geostore --help` answers at once. Errors geostore raises on purpose become one line on stderr
and a non-zero exit code; no traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from geostore.errors import GeostoreError


def _train(args: argparse.Namespace) -> int:
    from geostore.family.train_modular_addition import TrainSpec, grokking_summary, train

    defaults = TrainSpec()

    def given(value, default):  # 0 (or an empty schedule) is a value, refused or used; None means "not given"
        return default if value is None else value

    spec = TrainSpec(
        p=given(args.p, defaults.p),
        d_model=given(args.d_model, defaults.d_model),
        n_heads=given(args.n_heads, defaults.n_heads),
        d_mlp=given(args.d_mlp, defaults.d_mlp),
        train_fraction=given(args.train_fraction, defaults.train_fraction),
        lr=given(args.lr, defaults.lr),
        weight_decay=given(args.weight_decay, defaults.weight_decay),
        betas=defaults.betas,
        epochs=given(args.epochs, defaults.epochs),
        model_seed=given(args.seed, defaults.model_seed),
        data_seed=given(args.data_seed, defaults.data_seed),
        schedule=given(args.schedule, defaults.schedule),
    )
    if args.store is None:
        run = train(spec, Path(args.out_dir), progress=not args.quiet, threads=args.threads)
    else:
        from geostore.family.train_modular_addition import train_into_store

        run = train_into_store(spec, args.out_dir, args.store, progress=not args.quiet, threads=args.threads)
    summary = grokking_summary(run)
    print(f"wrote {len(run['checkpoints'])} checkpoints to {args.out_dir}"
          + ("" if args.store is None else f" and recorded them into {args.store}"))
    print(_format_summary(summary))
    return 0


def _format_summary(summary: dict) -> str:
    def at(key: str) -> str:
        return "never" if summary.get(key) is None else f"epoch {summary[key]}"

    return (
        f"train accuracy 100% at {at('train_100')}; test accuracy > 95% at {at('test_95')}; "
        f"final train/test accuracy {summary['final_train_accuracy']:.3f}/{summary['final_test_accuracy']:.3f}"
    )


# Arguments of the library (`geostore.api`) -> the options that set them; library errors name the arguments.
FLAGS = {"n_directions": "--directions", "epsilon": "--epsilon", "seed": "--seed", "device": "--device",
         "profile_epsilons": "--profile-epsilons", "profile_relative": "--profile-relative", "hessian": "--hessian",
         "hessian_probes": "--hessian-probes", "lanczos_steps": "--lanczos-steps", "recompute": "--recompute",
         "workers": "--workers", "scheduler": "--scheduler", "run": "--run", "probe": "--probe", "family": "--family",
         "resolution": "--resolution", "span": "--span", "dtype": "--float64", "group": "--group"}


CURVATURE_SETTINGS = ("profile_epsilons", "profile_relative", "hessian_probes", "lanczos_steps")


def _settings(args: argparse.Namespace) -> dict:
    """The landscape options given, as the library's keyword arguments."""
    return {"n_directions": args.directions, "epsilon": args.epsilon, "seed": args.seed, "device": args.device,
            "profile_epsilons": args.profile_epsilons, "profile_relative": args.profile_relative,
            "hessian_probes": args.hessian_probes, "lanczos_steps": args.lanczos_steps, "recompute": args.recompute,
            "workers": args.workers, "scheduler": args.scheduler, "progress": not args.quiet}


def _analyses(args: argparse.Namespace) -> list[str]:
    """The analyses `--antithetic` and `--hessian` ask for besides flatness."""
    return [name for name in ("antithetic", "hessian") if getattr(args, name)]


def _ingest(args: argparse.Namespace) -> int:
    from geostore.api import ingest

    asked = [FLAGS.get(name, f"--{name}") for name in ("antithetic", "hessian", *CURVATURE_SETTINGS)
             if getattr(args, name) is not None and getattr(args, name) is not False]
    if args.no_flatness and asked:
        raise GeostoreError(f"--no-flatness stores the weights alone: drop {', '.join(asked)} or --no-flatness")
    sources = args.ckpts[0] if len(args.ckpts) == 1 else args.ckpts
    result = ingest(sources, args.store, run=args.run, family=args.family, probe=args.probe,
                    analyses=[] if args.no_flatness else ["flatness", *_analyses(args)], **_settings(args))
    reports = result if isinstance(result, dict) else {args.run: result}
    for name, report in reports.items():
        where = args.store if name is None else f"{args.store} run {name}"
        unit = f"{report.unit}s"
        print(f"{where}: added {report.added} {unit} from a {report.kind} source "
              f"({report.skipped} already stored); {report.total} {unit} in the store")
        if report.flatness_computed:
            print(f"{where}: {', '.join(report.analyses)} computed for {report.flatness_computed} {unit}")
        if report.note:
            print(f"geostore: note: {as_flags(report.note)}", file=sys.stderr)
    return 0


def _flatness(args: argparse.Namespace) -> int:
    from geostore.api import compute

    if args.until_idle is not None and not args.follow:
        raise GeostoreError("--until-idle ends --follow: add --follow")
    if args.follow:
        return _follow_flatness(args)
    result = compute(args.store, _analyses(args), run=args.run, probe=args.probe, **_settings(args))
    for name, report in (result if isinstance(result, dict) else {args.run: result}).items():
        _print_flatness(args.store if name is None else f"{args.store} run {name}", report)
    return 0


def _print_flatness(where: str, report) -> None:
    rate = f" in {report.seconds:.1f} s" if report.computed else ""
    print(f"{where}: {', '.join(report.analyses)} computed for {report.computed} epochs{rate} "
          f"({report.already} already complete)", flush=True)


def _follow_flatness(args: argparse.Namespace) -> int:
    from geostore.follow import follow_compute

    where = args.store if args.run is None else f"{args.store} run {args.run}"
    try:
        for report in follow_compute(args.store, _analyses(args), run=args.run, until_idle=args.until_idle,
                                     probe=args.probe, **_settings(args)):
            _print_flatness(where, report)
    except KeyboardInterrupt:
        print(f"{where}: stopped following (every finished pass is kept)", file=sys.stderr)
    return 0


def _plane(args: argparse.Namespace) -> int:
    from geostore.api import loss_plane

    try:
        report = loss_plane(args.store, _group(args.group), run=args.run, resolution=args.resolution,
                            span=args.span, dtype="float64" if args.float64 else None, device=args.device,
                            recompute=args.recompute, workers=args.workers, scheduler=args.scheduler,
                            progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"geostore: interrupted ({args.store} keeps the rows of the plane finished so far: run the same "
              "command again to compute the rest)", file=sys.stderr)
        return 130
    n = report.resolution
    rate = f" in {report.seconds:.1f} s" if report.computed else ""
    print(f"{args.store}: loss plane of group {report.group} ({n} x {n} points, span {report.span:g}): "
          f"{report.computed} rows computed{rate} ({report.already} already complete)")
    return 0


def _families(args: argparse.Namespace) -> int:
    from geostore.family.registry import families

    for name, family in families().items():
        doc = (type(family).__doc__ or "").strip().splitlines()
        print(f"{name:<34} {doc[0] if doc else ''}")
    return 0


def open_store_or_run(store: str, run: str | None):
    """The store at `store`, or its run `run` when it is a sweep."""
    from geostore import open_store

    return open_store(store, run)


def _add_flatness_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe", metavar="FILE",
                        help="token ids (batch, seq) in a .npy or .pt file: the probe of a language model's loss "
                             "(recorded in the store)")
    parser.add_argument("--directions", type=int, metavar="N",
                        help="random unit directions per epoch (default: the store's, else 50)")
    parser.add_argument("--epsilon", type=float, metavar="E",
                        help="perturbation length along each direction (default: the store's, else 0.1)")
    parser.add_argument("--seed", type=int, metavar="S",
                        help="seed of the directions and Hessian probes, the same at every epoch "
                             "(default: the store's, else 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where losses are evaluated (default: CUDA when present)")
    curvature = parser.add_argument_group(
        "curvature", "Measurements the one-sided flatness misses (a store keeps extending those it holds)")
    curvature.add_argument("--antithetic", action="store_true",
                           help="also evaluate each direction at -epsilon: store its curvature part "
                                "[L(θ+εd)+L(θ−εd)]/2 − L(θ) and slope part (about 2x the flatness cost)")
    curvature.add_argument("--profile-epsilons", metavar="E1,E2,...",
                           help="antithetic mean curvature and flatness ratio at each epsilon, along the same "
                                "directions (about 2x the flatness cost per epsilon)")
    curvature.add_argument("--profile-relative", action="store_true",
                           help="profile epsilons are fractions of each epoch's weight norm")
    curvature.add_argument("--hessian", action="store_true",
                           help="Hutchinson estimate of the Hessian trace and the top eigenvalue (Lanczos), by "
                                "exact Hessian-vector products (each about 12 loss evaluations); the same for each "
                                "component group's Hessian block")
    curvature.add_argument("--hessian-probes", type=int, metavar="N",
                           help="Rademacher probes for the trace (default: the store's, else 32)")
    curvature.add_argument("--lanczos-steps", type=int, metavar="K",
                           help="Lanczos steps for the top eigenvalue (default: the store's, else 20)")
    parser.add_argument("--recompute", action="store_true",
                        help="replace stored analyses computed with other settings")
    _add_cluster_options(parser, "flatness")


def _add_cluster_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--workers", type=int, metavar="N",
                        help=f"compute {what} on a local Dask cluster of N single-threaded worker processes")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help=f"compute {what} on an existing Dask cluster (default: $DASK_SCHEDULER_ADDRESS)")


def _info(args: argparse.Namespace) -> int:
    from geostore.store.location import Location
    from geostore.store.sweep import Sweep, is_sweep

    if args.run is None and is_sweep(Location.of(args.store)):
        print(Sweep(args.store).describe())
        return 0
    from geostore.store.integrity import verify

    with open_store_or_run(args.store, args.run) as store:
        verify(store.location)  # a missing or truncated chunk is an error here, not zeros on screen
        print(store.describe())
    return 0


def _check(args: argparse.Namespace) -> int:
    from geostore.store.integrity import check
    from geostore.store.location import Location
    from geostore.store.sweep import Sweep, is_sweep, run_location

    location = Location.of(args.store)
    if args.run is None and is_sweep(location):
        targets = [run_location(location, name) for name in Sweep(location).runs]
    elif args.run is not None:
        targets = [run_location(location, args.run)]
    else:
        targets = [location]
    damaged = 0
    for target in targets:
        report = check(target, deep=not args.quick)
        for problem in report.problems:
            print(problem, file=sys.stderr)
        if report.ok:
            how = "metadata, chunk presence and sizes" if args.quick else "metadata, every chunk and checksum"
            print(f"{target}: ok ({report.epochs} epochs, {report.arrays} arrays, {report.chunks} chunks; {how})")
        damaged += not report.ok
    if damaged:
        print(f"geostore: error: {args.store}: {damaged} damaged store{'s' if damaged > 1 else ''}", file=sys.stderr)
        return 3
    return 0


def _group(text: str) -> str | list[str]:
    """A group name, or comma-separated parameter names."""
    return text.split(",") if "," in text else text


def _epoch_range(text: str) -> tuple[int, int]:
    """`A:B` -> (A, B), an inclusive epoch range."""
    start, _, stop = text.partition(":")
    try:
        return int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want START:STOP, got {text!r}") from None


def _write_table(header: list[str], rows: list[list], csv_path: str | None) -> None:
    """Rows as CSV at `csv_path`, or as an aligned table on stdout."""
    if csv_path:
        import csv

        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        return
    cells = [header, *[[f"{v:.6g}" if isinstance(v, float) else str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _fresh(read, attempts: int = 3):
    """`read()` again on a fresh handle when a writer inserted epochs while it read (it raises, never mixes)."""
    from geostore.store.integrity import StoreChangedError

    for attempt in range(attempts):
        try:
            return read()
        except StoreChangedError:
            if attempt == attempts - 1:
                raise


def _pca(args: argparse.Namespace) -> int:
    if args.shared and args.run is not None:
        raise GeostoreError("--shared fits one basis on several runs of a sweep: use --runs, not --run")
    if args.runs is not None and not args.shared:
        raise GeostoreError("--runs chooses the runs of a shared basis: add --shared")

    def read():
        if args.shared:
            from geostore import open_sweep

            runs = None if args.runs is None else [r for r in args.runs.split(",") if r]
            return open_sweep(args.store).pca(_group(args.group), args.components, runs=runs,
                                              fit_epochs=args.fit_epochs)
        with open_store_or_run(args.store, args.run) as store:
            return store.pca(_group(args.group), args.components, fit_epochs=args.fit_epochs)

    result = _fresh(read)
    ratio = result["explained_variance_ratio"]
    ratios = ", ".join(f"PC{int(c)} {float(r):.4f}" for c, r in zip(ratio["component"].values, ratio.values,
                                                                      strict=True))
    print(f"{args.store}: group {args.group}, explained variance ratio {ratios}", file=sys.stderr)
    projections = result["projections"]
    header = ["epoch", *(f"PC{int(c)}" for c in result["component"].values)]
    if args.shared:  # one row per run and epoch it holds
        rows = [[str(run), int(e), *map(float, p)] for run in projections["run"].values
                for e, p in zip(projections["epoch"].values, projections.sel(run=run).values, strict=True)
                if all(math.isfinite(v) for v in p)]
        header = ["run", *header]
    else:
        rows = [[int(e), *map(float, p)] for e, p in zip(projections["epoch"].values, projections.values,
                                                         strict=True)]
    _write_table(header, rows, args.csv)
    return 0


def _velocity(args: argparse.Namespace) -> int:
    def read():
        with open_store_or_run(args.store, args.run) as store:
            return store.velocity(_group(args.group), per_epoch=args.per_epoch)

    speed = _fresh(read)
    rows = [[int(a), int(b), float(v)] for a, b, v in zip(speed["from_epoch"].values, speed["epoch"].values,
                                                          speed.values, strict=True)]
    _write_table(["from_epoch", "to_epoch", "velocity_per_epoch" if args.per_epoch else "velocity"], rows, args.csv)
    return 0


def _spectrum(args: argparse.Namespace) -> int:
    from geostore.analysis.weights import batch_labels

    def read():
        with open_store_or_run(args.store, args.run) as store:
            return store.spectrum(args.name)

    ratio = _fresh(read)["participation_ratio"]
    labels = batch_labels(args.name, dict(zip(ratio.dims[1:], ratio.shape[1:], strict=True)))
    rows = [[int(e), *map(float, r.ravel())] for e, r in zip(ratio["epoch"].values, ratio.values, strict=True)]
    _write_table(["epoch", *labels], rows, args.csv)
    return 0


def _add_run_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--run", metavar="NAME", help=f"in a sweep, {what}")


def _add_group_options(parser: argparse.ArgumentParser) -> None:
    """STORE, --run and --group: the component group of one store (or run) a command analyses."""
    parser.add_argument("store", metavar="STORE", help="a store (local path or URL) or a sweep with --run")
    _add_run_option(parser, "the run to analyse")
    parser.add_argument("--group", default="all", metavar="G",
                        help="all, embedding, attention, mlp, or comma-separated parameter names (default all)")


def _add_trajectory_options(parser: argparse.ArgumentParser) -> None:
    _add_group_options(parser)
    parser.add_argument("--csv", metavar="OUT", help="write CSV to OUT instead of printing a table")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `geostore` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="geostore",
        description="Weight-space trajectories of training runs, stored as chunked Zarr.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a modular-addition run and write its checkpoints",
                           description="Train (a + b) mod p with full-batch AdamW; the defaults are a "
                                       "small run that groks on 2 CPU cores in minutes. The paper's run: "
                                       "--p 113 --d-model 128 --train-fraction 0.3 --lr 1e-3 --epochs 40000.")
    train.add_argument("out_dir", metavar="OUT_DIR", help="new directory for checkpoints and run.json")
    train.add_argument("--p", type=int, help="the modulus (a prime)")
    train.add_argument("--d-model", type=int, help="residual width")
    train.add_argument("--n-heads", type=int, help="attention heads")
    train.add_argument("--d-mlp", type=int, help="MLP width (default 4 x d_model)")
    train.add_argument("--train-fraction", type=float, help="fraction of the p*p grid used for training")
    train.add_argument("--lr", type=float, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    train.add_argument("--epochs", type=int, help="full-batch optimiser steps")
    train.add_argument("--schedule", help="checkpoint epochs: 'auto' or segments 'start:stop:step,...'")
    train.add_argument("--seed", type=int, help="model initialisation seed")
    train.add_argument("--data-seed", type=int, help="train/test split seed")
    train.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--store", metavar="STORE",
                       help="also record each checkpoint into this store as it trains (created or extended; "
                            "`geoview STORE --follow` watches it)")
    train.set_defaults(handler=_train)

    ingest = sub.add_parser("ingest", help="write a run's checkpoints into a store (incremental)",
                            description="Read a geostore run directory, a directory of state dicts "
                                        "(.safetensors/.pt/.pth), an ARENA full_run_data.pth bundle or a "
                                        "miscope variant directory, and add every epoch the store lacks. "
                                        "Several sources make a sweep: each run goes to runs/<its "
                                        "directory name> of STORE.")
    ingest.add_argument("ckpts", metavar="CKPTS", nargs="+", help="checkpoint directory or bundle file (several: "
                                                                  "a sweep)")
    ingest.add_argument("store", metavar="STORE", help="Zarr store to create or extend: a local path or an fsspec "
                                                       "URL (s3://bucket/run.zarr)")
    _add_run_option(ingest, "the name of the run to write (default: the source directory's name)")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.add_argument("--no-flatness", action="store_true", help="store weights only, no flatness")
    ingest.add_argument("--family", metavar="NAME",
                        help="the model family of the run (default: detected; see `geostore families`)")
    _add_flatness_options(ingest)
    ingest.set_defaults(handler=_ingest)

    flatness = sub.add_parser("flatness", help="add or extend loss-landscape flatness from the stored weights",
                              description="Compute baseline_loss and delta_losses (random-direction "
                                          "perturbations), and the curvature analyses asked for or already "
                                          "stored, for every stored epoch that lacks them, from the weights "
                                          "in the store alone.")
    flatness.add_argument("store", metavar="STORE")
    _add_run_option(flatness, "only this run (default: every run)")
    flatness.add_argument("--quiet", action="store_true", help="no progress bar")
    flatness.add_argument("--follow", action="store_true",
                          help="keep computing epochs as they arrive (a training run recording into the store) "
                               "until interrupted (Ctrl-C: exit 0, finished epochs kept)")
    flatness.add_argument("--until-idle", type=float, metavar="SECONDS",
                          help="with --follow: stop once no epoch arrived for this long")
    _add_flatness_options(flatness)
    flatness.set_defaults(handler=_flatness)

    families = sub.add_parser("families", help="the model families geostore knows (built-in and plug-ins)")
    families.set_defaults(handler=_families)

    info = sub.add_parser("info", help="what a store (or a sweep) holds")
    info.add_argument("store", metavar="STORE")
    _add_run_option(info, "describe this run (default: one line per run)")
    info.set_defaults(handler=_info)

    check = sub.add_parser("check", help="verify a store: metadata, every chunk's presence, size and checksum",
                           description="Read every committed chunk of a store (or of every run of a sweep) and "
                                       "verify it: exits 3 and lists each problem when anything is damaged.")
    check.add_argument("store", metavar="STORE")
    _add_run_option(check, "check this run only (default: every run)")
    check.add_argument("--quick", action="store_true",
                       help="metadata, chunk presence and sizes only (what writers check before writing)")
    check.set_defaults(handler=_check)

    pca = sub.add_parser("pca", help="exact PCA of the weight trajectory (cached in the store)",
                         description="Project every epoch on the principal components of a component group's "
                                     "flattened weights, centred over the fit epochs; prints epoch, PC1.. "
                                     "(explained variance ratios on stderr).")
    _add_trajectory_options(pca)
    pca.add_argument("--components", type=int, default=3, metavar="K", help="principal components (default 3)")
    pca.add_argument("--fit-epochs", type=_epoch_range, metavar="A:B",
                     help="fit the basis on epochs A..B (inclusive) only")
    pca.add_argument("--shared", action="store_true",
                     help="STORE is a sweep: one basis fitted on all its runs' epochs, every run projected on it "
                          "(rows: run, epoch, PC1..)")
    pca.add_argument("--runs", metavar="A,B", help="with --shared, the runs to include (default all)")
    pca.set_defaults(handler=_pca)

    velocity = sub.add_parser("velocity", help="distance moved in weight space between checkpoints",
                              description="||theta[i+1] - theta[i]|| of a component group between consecutive "
                                          "stored epochs (REQ_029's velocity); with --per-epoch divided by the "
                                          "epoch gap.")
    _add_trajectory_options(velocity)
    per = velocity.add_mutually_exclusive_group()
    per.add_argument("--per-epoch", action="store_true",
                     help="the rate per epoch of training: each step divided by its epoch gap")
    per.add_argument("--per-checkpoint", action="store_true",
                     help="step lengths, not divided by the gap (the default; kept for older scripts)")
    velocity.set_defaults(handler=_velocity)

    plane = sub.add_parser("plane", help="the loss on the plane of the trajectory's PC1 and PC2 (stored)",
                           description="Evaluate the loss on an N x N grid of the plane through the PCA origin "
                                       "(the mean of the epochs) spanned by a group's PC1 and PC2, parameters "
                                       "outside the group at their mean; incremental: only rows not stored yet "
                                       "are computed. Read it with Store.loss_plane(group); geoview draws it.")
    _add_group_options(plane)
    plane.add_argument("--resolution", type=int, metavar="N",
                       help="points along each axis (default: the stored plane's, else 41)")
    plane.add_argument("--span", type=float, metavar="S",
                       help="each axis reaches S times the trajectory's half-range either side of its middle "
                            "(default: the stored plane's, else 1.25)")
    plane.add_argument("--float64", action="store_true", help="evaluate in float64 (default float32)")
    plane.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where losses are evaluated (default: CUDA when present)")
    plane.add_argument("--recompute", action="store_true",
                       help="replace a stored plane of other settings, or one whose basis changed")
    _add_cluster_options(plane, "the rows")
    plane.add_argument("--quiet", action="store_true", help="no progress bar")
    plane.set_defaults(handler=_plane)

    spectrum = sub.add_parser("spectrum", help="effective dimensionality of a weight matrix per epoch",
                              description="The participation ratio (sum s)^2 / sum s^2 of the singular values s "
                                          "of a parameter's matrices (last two axes; one column per layer and "
                                          "head) at every stored epoch (REQ_030).")
    spectrum.add_argument("store", metavar="STORE", help="a store (local path or URL) or a sweep with --run")
    spectrum.add_argument("name", metavar="NAME", help="a parameter, e.g. W_Q, or one layer of it, W_in[0]")
    _add_run_option(spectrum, "the run to analyse")
    spectrum.add_argument("--csv", metavar="OUT", help="write CSV to OUT instead of printing a table")
    spectrum.set_defaults(handler=_spectrum)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `geostore` command; returns the exit code (0 on success)."""
    import warnings

    from geostore.errors import GeostoreWarning

    args = build_parser().parse_args(argv)
    where = getattr(args, "store", None) or getattr(args, "out_dir", None)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GeostoreWarning):  # one line, no source location
            print(f"geostore: warning: {as_flags(_one_line(message))}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            warnings.simplefilter("always", GeostoreWarning)
            return args.handler(args)
    except GeostoreError as exc:
        print(f"geostore: error: {as_flags(_one_line(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("geostore: interrupted (the store is as it was before this command)", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"geostore: error: {where}: out of memory (the store is as it was before this command)",
              file=sys.stderr)
        return 1
    except Exception as exc:
        import os

        if os.environ.get("GEOSTORE_DEBUG"):
            raise
        from geostore.errors import describe_foreign

        print(f"geostore: error: {where}: {describe_foreign(exc)}", file=sys.stderr)
        return 1


def as_flags(message: str) -> str:
    """A library message with the arguments it names in backticks (`n_directions`) given as their options."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m[1], m[0]), message)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
