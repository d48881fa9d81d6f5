"""Mount a key stick read-only in a private directory, read its bundle, unmount at once.

The daemon calls :meth:`StickMounter.read` with the partition's device node
and the filesystem type udev reported. Only allow-listed filesystems are
mounted (``-t`` pins the kernel driver to that type), always with
``ro,nosuid,nodev,noexec,noatime``, in a fresh ``0700`` directory under the
run directory. The bundle is read with :mod:`keyd.trust.safe_read` and the
stick is unmounted before anything is verified, so it stays mounted only
for the read. If mounting or unmounting fails nothing is left mounted: a
failed unmount is retried lazily (``umount -l``, which detaches at once) and
reported as UNMOUNT_FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from keyd.errors import ProgramError
from keyd.runner import Runner
from keyd.trust.errors import Reason, StickMountError
from keyd.trust.safe_read import Opener, RawBundle, read_bundle
from keyd.trust.settings import DEFAULT_FILESYSTEMS, DEFAULT_RUN_DIR, Limits

log = logging.getLogger("keyd.trust.stick")

MOUNT_OPTIONS = "ro,nosuid,nodev,noexec,noatime"
# A read-only ext3/ext4 mount still replays a dirty journal, i.e. writes to the
# stick; ``noload`` skips the replay so keyd never changes a key stick.
JOURNAL_OPTIONS = {"ext3": ",noload", "ext4": ",noload"}
MOUNT_TIMEOUT = 30.0


@dataclass
class StickRead:
    """A bundle read from a stick, and how long the stick was mounted (for the audit/lab)."""

    bundle: RawBundle
    mounted_seconds: float
    mount_point: str


def mount_options(fstype: str) -> str:
    """The mount options for a stick of ``fstype``: read-only, and never writing to it."""
    return MOUNT_OPTIONS + JOURNAL_OPTIONS.get(fstype, "")


class StickMounter:
    """Mounts sticks safely; construct with the runner and, in tests, a throwaway run dir."""

    def __init__(self, runner: Runner, *, run_dir: str = DEFAULT_RUN_DIR,
                 filesystems: tuple[str, ...] = DEFAULT_FILESYSTEMS,
                 limits: Limits | None = None, opener: Opener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.run_dir = Path(run_dir)
        self.filesystems = tuple(fs.lower() for fs in filesystems)
        self.limits = limits or Limits()
        self.opener = opener
        self.clock = clock

    def read(self, device: str, fstype: str) -> StickRead:
        """Mount ``device``, read ``keyd/``, unmount; the bundle is wiped if unmounting fails."""
        started = self.clock()
        bundle: RawBundle | None = None
        try:
            with self.mounted(device, fstype) as point:
                bundle = read_bundle(point, self.limits, self.opener)
        except BaseException:
            if bundle is not None:
                bundle.wipe()
            raise
        return StickRead(bundle, self.clock() - started, str(point))

    @contextlib.contextmanager
    def mounted(self, device: str, fstype: str) -> Iterator[Path]:
        """Yield the private mount point of ``device``; always unmount and remove it after."""
        self._check(device, fstype)
        point = self._private_dir()
        try:
            self._mount(device, fstype.lower(), point)
        except BaseException:
            self._remove(point)
            raise
        try:
            yield point
        finally:
            self._unmount(point)

    def _check(self, device: str, fstype: str) -> None:
        if fstype.lower() not in self.filesystems:
            raise StickMountError(Reason.UNSUPPORTED_FILESYSTEM,
                                  f"{device}: filesystem {fstype or 'unknown'!s} is not one keyd "
                                  f"mounts ({', '.join(self.filesystems)})", subject=device,
                                  fix="format the key stick as vfat, exfat or ext4")
        if not os.path.isabs(device):
            raise StickMountError(Reason.MOUNT_FAILED, f"{device!r} is not a device path",
                                  subject=device)

    def _private_dir(self) -> Path:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.run_dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise StickMountError(Reason.MOUNT_FAILED, f"{self.run_dir} is not a directory owned "
                                  "by keyd", subject=str(self.run_dir),
                                  fix=f"remove {self.run_dir}; keyd re-creates it")
        if info.st_mode & 0o077:
            os.chmod(self.run_dir, 0o700)
        return Path(tempfile.mkdtemp(prefix="stick-", dir=self.run_dir))

    def _mount(self, device: str, fstype: str, point: Path) -> None:
        argv = ["mount", "-t", fstype, "-o", mount_options(fstype), device, str(point)]
        try:
            self.runner.run(argv, timeout=MOUNT_TIMEOUT)
        except ProgramError as exc:
            # mount can fail after attaching (e.g. a timeout): make sure nothing stays.
            if os.path.ismount(point):
                self._detach(point)
            raise StickMountError(Reason.MOUNT_FAILED, f"cannot mount {device} ({fstype})",
                                  subject=device) from exc

    def _unmount(self, point: Path) -> None:
        try:
            self.runner.run(["umount", str(point)], timeout=MOUNT_TIMEOUT)
        except ProgramError as exc:
            self._detach(point)
            self._remove(point)
            raise StickMountError(Reason.UNMOUNT_FAILED, f"cannot unmount {point}; it was "
                                  "detached lazily", subject=str(point)) from exc
        self._remove(point)

    def _detach(self, point: Path) -> None:
        try:
            self.runner.run(["umount", "-l", str(point)], timeout=MOUNT_TIMEOUT)
        except ProgramError as exc:
            log.error("lazy unmount of %s failed: %s", point, exc)

    @staticmethod
    def _remove(point: Path) -> None:
        try:
            point.rmdir()
        except OSError as exc:
            log.error("cannot remove mount point %s: %s", point, exc.strerror)
