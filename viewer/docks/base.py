"""`ViewerDock`: what every dock shares — toolbar, busy indicator, export menu, the unavailable state,
epoch axes (click-to-select, linear or log scale, the training phases shaded), hover read-outs and the
current-epoch line.

A dock builds its plots once (`build`), draws the whole-run data once it is loaded, and on every
epoch change (`refresh(index)`) moves only its highlight items: that keeps scrubbing fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QGraphicsItem,
    QHBoxLayout,
    QLabel,
    QMenu,
    QProgressBar,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from viewer import palette
from viewer.axes import Axis
from viewer.data import ViewerData
from viewer.export import export_png, export_svg, write_csv
from viewer.state import ViewerState
from viewer.worker import Jobs

CACHED = QGraphicsItem.CacheMode.DeviceCoordinateCache
EXPORTS = {"png": "PNG image (*.png)", "svg": "SVG vector image (*.svg)", "csv": "CSV data (*.csv)"}


COMBO_CHARACTERS = 7
"""Characters a toolbar combo box keeps visible when the window is narrow."""
HOVER_RADIUS_PX = 24
"""The hover read-out names the nearest drawn point within this many pixels of the pointer."""


class ViewerDock(QDockWidget):
    """Base of the docks; subclasses set `NAME`, `TITLE`, `NEEDS` and implement `build`, `load`, `refresh`, `table`.

    A dock is built empty; `start()` then loads its data.
    """

    NAME = "dock"
    TITLE = "Dock"
    NEEDS: str | None = None
    """`flatness` or `metrics`: the store data without which the dock is shown disabled."""

    def __init__(self, data: ViewerData, state: ViewerState, jobs: Jobs, parent: QWidget | None = None) -> None:
        super().__init__(self.TITLE, parent)
        self.setObjectName(self.NAME)
        self.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.data, self.state, self.jobs = data, state, jobs
        self.reason: str | None = None
        self._running = 0

        self.busy_bar = QProgressBar(maximumWidth=48, maximumHeight=10, textVisible=False, toolTip="computing…")
        self.busy_bar.setRange(0, 0)
        self.export_button = QToolButton(text="Export", toolTip="Save this dock as PNG or SVG, its data as CSV")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.export_button)
        for kind, label in EXPORTS.items():
            menu.addAction(f"Save {label.split(' (')[0]}…", lambda k=kind: self._ask_export(k))
        self.export_button.setMenu(menu)
        # the busy bar takes the export button's place while the dock loads (nothing to export yet), so a
        # loading dock is no wider than a loaded one
        self.corner = QStackedWidget()
        self.corner.addWidget(self.export_button)
        self.corner.addWidget(self.busy_bar)
        self._build_page()
        state.epoch_changed.connect(self._on_epoch_changed)
        state.epoch_axis_changed.connect(self._on_epoch_axis_changed)

    def _build_page(self) -> None:
        """The dock's page on `data`: its toolbar of controls and plots (`build`), or the reason it is unavailable."""
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.setContentsMargins(4, 2, 4, 4)
        layout.setSpacing(2)
        self.toolbar = QHBoxLayout()
        self.toolbar.setSpacing(6)
        layout.addLayout(self.toolbar)
        self.canvas = pg.GraphicsLayoutWidget()
        self.canvas.ci.setContentsMargins(4, 4, 8, 4)
        self.message = QLabel(alignment=Qt.AlignmentFlag.AlignCenter, wordWrap=True)
        self.message.setStyleSheet("color: #6b6b6b; font-size: 12pt; padding: 16px;")
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.canvas)
        self.pages.addWidget(self.message)
        layout.addWidget(self.pages, stretch=1)

        self.epoch_plots: list[pg.PlotItem] = []  # filled by `plot`, for this page's plots
        self.phase_regions: dict[pg.PlotItem, list[pg.LinearRegionItem]] = {}
        self.readouts: dict[pg.PlotItem, pg.TextItem] = {}
        self.reason = self.data.missing(self.NEEDS) if self.NEEDS else None
        self.build()
        self.toolbar.addStretch(1)
        self.toolbar.addWidget(self.corner)
        self.corner.setEnabled(True)
        self._show_busy(False)
        if self.reason:
            self.set_unavailable(self.reason)
        self.canvas.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.setWidget(body)

    def renew(self, data: ViewerData) -> None:
        """Show `data`, the store's newer commit (`geoview --follow`): the page is built again on it and loaded,
        the controls keep their settings. The window calls it only while no job runs, so no result of the old data
        arrives afterwards (`ViewerData.follow` has already loaded what the docks ask for)."""
        settings, old = self.get_settings(), self.widget()
        self.data = data
        self._build_page()
        old.deleteLater()
        self.start()
        self.set_settings(settings)

    def start(self) -> None:
        """Begin loading the dock's data (the window starts the cheap docks first)."""
        if self.reason is None:
            self.load()

    # ------------------------------------------------------------------------ subclass hooks
    def build(self) -> None:
        """Create controls and plot items (empty)."""

    def load(self) -> None:
        """Ask for the whole-run data (usually through `run`) and draw it."""

    def refresh(self, index: int) -> None:
        """Move the highlight items to stored epoch `index`; must stay cheap."""

    def table(self) -> dict[str, np.ndarray]:
        """The dock's data as equal-length named columns, for CSV export."""
        return {}

    def get_settings(self) -> dict:
        """JSON-able settings of the dock's controls, saved between sessions."""
        return {}

    def set_settings(self, settings: dict) -> None:
        """Restore what `get_settings` returned (unknown keys and values are ignored)."""

    # ---------------------------------------------------------------------------- helpers
    @property
    def ready(self) -> bool:
        """Whether the dock has its data and no job of its own is running."""
        return self.reason is None and self._running == 0

    def run(self, fn: Callable[[], object], on_done: Callable[[object], None]) -> None:
        """Run `fn` on the worker thread with this dock's busy indicator, then `on_done(result)` here."""
        self._running += 1
        self._show_busy(True)

        def done(result: object) -> None:
            self._finish()
            on_done(result)
            self.refresh(self.state.index)

        def failed(message: str) -> None:
            self._finish()
            self.set_unavailable(f"Could not load: {message}")

        self.jobs.submit(fn, done, failed)

    def run_unless_cached(self, cached: object | None, fn: Callable[[], object],
                          on_done: Callable[[object], None]) -> None:
        """`on_done(cached)` at once when the data were loaded before, else `run(fn, on_done)`."""
        if cached is None:
            self.run(fn, on_done)
            return
        on_done(cached)
        self.refresh(self.state.index)

    def _finish(self) -> None:
        self._running -= 1
        self._show_busy(self._running > 0)

    def _show_busy(self, busy: bool) -> None:
        self.corner.setCurrentWidget(self.busy_bar if busy else self.export_button)

    def set_unavailable(self, reason: str) -> None:
        """Show `reason` (one line) instead of the plots and disable the controls."""
        self.reason = reason
        self.message.setText(reason)
        self.pages.setCurrentWidget(self.message)
        for i in range(self.toolbar.count()):
            widget = self.toolbar.itemAt(i).widget()
            if widget is not None:
                widget.setEnabled(False)

    def set_available(self) -> None:
        """Undo `set_unavailable`: the plots and the controls back (a dock whose choice changed what it needs)."""
        self.reason = None
        self.pages.setCurrentWidget(self.canvas)
        for i in range(self.toolbar.count()):
            widget = self.toolbar.itemAt(i).widget()
            if widget is not None:
                widget.setEnabled(True)

    def _on_epoch_changed(self, index: int) -> None:
        if self.reason is None:
            self.refresh(index)

    def add_control(self, widget: QWidget, label: str | None = None) -> QWidget:
        """Put a control (with an optional text label before it) in the dock's toolbar."""
        if label:
            self.toolbar.addWidget(QLabel(label))
        self.toolbar.addWidget(widget)
        return widget

    def combo(self, label: str | None, items: dict[str, str], slot: Callable[[], None]) -> QComboBox:
        """A toolbar combo box of `items` (data -> text) calling `slot()` on change."""
        box = QComboBox()
        # shrinks to a few characters (the full text in the drop-down): toolbars never force the window wider
        box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        box.setMinimumContentsLength(COMBO_CHARACTERS)
        for key, text in items.items():
            box.addItem(text, key)
        box.currentIndexChanged.connect(lambda _i: slot())
        return self.add_control(box, label)

    @staticmethod
    def disable_choice(box: QComboBox, key: str, reason: str) -> None:
        """Grey out the item `key` of a combo box, its tooltip saying why."""
        index = box.findData(key)
        box.model().item(index).setEnabled(False)
        box.setItemData(index, reason, Qt.ItemDataRole.ToolTipRole)

    def checkbox(self, text: str, checked: bool, slot: Callable[[], None]) -> QCheckBox:
        """A toolbar check box calling `slot()` on toggle."""
        box = QCheckBox(text, checked=checked)
        box.toggled.connect(lambda _c: slot())
        return self.add_control(box)

    def plot(self, row: int = 0, col: int = 0, *, x_label: str | None = "epoch", y_label: str = "",
             **kwargs) -> pg.PlotItem:
        """A themed plot in the canvas: grid, labelled axes, clicks select the nearest epoch by x."""
        axes = {side: Axis(side) for side in ("left", "bottom", "right")}  # readable log-scale labels
        item = self.canvas.addPlot(row=row, col=col, axisItems=axes, **kwargs)
        item.hideAxis("right")  # shown by the plots that use it
        item.showGrid(x=True, y=True, alpha=palette.GRID_ALPHA)
        if x_label:
            item.setLabel("bottom", self.data.unit if x_label == "epoch" else x_label)
        if y_label:
            item.setLabel("left", y_label)
        item.setMenuEnabled(False)
        for side in ("left", "bottom", "right"):
            item.getAxis(side).enableAutoSIPrefix(False)
            item.getAxis(side).setCacheMode(CACHED)  # axes draw the grid: keep it out of every repaint
        return item

    @staticmethod
    def static(*items: pg.GraphicsObject) -> None:
        """Cache the drawing of items that stay put while scrubbing.

        Moving an epoch line repaints the plot area under it; cached curves are then copied from a
        pixmap instead of redrawn as 2,000-point antialiased paths (about 6x less time per epoch change).
        """
        for item in items:
            for part in (item.curve, item.scatter) if isinstance(item, pg.PlotDataItem) else (item,):
                part.setCacheMode(CACHED)

    @staticmethod
    def set_key(plot: pg.PlotItem, entries: list[tuple[str, str]]) -> None:
        """A one-line legend as the plot's title, a coloured dash before each text: never covers a curve."""
        plot.setTitle("&nbsp;&nbsp;&nbsp;".join(f"<span style='color:{colour}'>━━</span>&nbsp;{text}"
                                                for text, colour in entries), size="9pt")

    # ------------------------------------------------------------------------- epoch axes
    def epoch_axis(self, plot: pg.PlotItem) -> None:
        """Make `plot`'s x axis an epoch axis: clicking selects the nearest stored epoch, the window's log-epoch
        setting applies to it, hovering reads out the nearest point."""

        def clicked(event) -> None:
            if event.button() == Qt.MouseButton.LeftButton and plot.vb.sceneBoundingRect().contains(event.scenePos()):
                self.state.set_index(self.nearest_index(plot.vb.mapSceneToView(event.scenePos()).x()))

        self.canvas.scene().sigMouseClicked.connect(clicked)
        self.epoch_plots.append(plot)
        self.hover(plot)
        self.phase_regions[plot] = [self._phase_region(plot, phase) for phase in self.data.phases]
        if self.state.log_epoch:
            plot.setLogMode(x=True)
            self._place_phases()

    def _phase_region(self, plot: pg.PlotItem, phase: str) -> pg.LinearRegionItem:
        """A faint band behind `plot` over the epochs of training phase `phase` (`Store.phases`)."""
        region = pg.LinearRegionItem(orientation="vertical", movable=False, pen=pg.mkPen(None),
                                     brush=palette.translucent(palette.PHASES[phase], palette.PHASE_ALPHA))
        region.setZValue(-100)
        region.setToolTip(phase.replace("_", " "))
        region.setRegion([self.epoch_x(e) for e in self.data.phases[phase]])
        plot.addItem(region, ignoreBounds=True)
        return region

    def _place_phases(self) -> None:
        for regions in self.phase_regions.values():
            for region, phase in zip(regions, self.data.phases, strict=True):
                region.setRegion([self.epoch_x(e) for e in self.data.phases[phase]])

    def epoch_x(self, epochs: float | np.ndarray) -> float | np.ndarray:
        """Where `epochs` lie in the epoch axes' view coordinates, for items that a plot's log mode does not move
        (lines, scatter items): log10 on a log axis, where epochs <= 0 sit at the axis' left end."""
        if not self.state.log_epoch:
            return epochs
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(np.asarray(epochs) > 0, np.log10(epochs), self._log_range()[0])
        return float(x) if x.ndim == 0 else x

    def nearest_index(self, x: float) -> int:
        """The stored epoch nearest view coordinate `x` of an epoch axis."""
        return self.data.nearest_index(10.0 ** x if self.state.log_epoch else x)

    def _log_range(self) -> tuple[float, float]:
        positive = self.data.x[self.data.x > 0]
        if not positive.size:
            return 0.0, 1.0
        return float(np.log10(positive[0])), float(np.log10(positive[-1]))

    def fit_epochs(self, plot: pg.PlotItem) -> None:
        """Show the whole run on `plot`'s epoch axis."""
        x = self.data.x
        low, high = self._log_range() if self.state.log_epoch else (x[0], x[-1])
        plot.setXRange(low, high, padding=0.02)

    def epoch_line(self, plot: pg.PlotItem) -> pg.InfiniteLine:
        """The current-epoch line of `plot`; dragging it scrubs."""
        line = pg.InfiniteLine(angle=90, movable=True, pen=palette.pen(palette.CURRENT, 1.5),
                               hoverPen=palette.pen(palette.CURRENT, 3))
        line.setZValue(20)
        line.sigDragged.connect(lambda item: self.state.set_index(self.nearest_index(item.value())))
        plot.addItem(line, ignoreBounds=True)
        return line

    def _on_epoch_axis_changed(self, log: bool) -> None:
        for plot in self.epoch_plots:
            plot.setLogMode(x=log)
            self.fit_epochs(plot)
        self._place_phases()
        self.epoch_axis_changed(log)
        if self.reason is None:
            self.refresh(self.state.index)

    def epoch_axis_changed(self, log: bool) -> None:
        """Subclass hook: redo what `PlotItem.setLogMode` does not (items outside the plot, axes it reset)."""

    # -------------------------------------------------------------------------- read-outs
    def hover(self, plot: pg.PlotItem) -> None:
        """Read out the drawn point nearest the pointer in `plot` (its curve's name, x and y) beside it."""
        text = pg.TextItem(color=palette.FOREGROUND, fill=palette.translucent(palette.BACKGROUND, 220),
                           anchor=(-0.05, 1.1))
        text.setZValue(40)
        text.hide()
        plot.addItem(text, ignoreBounds=True)
        self.readouts[plot] = text

    def describe(self, plot: pg.PlotItem, item: pg.PlotDataItem, i: int) -> str:
        """The read-out of point `i` of `item`: on an epoch axis the epoch, then the curve's name (else the y axis'
        label) and value; subclasses override it where their points mean more."""
        x, y = (values[i] for values in self.points_of(item))
        name = item.name() or plot.getAxis("left").labelText
        phase = self.data.phase_at(x) if plot in self.epoch_plots else None
        where = (f"{self.data.unit} {x:g}" + (f" · {phase.replace('_', ' ')}" if phase else "")
                 if plot in self.epoch_plots else f"{plot.getAxis('bottom').labelText} {x:.4g}")
        return f"{where}\n{name}: {y:.4g}"

    def _on_mouse_moved(self, position) -> None:
        for plot, text in self.readouts.items():
            found = self._nearest_point(plot, position) if plot.vb.sceneBoundingRect().contains(position) else None
            if found is None:
                text.hide()
                continue
            item, i, view_x, view_y = found
            text.setText(self.describe(plot, item, i))
            text.setPos(view_x, view_y)
            text.show()

    @staticmethod
    def points_of(item: pg.PlotDataItem) -> tuple[np.ndarray, np.ndarray]:
        """The data coordinates of `item`'s points (a step histogram's bin centres)."""
        x, y = np.asarray(item.xData, dtype=float), np.asarray(item.yData, dtype=float)
        if x.size == y.size + 1:
            x = (x[:-1] + x[1:]) / 2
        return x, y

    @classmethod
    def _nearest_point(cls, plot: pg.PlotItem, position) -> tuple[pg.PlotDataItem, int, float, float] | None:
        """The drawn point nearest scene `position` within `HOVER_RADIUS_PX`: (item, its index, view x, view y)."""
        where = plot.vb.mapSceneToView(position)
        width, height = plot.vb.viewPixelSize()
        best, best_distance = None, HOVER_RADIUS_PX
        for item in plot.listDataItems():
            if not isinstance(item, pg.PlotDataItem) or not item.isVisible() or item.xData is None:
                continue
            x, y = cls.points_of(item)
            log_x, log_y = item.opts["logMode"]
            with np.errstate(divide="ignore", invalid="ignore"):
                view_x = np.log10(x) if log_x else x
                view_y = np.log10(y) if log_y else y
            distance = np.hypot((view_x - where.x()) / width, (view_y - where.y()) / height)
            distance[~np.isfinite(distance)] = np.inf
            if distance.size and distance.min() <= best_distance:
                i = int(np.argmin(distance))
                best_distance = distance[i]
                best = (item, i, float(view_x[i]), float(view_y[i]))
        return best

    # ----------------------------------------------------------------------------- export
    def export(self, kind: str, path: str | os.PathLike) -> Path:
        """Write the dock's plots (`png`, `svg`) or data (`csv`) to `path`."""
        if kind == "png":
            return export_png(self.canvas, path)
        if kind == "svg":
            return export_svg(self.canvas, path, title=f"{self.TITLE} — {self.data.name}")
        if kind == "csv":
            return write_csv(path, self.table())
        raise ValueError(f"unknown export kind {kind!r}")

    def _ask_export(self, kind: str) -> None:
        stem = f"{Path(self.data.name).stem}-{self.NAME}"
        path, _ = QFileDialog.getSaveFileName(self, f"Export {self.TITLE}", f"{stem}.{kind}", EXPORTS[kind])
        if path:
            self.export(kind, path)
