"""mdadm, mount/umount and losetup adapters, each a thin, typed wrapper over the runner.

Failures keep the program's :class:`~keyd.errors.ProgramError` (argv, exit code,
stderr) as the cause and say which layer of which volume was being handled.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Callable, Sequence

from keyd.adapters.retry import Retry
from keyd.config.layers import md_uuid
from keyd.engine.errors import StorageError, VolumeBusy
from keyd.errors import ProgramError
from keyd.runner import Runner

log = logging.getLogger("keyd.adapters")

# <linux/loop.h>: struct loop_info64 is 232 bytes; lo_flags, a __u32, sits at offset 52.
LOOP_SET_STATUS64, LOOP_GET_STATUS64 = 0x4C04, 0x4C05
LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64_SIZE, _LO_FLAGS_OFFSET = 232, 52


def _last_line(exc: ProgramError) -> str:
    lines = exc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {exc.returncode}"


def _busy(exc: ProgramError) -> bool:
    text = exc.stderr.lower()
    return "busy" in text or "exclusive access" in text


class Mdadm:
    """The :class:`~keyd.engine.ports.RaidPort` that runs mdadm."""

    def __init__(self, runner: Runner, retry: Retry | None = None) -> None:
        self.runner = runner
        self.retry = retry or Retry()

    def assemble(self, label: str, md_name: str, uuid: str, members: Sequence[str],
                 *, run: bool) -> str:
        """``mdadm --assemble /dev/md/NAME --uuid=U [--run] MEMBERS...``."""
        device = f"/dev/md/{md_name}"
        argv = ["mdadm", "--assemble", device, f"--uuid={md_uuid(uuid)}"]
        argv += ["--run"] if run else []
        try:
            self.runner.run([*argv, *members], timeout=120)
        except ProgramError as exc:
            raise StorageError(f"could not assemble {label}: {_last_line(exc)}",
                               fix="see `mdadm --examine` of the members") from exc
        return device

    def stop(self, label: str, device: str) -> None:
        """``mdadm --stop DEVICE``."""
        try:
            self.retry.run(lambda: self.runner.run(["mdadm", "--stop", device], timeout=60),
                           busy=_busy)
        except ProgramError as exc:
            raise StorageError(f"could not stop {label}: {_last_line(exc)}",
                               fix="something still uses the array; see `keydctl status`") \
                from exc

    def re_add(self, label: str, device: str, member: str) -> None:
        """``mdadm --manage DEVICE --re-add MEMBER`` (never ``--add``: that would wipe its
        role and resync the whole member, a decision for the admin)."""
        try:
            self.runner.run(["mdadm", "--manage", device, "--re-add", member], timeout=60)
        except ProgramError as exc:
            raise StorageError(f"could not re-add {member} to {label}: {_last_line(exc)}",
                               fix=f"`mdadm --examine {member}`; if it is stale, add it as a "
                                   f"new member: mdadm --manage {device} --add {member}") \
                from exc


# FUSE drivers keyd starts itself rather than through mount(8), by fstype. Their argv[0]
# starts with '@': systemd-shutdown's final killing spree spares such processes (systemd's
# "root storage daemon" convention), so a file system inside one that could not be unmounted
# before (a process kept it busy) is still unmounted cleanly once that process is gone,
# before the driver itself goes.
FUSE_DRIVERS = {"ntfs-3g": "ntfs-3g"}


class Mounter:
    """The :class:`~keyd.engine.ports.MountPort` that runs mount and umount."""

    def __init__(self, runner: Runner, *, create_mountpoints: bool = True) -> None:
        self.runner = runner
        self.create_mountpoints = create_mountpoints

    def mount(self, label: str, source: str, mountpoint: str, fstype: str,
              options: Sequence[str]) -> None:
        """``mount -t FSTYPE [-o OPTS] SOURCE MOUNTPOINT`` (creating the directory if missing)."""
        if self.create_mountpoints:
            try:
                os.makedirs(mountpoint, mode=0o755, exist_ok=True)
            except OSError as exc:  # e.g. a file where a directory should be
                raise StorageError(f"cannot create mountpoint {mountpoint} for {label}: "
                                   f"{exc.strerror}", fix="fix mountpoint in keyd.toml") from exc
        driver = FUSE_DRIVERS.get(fstype)
        argv = [driver] if driver else ["mount", "-t", fstype]
        argv += ["-o", ",".join(options)] if options else []
        try:
            self.runner.run([*argv, source, mountpoint], timeout=120,
                            argv0=f"@{driver}" if driver else None)
        except ProgramError as exc:
            raise StorageError(f"could not mount {label} ({fstype}) at {mountpoint}: "
                               f"{_last_line(exc)}",
                               fix="check fstype and options; `dmesg` tells more") from exc

    def unmount(self, label: str, mountpoint: str) -> None:
        """``umount MOUNTPOINT``; "target is busy" becomes VolumeBusy."""
        try:
            self.runner.run(["umount", mountpoint], timeout=120)
        except ProgramError as exc:
            if "busy" in exc.stderr:
                raise VolumeBusy(label, (), [f"umount: {mountpoint}: target is busy"]) from exc
            raise StorageError(f"could not unmount {label} at {mountpoint}: "
                               f"{_last_line(exc)}", fix="see `findmnt " + mountpoint + "`") \
                from exc

    def quiesce(self, label: str, mountpoint: str) -> str:
        """Flush the file system at ``mountpoint`` and try to remount it read-only; says
        which of the two happened (a file open for writing keeps it read-write)."""
        try:
            self.runner.run(["sync", "--file-system", mountpoint], timeout=120)
        except ProgramError as exc:
            return f"{mountpoint}: sync failed: {_last_line(exc)}"
        try:
            self.runner.run(["mount", "-o", "remount,ro", mountpoint], timeout=120)
        except ProgramError as exc:
            return f"{mountpoint}: synced, still read-write ({_last_line(exc)})"
        return f"{mountpoint}: synced and remounted read-only"


def set_autoclear(device: str) -> None:
    """Set LO_FLAGS_AUTOCLEAR on a bound loop device (losetup has no option for it; mount's
    ``-o loop`` sets it the same way)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = bytearray(_LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        (flags,) = struct.unpack_from("=I", info, _LO_FLAGS_OFFSET)
        struct.pack_into("=I", info, _LO_FLAGS_OFFSET, flags | LO_FLAGS_AUTOCLEAR)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
    finally:
        os.close(fd)


class Losetup:
    """The :class:`~keyd.engine.ports.LoopPort` that runs losetup."""

    def __init__(self, runner: Runner, retry: Retry | None = None,
                 flag_autoclear: Callable[[str], None] = set_autoclear) -> None:
        self.runner = runner
        self.retry = retry or Retry()
        self.flag_autoclear = flag_autoclear

    def attach(self, label: str, image: str, *, read_only: bool) -> str:
        """``losetup --find --show [--read-only] IMAGE``; returns /dev/loopN."""
        argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
        try:
            done = self.runner.run([*argv, image], timeout=60)
        except ProgramError as exc:
            raise StorageError(f"could not attach {label} ({image}): {_last_line(exc)}",
                               fix="check that the image file exists in the layer below") from exc
        device = done.stdout.strip()
        if not device.startswith("/dev/loop"):
            raise StorageError(f"losetup did not name the loop device for {label}",
                               fix="run `losetup --list` to check")
        return device

    def detach(self, label: str, device: str) -> None:
        """``losetup --detach DEVICE``; a device autoclear detached already is fine."""
        try:
            self.retry.run(lambda: self.runner.run(["losetup", "--detach", device], timeout=60),
                           busy=_busy)
        except ProgramError as exc:
            if "No such device or address" in exc.stderr:  # ENXIO: no longer bound
                return
            raise StorageError(f"could not detach {label} ({device}): {_last_line(exc)}",
                               fix="something still uses it; see `keydctl status`") from exc

    def autoclear(self, label: str, device: str) -> None:
        """Flag ``device`` autoclear; if the kernel refuses, keyd still detaches it at lock."""
        try:
            self.flag_autoclear(device)
        except OSError as exc:
            log.warning("cannot set autoclear on %s (%s): %s", device, label, exc.strerror)
