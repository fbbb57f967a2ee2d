"""The comparison window: the runs of a sweep overlaid, one colour per run, around the shared epoch control.

`geoview SWEEP` (no `--run`) opens it. It is `MainWindow` (menus, status bar, busy indicator, layout and dock
settings kept in QSettings, under their own `compare/` group) with other docks: the runs list, trajectories in
one shared basis, divergence from a reference run, and training curves, velocity and flatness per run. The epoch
axis is the union of the runs' epochs.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QLabel, QMainWindow

from viewer.docks.compare_divergence import DivergenceDock
from viewer.docks.compare_flatness import CompareFlatnessDock
from viewer.docks.compare_runs import RunsDock
from viewer.docks.compare_training import CompareTrainingDock
from viewer.docks.compare_trajectory import CompareTrajectoryDock
from viewer.docks.compare_velocity import CompareVelocityDock
from viewer.sweep_data import SweepViewerData
from viewer.sweep_state import SweepState
from viewer.window import LAYOUT_VERSION, MainWindow

SETTINGS_GROUP = "compare"
"""The comparison window keeps its layout and dock settings apart from the single-run window's."""
RUN_ROW_PX = 22
"""Height of a line of the runs list: the list opens just tall enough for a few runs."""
LOAD_ORDER = ("training", "flatness", "velocity", "divergence", "trajectory")


class CompareWindow(MainWindow):
    """geoview's window over the runs of a sweep; `docks` maps each plotting dock's name to it, `runs_dock` is the
    list of runs."""

    def __init__(self, data: SweepViewerData, *, settings: QSettings | None = None, index: int = 0,
                 group: str = "all") -> None:
        QMainWindow.__init__(self)  # not MainWindow's: it builds the single-run docks; its methods serve here
        state = SweepState(data.n_epochs, data.groups, data.runs, index=index, group=group)
        self._build_frame(data, state, settings)
        if settings is not None:
            settings.beginGroup(SETTINGS_GROUP)
        self.setWindowTitle(f"geoview — {data.name} ({len(data.runs)} runs)")

        self.runs_dock = RunsDock(data, self.state, self)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.runs_dock)
        trajectory = self.add_dock(CompareTrajectoryDock, Qt.DockWidgetArea.LeftDockWidgetArea, below=self.runs_dock)
        self.add_dock(DivergenceDock, Qt.DockWidgetArea.LeftDockWidgetArea, below=trajectory)
        training = self.add_dock(CompareTrainingDock, Qt.DockWidgetArea.RightDockWidgetArea)
        velocity = self.add_dock(CompareVelocityDock, Qt.DockWidgetArea.RightDockWidgetArea, below=training)
        self.add_dock(CompareFlatnessDock, Qt.DockWidgetArea.RightDockWidgetArea, below=velocity)
        for name in LOAD_ORDER:  # one worker thread: the quick loads first, the shared PCA last
            self.docks[name].start()
        self._default_layout = self.saveState(LAYOUT_VERSION)
        self._sized = False

        self._build_menus()
        view_menu = self.menuBar().actions()[1].menu()  # File, View, Help: the runs list is shown or hidden there
        view_menu.insertAction(view_menu.actions()[0], self.runs_dock.toggleViewAction())
        self._build_status_bar()
        self.statusBar().insertWidget(0, QLabel(f"  {len(data.runs)} runs ({', '.join(data.runs)}) ·"))
        self.resize(1500, 940)
        if settings is not None:
            self._sized = self.restore_settings()

    def _default_sizes(self) -> None:
        """On the left the runs list (a line per run), the trajectories, the divergence below them; the per-run curves
        on the right; a dock without data keeps only its one-line reason."""
        d, width, height = self.docks, self.width(), self.height()
        small = 90
        self.resizeDocks([d["trajectory"], d["training"]], [width // 2, width - width // 2], Qt.Orientation.Horizontal)
        runs = min(height // 5, RUN_ROW_PX * (len(self.data.runs) + 1))
        self.resizeDocks([self.runs_dock, d["trajectory"], d["divergence"]],
                         [runs, (height - runs) * 60 // 100, (height - runs) * 40 // 100], Qt.Orientation.Vertical)
        self.resizeDocks([d["training"], d["velocity"], d["flatness"]],
                         [height * 45 // 100] * 2 + [small] if d["flatness"].reason
                         else [height * 36 // 100, height * 32 // 100, height * 32 // 100],
                         Qt.Orientation.Vertical)
