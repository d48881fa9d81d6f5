"""keyd's own view of its volumes in the run directory, for ``keydctl status`` without D-Bus.

What the daemon knows and the kernel does not show (waiting for a key, for more k-of-n
sticks, a removal grace running) is its state and detail, the same pair D-Bus'
StateChanged carries. keyd writes them to ``RUN_DIR/daemon.json`` (state names and
details only, never a key) atomically on every change and removes the file when it
stops; readers believe the file only while the process that wrote it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keyd.trust.atomic import write_atomic

STATE_FILE = "daemon.json"
View = dict[str, tuple[str, str]]  # volume -> (state, detail)


class StateFile:
    """An Announcer (keyd.daemon.ports) that keeps ``daemon.json`` up to date."""

    def __init__(self, run_dir: str, volumes: Iterable[str], pid: int | None = None) -> None:
        self.path = Path(run_dir) / STATE_FILE
        self.pid = pid if pid is not None else os.getpid()
        self.view: View = {name: ("locked", "") for name in volumes}
        self._write()

    def state_changed(self, volume: str, state: str, detail: str) -> None:
        """Record the volume's new state and detail."""
        self.view[volume] = (state, detail)
        self._write()

    def remove(self) -> None:
        """keyd stops: its view goes with it."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _write(self) -> None:
        document = {"pid": self.pid, "volumes": {name: {"state": state, "detail": detail}
                                                 for name, (state, detail) in self.view.items()}}
        with contextlib.suppress(OSError):  # /run full or read-only: status lacks keyd's view
            write_atomic(self.path, json.dumps(document).encode(), mode=0o644)


def read_view(run_dir: str) -> View:
    """The running keyd's view of its volumes; empty when keyd does not run (or the file is
    unreadable, or left by a keyd that is gone)."""
    try:
        document: Any = json.loads((Path(run_dir) / STATE_FILE).read_text())
        if not _running(int(document["pid"])):
            return {}
        return {str(name): (str(v["state"]), str(v["detail"]))
                for name, v in document["volumes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # it runs, as another user (keyd runs as root)
        return True
    except OSError:
        return False
    return True
