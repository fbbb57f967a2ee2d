"""`geoview STORE`: the desktop viewer's entry point.

For now a placeholder window that shows what the store holds (the docks arrive with their issue).
It already reads only through the public API (`geostore.open_store`) and reports bad input as one
line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from geostore import GeostoreError, Store, open_store


def build_window(store: Store):
    """The main window for an opened store."""
    from PySide6.QtGui import QFontDatabase
    from PySide6.QtWidgets import QMainWindow, QPlainTextEdit

    window = QMainWindow()
    window.setWindowTitle(f"geoview — {store.path.name}")
    text = QPlainTextEdit(store.describe())
    text.setReadOnly(True)
    text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
    window.setCentralWidget(text)
    window.resize(1000, 600)
    window.statusBar().showMessage(f"{store.epochs.size} epochs — trajectory, velocity and flatness docks: "
                                   "coming with the viewer issue")
    return window


def main(argv: Sequence[str] | None = None) -> int:
    """Run `geoview`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="geoview", description="Desktop viewer of a geostore store.")
    parser.add_argument("store", metavar="STORE", help="a store written by `geostore ingest`")
    args = parser.parse_args(argv)
    try:
        store = open_store(args.store)
    except GeostoreError as exc:
        print(f"geoview: error: {exc}", file=sys.stderr)
        return exc.exit_code

    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = build_window(store)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
