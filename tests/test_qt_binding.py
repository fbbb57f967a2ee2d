"""The installed Qt binding keeps Python's reference counts: PySide6 6.12.0 on Python 3.11 drops a reference to None
on every `QGraphicsItem.setPos` (pyqtgraph calls it for every moved line and label), so a viewer session aborts with
`Fatal Python error: none_dealloc` after a few thousand epoch changes (None is immortal only from Python 3.12).
This is why pyproject.toml excludes `PySide6-Essentials==6.12.0`; the test says so plainly if that exclusion is lifted
onto a binding with the bug, instead of a crash in the middle of the suite."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
from PySide6.QtWidgets import QApplication, QGraphicsRectItem
app = QApplication([])
item = QGraphicsRectItem()
before = sys.getrefcount(None)
for i in range(200):
    item.setPos(i, 0)
print(sys.getrefcount(None) - before)
"""


def test_moving_a_graphics_item_keeps_the_reference_count_of_none():
    import PySide6

    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    change = done.stdout.strip().splitlines()[0] if done.stdout.strip() else done.stderr[-300:]
    assert change == "0", (f"PySide6 {PySide6.__version__}: 200 QGraphicsItem.setPos calls changed the reference "
                           f"count of None by {change} (the viewer would abort with none_dealloc)")
