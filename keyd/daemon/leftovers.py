"""Wait for the helper programs a killed keyd left running before reconciling with the kernel.

keyd.service has ``KillMode=process``: when keyd dies (SIGKILL, watchdog) in the
middle of an unlock, the ``cryptsetup open`` or ``mount`` it started keeps
running in the service's cgroup, and systemd starts the next keyd beside it
(lab finding). Reconciling at once would race that helper: the new keyd sees
no mapping yet, starts its own ``cryptsetup open`` and fails when the orphan
creates the mapping first, leaving a mapping nobody owns. So keyd first waits
(bounded) until such helpers are gone, then looks at the kernel. Long-lived
processes keyd starts on purpose (FUSE drivers such as ntfs-3g) are not waited for.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger("keyd.daemon")

# Programs keyd runs to completion while opening or closing a stack.
HELPERS = frozenset({"cryptsetup", "mdadm", "losetup", "mount", "umount", "dmsetup", "tcplay",
                     "blkid", "wipefs", "gpg", "gpgv"})


def leftover_helpers(own_pid: int, comms: Mapping[int, str]) -> dict[int, str]:
    """The helper processes among ``comms`` (pid -> command name) other than keyd itself. Pure."""
    return {pid: comm for pid, comm in comms.items() if pid != own_pid and comm in HELPERS}


def cgroup_processes(proc: Path = Path("/proc"), cgroupfs: Path = Path("/sys/fs/cgroup"),
                     pid: int | None = None) -> dict[int, str]:
    """pid -> command name of every process in this process's cgroup (v2); {} if unknown."""
    try:
        line = next(x for x in (proc / "self" / "cgroup").read_text().splitlines()
                    if x.startswith("0::"))
        pids = (cgroupfs / line[3:].lstrip("/") / "cgroup.procs").read_text().split()
    except (OSError, StopIteration):
        return {}
    return {int(p): _comm(proc, int(p)) for p in pids if p.isdigit()}


def _comm(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""  # already gone


def wait_for_leftovers(list_processes: Callable[[], Mapping[int, str]], *, timeout: float,
                       sleep: Callable[[float], object] = time.sleep,
                       clock: Callable[[], float] = time.monotonic,
                       own_pid: int | None = None) -> Iterable[str]:
    """Wait until no helper of a previous keyd runs (at most ``timeout`` s); returns those left."""
    me = os.getpid() if own_pid is None else own_pid
    deadline = clock() + timeout
    left = leftover_helpers(me, list_processes())
    if left:
        log.warning("waiting for %s left running by the previous keyd before looking at the kernel",
                    ", ".join(f"{comm} ({pid})" for pid, comm in sorted(left.items())))
    while left and clock() < deadline:
        sleep(0.2)  # start-up only: never while serving
        left = leftover_helpers(me, list_processes())
    if left:
        log.error("still running after %g s: %s", timeout, ", ".join(sorted(left.values())))
    return sorted(left.values())
