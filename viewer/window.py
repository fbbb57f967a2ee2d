"""The main window: one dock per view around the shared epoch control, menus, layout kept in QSettings.

Like ephyviewer's main window it owns the state and hands it to every dock; docks never talk to each
other. The layout (`saveState`, Qt's own format) and each dock's `get_settings()` (JSON) are saved on
close and restored on open, never pickled.
"""

from __future__ import annotations

import json
import os

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence, QPixmapCache
from PySide6.QtWidgets import QLabel, QMainWindow, QMessageBox, QProgressBar, QToolBar

from viewer.data import ViewerData
from viewer.docks.base import ViewerDock
from viewer.docks.distribution import DistributionDock
from viewer.docks.flatness import FlatnessDock
from viewer.docks.landscape import LandscapeDock
from viewer.docks.profile import ProfileDock
from viewer.docks.spectrum import SpectrumDock
from viewer.docks.training import TrainingDock
from viewer.docks.trajectory import TrajectoryDock
from viewer.docks.velocity import VelocityDock
from viewer.epoch_control import EpochControl
from viewer.gui_gc import GuiThreadCollector
from viewer.state import ViewerState
from viewer.worker import Jobs

SETTINGS_ENV = "GEOVIEW_SETTINGS"
"""Environment variable naming an INI file to keep the settings in (tests point it into a temp dir)."""
LAYOUT_VERSION = 1
LOAD_ORDER = ("training", "flatness", "distribution", "profile", "landscape", "velocity", "spectrum", "trajectory")
FOLLOW_MS = 1000
"""How often a window that follows its store (`geoview --follow`) looks for new epochs."""
PIXMAP_CACHE_KB = 256 * 1024
"""Room for the item caches of every dock (`ViewerDock.static`): Qt's default 10 MB holds about a dozen
plot-sized pixmaps, so with all docks open they evicted each other and every epoch change redrew all."""

KEYS_HELP = """<b>Keys</b><br>
← / → &nbsp; previous / next stored epoch<br>
PgUp / PgDn &nbsp; ten epochs back / forward<br>
Home / End &nbsp; first / last epoch<br>
Space &nbsp; play / pause<br><br>
<b>Mouse</b><br>
click a plot &nbsp; select the nearest epoch (trajectory: the nearest point)<br>
drag the red line &nbsp; scrub<br>
hover &nbsp; read out the nearest point<br>
Ctrl+L &nbsp; log epoch axis<br>
wheel / right-drag &nbsp; zoom; double-click a dock title to float it"""


def open_settings(path: str | os.PathLike | None = None) -> QSettings:
    """The settings store: `path` (an INI file), else `$GEOVIEW_SETTINGS`, else the user's geoview settings."""
    path = path or os.environ.get(SETTINGS_ENV)
    if path:
        return QSettings(str(path), QSettings.Format.IniFormat)
    return QSettings("geostore", "geoview")


