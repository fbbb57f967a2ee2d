"""Run a command on a pseudo-terminal and return what it drew (progress bars show on terminals only)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_terminal(*args: str, columns: int = 100) -> tuple[int, str]:
    """Run `python -m geostore.cli ARGS` with stderr on a `columns`-wide pty: (exit code, text drawn)."""
    primary, replica = os.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "geostore.cli", *args], stderr=replica,
                            stdout=subprocess.DEVNULL, cwd=ROOT)
    os.close(replica)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(), b"".join(chunks).decode(errors="replace")
