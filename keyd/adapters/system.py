"""Processes holding mounts or devices (read from /proc), and systemd units (systemctl).

Holders are found the way fuser(1) does, without running it: for each
``/proc/<pid>`` the links ``cwd``, ``root``, ``exe`` and ``fd/*`` and the file
paths in ``maps`` are compared with the mountpoints and device nodes keyd is
about to close. keyd lists holders; it never signals them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from keyd.engine.errors import Holder
from keyd.runner import Runner


def _inside(path: str, targets: Sequence[str]) -> str | None:
    for target in targets:
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return target
    return None


class ProcHolders:
    """The :class:`~keyd.engine.ports.HolderPort` reading ``<root>/proc``."""

    def __init__(self, root: str | Path = "/") -> None:
        self.proc = Path(root) / "proc"

    def holders(self, paths: Sequence[str]) -> list[Holder]:
        """See HolderPort.holders; processes that vanish meanwhile are skipped."""
        found: list[Holder] = []
        try:
            pids = sorted(int(p) for p in os.listdir(self.proc) if p.isdigit())
        except OSError:
            return found
        for pid in pids:
            found.extend(self._process(pid, paths))
        return found

    def _process(self, pid: int, targets: Sequence[str]) -> list[Holder]:
        base = self.proc / str(pid)
        command = _read(base / "comm").strip() or "?"
        seen: set[tuple[str, str]] = set()
        holders = []
        for how, path in self._uses(base):
            if _inside(path, targets) is not None and (how, path) not in seen:
                seen.add((how, path))
                holders.append(Holder(pid, command, how, path))
        return holders

    def _uses(self, base: Path) -> Iterator[tuple[str, str]]:
        for link in ("cwd", "root", "exe"):
            target = _link(base / link)
            if target:
                yield (f"{link} in" if link != "exe" else "runs", target)
        try:
            fds = sorted(os.listdir(base / "fd"), key=lambda n: int(n) if n.isdigit() else -1)
        except OSError:
            fds = []
        for fd in fds:
            target = _link(base / "fd" / fd)
            if target:
                yield f"open file (fd {fd})", target
        for line in _read(base / "maps").splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                yield "maps", fields[5].removesuffix(" (deleted)")


def _link(path: Path) -> str:
    try:
        return os.readlink(path).removesuffix(" (deleted)")
    except OSError:
        return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class Systemctl:
    """The :class:`~keyd.engine.ports.ServicePort` that runs systemctl."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def stop(self, units: Sequence[str]) -> None:
        """``systemctl stop UNITS``."""
        if units:
            self.runner.run(["systemctl", "stop", "--", *units], timeout=180)

    def start(self, units: Sequence[str]) -> None:
        """``systemctl start UNITS``."""
        if units:
            self.runner.run(["systemctl", "start", "--", *units], timeout=180)
