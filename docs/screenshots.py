"""Render the README's pictures of the single-run viewer from a store, offscreen: the whole window and, one image
each, the docks that share a tab (the loss plane, the weights' distribution over time, the spectra).

    QT_QPA_PLATFORM=offscreen .venv/bin/python docs/screenshots.py demo/store.zarr --epoch 1200 --out docs

The store should hold flatness (`make demo` ingests it) and a loss plane (`geostore plane demo/store.zarr`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SIZE = (1600, 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a store with flatness and a loss plane")
    parser.add_argument("--epoch", type=int, help="the epoch shown (default: the last)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder of the images (docs/)")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import geostore
    from viewer import palette
    from viewer.app import application
    from viewer.data import ViewerData
    from viewer.window import MainWindow

    args.out.mkdir(parents=True, exist_ok=True)
    app = application()
    palette.apply_theme()
    data = ViewerData(geostore.open_store(args.store))
    index = data.n_epochs - 1 if args.epoch is None else data.index_of(args.epoch)
    window = MainWindow(data, index=index)
    window.resize(*SIZE)
    window.show()
    window.jobs.wait()
    app.processEvents()
    saved = [window.grab().save(str(args.out / "geoview.png"))]
    distribution = window.docks["distribution"]
    distribution.set_settings({"source": "weights", "weights_group": "mlp"})
    for name, image in (("distribution", "geoview_weights.png"), ("spectrum", "geoview_spectrum.png"),
                        ("landscape", "geoview_landscape.png")):
        dock = window.docks[name]
        dock.raise_()
        window.jobs.wait()
        app.processEvents()
        saved.append(dock.grab().save(str(args.out / image)))
    window.close()
    print(f"wrote {sum(saved)} of {len(saved)} images to {args.out}")
    return 1 if window.jobs.failures or not all(saved) else 0


if __name__ == "__main__":
    sys.exit(main())