class MainWindow(QMainWindow):
    """geoview's window over one store; `docks` maps each dock's name to it."""

    def __init__(self, data: ViewerData, *, settings: QSettings | None = None, index: int = 0,
                 group: str = "all", follow: bool = False) -> None:
        super().__init__()
        self._build_frame(data, ViewerState(data.n_epochs, data.groups, index=index, group=group), settings)
        self.setWindowTitle(f"geoview — {data.name}")

        trajectory = self.add_dock(TrajectoryDock, Qt.DockWidgetArea.LeftDockWidgetArea)
        training = self.add_dock(TrainingDock, Qt.DockWidgetArea.RightDockWidgetArea)
        velocity = self.add_dock(VelocityDock, Qt.DockWidgetArea.RightDockWidgetArea, below=training)
        self.add_dock(FlatnessDock, Qt.DockWidgetArea.RightDockWidgetArea, below=velocity)
        distribution = self.add_dock(DistributionDock, Qt.DockWidgetArea.LeftDockWidgetArea, below=trajectory)
        self.add_dock(ProfileDock, Qt.DockWidgetArea.LeftDockWidgetArea, tabify_with=distribution)
        self.add_dock(SpectrumDock, Qt.DockWidgetArea.LeftDockWidgetArea, tabify_with=distribution)
        self.add_dock(LandscapeDock, Qt.DockWidgetArea.LeftDockWidgetArea, tabify_with=distribution)
        distribution.raise_()
        for name in LOAD_ORDER:  # one worker thread: the quick loads first, the PCA last
            self.docks[name].start()
        self._default_layout = self.saveState(LAYOUT_VERSION)
        self._sized = False

        self._build_menus()
        self._build_status_bar()
        self.resize(1500, 940)
        if settings is not None:
            self._sized = self.restore_settings()
        if follow:
            self.follow_timer.start()

    def _build_frame(self, data: ViewerData, state: ViewerState, settings: QSettings | None) -> None:
        """What a geoview window holds before its docks: data, state, worker thread, settings, the epoch toolbar."""
        QPixmapCache.setCacheLimit(max(QPixmapCache.cacheLimit(), PIXMAP_CACHE_KB))
        self.collector = GuiThreadCollector(self)  # before any worker thread starts
        self.data = data
        self.state = state
        self.jobs = Jobs(self)
        self.settings = settings
        self.docks: dict[str, ViewerDock] = {}
        self.setDockNestingEnabled(True)
        self.setDockOptions(QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowNestedDocks
                            | QMainWindow.DockOption.AllowTabbedDocks)
        self.epoch_control = EpochControl(data, self.state)
        bar = QToolBar("Epoch", objectName="epoch_toolbar", movable=False, floatable=False)
        bar.addWidget(self.epoch_control)
        self.addToolBar(Qt.ToolBarArea.BottomToolBarArea, bar)
        self.follow_timer = QTimer(self, interval=FOLLOW_MS)  # started by windows that follow their store
        self.follow_timer.timeout.connect(self._poll)
        self._polling = False

    def add_dock(self, kind: type[ViewerDock], area: Qt.DockWidgetArea, *, below: ViewerDock | None = None,
                 tabify_with: ViewerDock | None = None) -> ViewerDock:
        """Create a dock of class `kind` on this window's state and place it in `area`, below another or as a
        tab beside another."""
        dock = kind(self.data, self.state, self.jobs, self)
        if tabify_with is not None:
            self.tabifyDockWidget(tabify_with, dock)
        elif below is None:
            self.addDockWidget(area, dock)
        else:
            self.splitDockWidget(below, dock, Qt.Orientation.Vertical)
        self.docks[dock.NAME] = dock
        return dock

    # ----------------------------------------------------------------------------- chrome
    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        for dock in self.docks.values():
            submenu = file_menu.addMenu(f"Export {dock.TITLE}")
            submenu.addActions(dock.export_button.menu().actions())
        file_menu.addSeparator()
        quit_action = QAction("&Quit", self, shortcut=QKeySequence.StandardKey.Quit)
        quit_action.triggered.connect(self.close)
        file_menu.addAction(quit_action)
        view_menu = self.menuBar().addMenu("&View")
        for dock in self.docks.values():
            view_menu.addAction(dock.toggleViewAction())
        view_menu.addSeparator()
        self.log_epoch_action = QAction("Log epoch axis", self, checkable=True, shortcut=QKeySequence("Ctrl+L"),
                                        toolTip="Epoch axes on a log scale: the early epochs get room "
                                                "(epochs ≤ 0 sit at the left end)")
        self.log_epoch_action.toggled.connect(self.state.set_log_epoch)
        self.state.epoch_axis_changed.connect(self.log_epoch_action.setChecked)
        view_menu.addAction(self.log_epoch_action)
        view_menu.addAction("Reset layout", self.reset_layout)
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction("Keys and mouse", lambda: QMessageBox.information(self, "geoview", KEYS_HELP))

    def _build_status_bar(self) -> None:
        self.summary = QLabel(self._summary_text())
        self.statusBar().addWidget(self.summary)
        self.busy_label = QLabel("computing…")
        self.busy_bar = QProgressBar(maximumWidth=120, maximumHeight=12, textVisible=False)
        self.busy_bar.setRange(0, 0)
        self.statusBar().addPermanentWidget(self.busy_label)
        self.statusBar().addPermanentWidget(self.busy_bar)
        self.jobs.busy_changed.connect(self._on_busy_changed)
        self._on_busy_changed(self.jobs.busy)

    def _summary_text(self) -> str:
        data, task = self.data, self.data.store.task
        facts = [f"{k} = {v}" for k, v in task.items() if k != "family" and isinstance(v, int | float | str)]
        what = ", ".join([data.store.family.replace("_", " "), *facts[:2]])
        analyses = ", ".join(data.analyses) or "no analyses"
        span = f"{data.n_epochs} {data.unit}s ({data.epochs[0]}–{data.epochs[-1]})"
        return f"  {data.name} · {what} · {span} · {analyses}"

    def _on_busy_changed(self, busy: bool) -> None:
        self.busy_label.setVisible(busy)
        self.busy_bar.setVisible(busy)

    # ------------------------------------------------------------------------------ follow
    def _poll(self) -> None:
        """Look for a newer commit of the store on the worker thread (quietly); skipped while docks load."""
        if self._polling or self.jobs.busy:
            return
        self._polling = True
        self.jobs.submit(self.data.follow, self._on_followed, self._on_follow_failed, quiet=True)

    def _on_followed(self, data: ViewerData | None) -> None:
        """Show the newer commit: every dock renewed on it, then the epoch control (it follows the newest epoch
        unless the user moved away from it). A load that started meanwhile defers it to the next poll."""
        self._polling = False
        if data is None or self.jobs.busy:
            return
        for dock in self.docks.values():
            dock.renew(data)
        self.data = data  # only now: a renewal that failed is tried again at the next poll
        self.epoch_control.set_data(data)
        self.summary.setText(self._summary_text())

    def _on_follow_failed(self, message: str) -> None:
        self._polling = False
        self.statusBar().showMessage(f"following the store: {message}", 2 * FOLLOW_MS)

    def reset_layout(self) -> None:
        """Put every dock back where, and as large as, it opens by default."""
        for dock in self.docks.values():
            dock.setFloating(False)
            dock.show()
        self.restoreState(self._default_layout, LAYOUT_VERSION)
        self._default_sizes()

    def _default_sizes(self) -> None:
        """Trajectory and training curves side by side; a dock without data keeps only its one-line reason."""
        d, width, height = self.docks, self.width(), self.height()
        small = 90
        self.resizeDocks([d["trajectory"], d["training"]], [width * 52 // 100, width * 48 // 100],
                         Qt.Orientation.Horizontal)
        self.resizeDocks([d["trajectory"], d["distribution"]],
                         [height, small] if d["distribution"].reason else [height * 62 // 100, height * 38 // 100],
                         Qt.Orientation.Vertical)
        self.resizeDocks([d["training"], d["velocity"], d["flatness"]],
                         [height * 45 // 100] * 2 + [small] if d["flatness"].reason
                         else [height * 38 // 100, height * 31 // 100, height * 31 // 100],
                         Qt.Orientation.Vertical)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._sized:
            self._sized = True
            self._default_sizes()

    # -------------------------------------------------------------------------- settings
    def save_settings(self) -> None:
        """Save window geometry, dock layout and dock settings."""
        if self.settings is None:
            return
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/layout", self.saveState(LAYOUT_VERSION))
        self.settings.setValue("window/log_epoch", self.state.log_epoch)
        self.settings.setValue("docks", json.dumps({name: d.get_settings() for name, d in self.docks.items()}))
        self.settings.sync()

    def restore_settings(self) -> bool:
        """Restore what `save_settings` saved (False if no layout was saved); anything unreadable keeps the default."""
        geometry, layout = self.settings.value("window/geometry"), self.settings.value("window/layout")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if layout is not None:
            self.restoreState(layout, LAYOUT_VERSION)
        try:
            saved = json.loads(self.settings.value("docks", "{}"))
        except (TypeError, ValueError):
            saved = {}
        for name, dock in self.docks.items():
            if isinstance(saved.get(name), dict):
                dock.set_settings(saved[name])
        self.state.set_log_epoch(str(self.settings.value("window/log_epoch", False)).lower() == "true")
        return layout is not None

    def closeEvent(self, event) -> None:
        self.epoch_control.timer.stop()
        self.follow_timer.stop()
        self.save_settings()
        self.jobs.close()
        self.collector.release()
        super().closeEvent(event)
