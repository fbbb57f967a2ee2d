"""The `geostore` command: argument parsing and messages only; the work lives in the library.

Heavy imports (torch, TransformerLens, zarr, dask) happen inside the handlers that need them, so
`geostore --help` answers at once. Errors geostore raises on purpose become one line on stderr
and a non-zero exit code; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from geostore.errors import GeostoreError


def _train(args: argparse.Namespace) -> int:
    from geostore.train import TrainSpec, grokking_summary, train

    defaults = TrainSpec()
    spec = TrainSpec(
        p=args.p or defaults.p,
        d_model=args.d_model or defaults.d_model,
        n_heads=args.n_heads or defaults.n_heads,
        d_mlp=args.d_mlp if args.d_mlp is not None else defaults.d_mlp,
        train_fraction=args.train_fraction or defaults.train_fraction,
        lr=args.lr or defaults.lr,
        weight_decay=args.weight_decay if args.weight_decay is not None else defaults.weight_decay,
        betas=defaults.betas,
        epochs=args.epochs or defaults.epochs,
        model_seed=args.seed if args.seed is not None else defaults.model_seed,
        data_seed=args.data_seed if args.data_seed is not None else defaults.data_seed,
        schedule=args.schedule or defaults.schedule,
    )
    run = train(spec, Path(args.out_dir), progress=not args.quiet, threads=args.threads)
    summary = grokking_summary(run)
    print(f"wrote {len(run['checkpoints'])} checkpoints to {args.out_dir}")
    print(_format_summary(summary))
    return 0


def _format_summary(summary: dict) -> str:
    def at(key: str) -> str:
        return "never" if summary.get(key) is None else f"epoch {summary[key]}"

    return (
        f"train accuracy 100% at {at('train_100')}; test accuracy > 95% at {at('test_95')}; "
        f"final train/test accuracy {summary['final_train_accuracy']:.3f}/{summary['final_test_accuracy']:.3f}"
    )


def _ingest(args: argparse.Namespace) -> int:
    from geostore.ingest import ingest

    report = ingest(args.ckpts, args.store, progress=not args.quiet)
    print(f"{args.store}: added {report.added} epochs from a {report.kind} source "
          f"({report.skipped} already stored); {report.total} epochs in the store")
    return 0


def _info(args: argparse.Namespace) -> int:
    from geostore import open_store

    with open_store(args.store) as store:
        print(store.describe())
    return 0


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
    train.set_defaults(handler=_train)

    ingest = sub.add_parser("ingest", help="write a run's checkpoints into a store (incremental)",
                            description="Read a geostore run directory, a directory of state dicts "
                                        "(.safetensors/.pt/.pth), an ARENA full_run_data.pth bundle or a "
                                        "miscope variant directory, and add every epoch the store lacks.")
    ingest.add_argument("ckpts", metavar="CKPTS", help="checkpoint directory or bundle file")
    ingest.add_argument("store", metavar="STORE", help="Zarr store to create or extend")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.set_defaults(handler=_ingest)

    info = sub.add_parser("info", help="what a store holds")
    info.add_argument("store", metavar="STORE")
    info.set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `geostore` command; returns the exit code (0 on success)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except GeostoreError as exc:
        print(f"geostore: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"geostore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("geostore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
