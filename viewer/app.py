"""`geoview STORE`: the desktop viewer's entry point, on screen or headless (`--screenshot`); a sweep without
`--run` opens in comparison mode (all its runs overlaid), `--run NAME` views one of its runs.

Bad input (no such path, not a store, one epoch, an unreadable store, an epoch not stored) is one
line on stderr, a dialog as well when on screen, and a non-zero exit code — never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from geostore import GeostoreError, StoreError, open_store, open_sweep

if TYPE_CHECKING:
    from viewer.data import ViewerData
    from viewer.sweep_data import SweepViewerData

DEFAULT_SIZE = (1600, 1000)


def parse_size(text: str) -> tuple[int, int]:
    """`WxH` -> (W, H) in pixels, each at least 200."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1600x1000, not {text!r}") from None
    if min(width, height) < 200:
        raise argparse.ArgumentTypeError(f"size {text} is too small (at least 200x200)")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    """The command line of `geoview`."""
    parser = argparse.ArgumentParser(prog="geoview", description="Desktop viewer of a geostore store.")
    parser.add_argument("store", metavar="STORE", help="a store written by `geostore ingest` (a path or URL)")
    parser.add_argument("--run", metavar="NAME", help="in a sweep, the run to view")
    parser.add_argument("--screenshot", metavar="OUT.png", type=Path,
                        help="render the whole window offscreen into this image and exit")
    parser.add_argument("--epoch", type=int, help="open at this stored epoch (default: the first)")
    parser.add_argument("--follow", action="store_true",
                        help="show new epochs as a run records them into the store (`geostore train --store`); "
                             "opens at the newest epoch and follows it unless you move the slider away")
    parser.add_argument("--group", default="all", metavar="G",
                        help="component group of the trajectory (the store's groups; default all)")
    parser.add_argument("--log-epoch", action="store_true",
                        help="draw epoch axes on a log scale (View > Log epoch axis; spreads the early epochs)")
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, metavar="WxH",
                        help=f"window size (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    parser.add_argument("--settings", metavar="FILE.ini",
                        help="keep layout and settings in this INI file (default: $GEOVIEW_SETTINGS, "
                             "else the user's geoview settings; --screenshot uses none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `geoview`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.screenshot is not None:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        data = load_data(args.store, args.run, follow=args.follow)
        index = (data.n_epochs - 1 if args.follow else 0) if args.epoch is None else data.index_of(args.epoch)
        if args.group not in data.groups:
            raise GeostoreError(f"--group {args.group}: not a group of {args.store} ({', '.join(data.groups)})")
    except GeostoreError as exc:
        return fail(str(exc), exc.exit_code, dialog=args.screenshot is None)
    except (OSError, ValueError, KeyError) as exc:
        return fail(f"{args.store}: unreadable store ({exc})", 1, dialog=args.screenshot is None)

    app = application()
    from viewer import palette
    from viewer.compare_window import CompareWindow
    from viewer.sweep_data import SweepViewerData
    from viewer.window import MainWindow, open_settings

    palette.apply_theme()
    settings = None if args.screenshot is not None else open_settings(args.settings)
    if isinstance(data, SweepViewerData):
        window = CompareWindow(data, settings=settings, index=index, group=args.group)
    else:
        window = MainWindow(data, settings=settings, index=index, group=args.group, follow=args.follow)
    if args.log_epoch:
        window.state.set_log_epoch(True)
    if args.screenshot is not None:
        return screenshot(window, args.screenshot, args.size)
    if settings is None or settings.value("window/geometry") is None:
        window.resize(*args.size)
    window.show()
    return app.exec()


def load_data(store: str, run: str | None, *, follow: bool = False) -> ViewerData | SweepViewerData:
    """What the viewer shows of `store`: every run of a sweep when `run` is None (comparison mode), else one run
    (with `follow`, once it holds the two epochs the viewer draws)."""
    from viewer.data import ViewerData
    from viewer.sweep_data import SweepViewerData

    if run is None:
        try:
            sweep = open_sweep(store)
        except StoreError:  # not a sweep (a single store, or nothing: open_store says which)
            sweep = None
        if sweep is not None:
            if follow:
                raise GeostoreError(f"--follow watches one run: add --run (runs of {store}: "
                                    f"{', '.join(sweep.runs)})")
            return SweepViewerData(sweep)
    opened = open_store(store, run)
    return ViewerData(wait_for_epochs(opened) if follow else opened)


def wait_for_epochs(store, needed: int = 2, poll: float = 1.0):
    """`store`, or its first commit holding the `needed` epochs the viewer draws (a run that just began recording
    into it), saying once on stderr that it waits."""
    if store.epochs.size < needed:
        print(f"geoview: {store.path} holds {store.epochs.size} epoch(s); waiting for {needed}", file=sys.stderr)
    while store.epochs.size < needed:
        time.sleep(poll)
        store = store.reopen()
    return store


def screenshot(window, out: Path, size: tuple[int, int]) -> int:
    """Lay out `window` at `size`, wait for its data, render it into `out`; returns the exit code: 1 when a dock
    could not load its data (a damaged store: the image shows which), with the first failure as one line."""
    window.resize(*size)
    window.show()
    if not window.jobs.wait():
        return fail("timed out waiting for the analyses to load", 1, dialog=False)
    application().processEvents()
    image = window.grab()
    window.close()
    if not image.save(str(out)):
        return fail(f"{out}: could not write the image", 1, dialog=False)
    print(f"wrote {out} ({image.width()}x{image.height()})")
    if window.jobs.failures:
        return fail(window.jobs.failures[0], 1, dialog=False)
    return 0


def application():
    """The running QApplication, created if needed."""
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication(sys.argv[:1])


def fail(message: str, code: int, *, dialog: bool) -> int:
    """Report `message` as one line on stderr (and in a dialog when on a screen); returns `code`."""
    print(f"geoview: error: {message}", file=sys.stderr)
    if dialog and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        from PySide6.QtWidgets import QMessageBox

        application()
        QMessageBox.critical(None, "geoview", message)
    return code


if __name__ == "__main__":
    sys.exit(main())
