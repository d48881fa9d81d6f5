"""One flock per volume (``<run_dir>/<volume>.lock``): two runs never build two half-stacks.

The second unlock or lock of the same volume waits up to ``timeout`` seconds and
then fails naming the PID holding the lock. The file is never removed: removing
a flock'ed file lets a third process lock a different inode.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from keyd.engine.errors import VolumeLocked
from keyd.errors import KeydError

DEFAULT_RUN_DIR = "/run/keyd"


class VolumeLock:
    """Context manager holding the exclusive lock of one volume."""

    def __init__(self, run_dir: str | Path, volume: str, *, timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = Path(run_dir) / f"{volume}.lock"
        self.volume = volume
        self.timeout = timeout
        self.clock = clock
        self.sleep = sleep
        self.fd: int | None = None

    def __enter__(self) -> VolumeLock:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KeydError(f"cannot create lock file {self.path}: {exc.strerror}",
                            fix="run as root, or pass --run-dir DIR") from None
        self.fd = fd
        deadline = self.clock() + self.timeout
        while not self._try_lock(fd):
            if self.clock() >= deadline:
                os.close(fd)
                self.fd = None
                raise VolumeLocked(
                    f"volume {self.volume} is being unlocked or locked by another keyd process"
                    f"{self._holder()} (waited {self.timeout:g} s for {self.path})",
                    fix="wait for it to finish, then retry (or raise --wait)")
            self.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return self

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
