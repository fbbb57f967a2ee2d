"""geoview: the PySide6 + pyqtgraph desktop viewer of geostore stores (reads via `geostore.open_store`)."""
