"""Read a stick's ``keyd/`` directory without following links or leaving it.

Each file is opened relative to a descriptor of ``keyd/`` with ``openat2``
and ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV``; where the kernel lacks ``openat2`` (ENOSYS) keyd falls
back to ``O_NOFOLLOW`` on single path components through the directory
descriptor, which is equivalent for the one-component names read here. Only
regular files are read (checked with ``lstat`` before opening, so device
nodes are never opened, and with ``fstat`` after), with ``O_NONBLOCK`` so a
FIFO swapped in cannot hang the open, and with caps on each file, on the
total and on the number of entries. Nothing on the stick is executed.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from keyd.trust.errors import Reason, UnsafeStickError
from keyd.trust.manifest import MANIFEST_NAME, SIGNATURE_NAME
from keyd.trust.secret import WipeOnExit
from keyd.trust.settings import Limits

BUNDLE_DIR = "keyd"
# openat2 has number 437 in the unified syscall table (x86_64, aarch64, i386, arm, riscv...).
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def openat2(dirfd: int, name: str, flags: int, resolve: int) -> int:
    """Call the openat2 system call; return a descriptor or raise OSError (ENOSYS if absent)."""
    how = _OpenHow(flags, 0, resolve)
    syscall = _libc().syscall
    syscall.restype = ctypes.c_long
    fd = syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                 ctypes.c_char_p(os.fsencode(name)), ctypes.byref(how),
                 ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), name)
    return int(fd)


class Opener(Protocol):
    """Opens one name relative to a directory descriptor without following links."""

    name: str

    def open(self, dirfd: int, name: str, flags: int) -> int:
        """Return a new descriptor, or raise OSError (ELOOP for a symlink)."""
        ...


class Openat2Opener:
    """Opens with openat2 and strict RESOLVE_* flags."""

    name = "openat2"

    def open(self, dirfd: int, name: str, flags: int) -> int:
        """See :class:`Opener`."""
        return openat2(dirfd, name, flags, RESOLVE_STRICT)


class NofollowOpener:
    """Fallback: ``openat`` with O_NOFOLLOW on a single checked component."""

    name = "O_NOFOLLOW"

    def open(self, dirfd: int, name: str, flags: int) -> int:
        """See :class:`Opener`."""
        _check_component(name)
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dirfd)


def _check_component(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EXDEV, "refusing a path that is not one plain component", name)


@functools.cache
def openat2_available() -> bool:
    """True if this kernel implements openat2 (probed once)."""
    try:
        os.close(openat2(-100, "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0))
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return False
        raise
    return True


def default_opener() -> Opener:
    """openat2 where the kernel has it, else the O_NOFOLLOW fallback."""
    return Openat2Opener() if openat2_available() else NofollowOpener()


@dataclass
class RawBundle(WipeOnExit):
    """The bytes read from ``keyd/``; entries that were refused are kept with their reason.

    Key bytes live in bytearrays: :meth:`wipe` (or leaving the ``with``) zeroes them.
    """

    files: dict[str, bytearray] = field(default_factory=dict)
    problems: dict[str, UnsafeStickError] = field(default_factory=dict)
    opener: str = ""

    def wipe(self) -> None:
        """Zero and drop every file read."""
        for data in self.files.values():
            data[:] = bytes(len(data))
        self.files.clear()



def read_bundle(root: str | os.PathLike[str], limits: Limits | None = None,
                opener: Opener | None = None) -> RawBundle:
    """Read every regular file in ``root/keyd/`` within ``limits``.

    Raises UnsafeStickError when ``keyd/`` is missing (NO_BUNDLE) or unsafe,
    or when the entry count or total size is over its cap; a single refused
    entry is recorded in ``problems`` instead, so the verifier can refuse
    only the keys that need it.
    """
    opener = opener or default_opener()
    limits = limits or Limits()
    root_fd = _open_root(root)
    try:
        keyd_fd = _open_bundle_dir(root_fd, opener)
    finally:
        os.close(root_fd)
    try:
        return _read_entries(keyd_fd, limits, opener)
    finally:
        os.close(keyd_fd)


def _open_root(root: str | os.PathLike[str]) -> int:
    try:
        return os.open(root, DIR_FLAGS)
    except OSError as exc:
        raise UnsafeStickError(Reason.NO_BUNDLE, f"cannot open {os.fspath(root)}: {exc.strerror}",
                               subject=os.fspath(root)) from None


def _open_bundle_dir(root_fd: int, opener: Opener) -> int:
    try:
        return opener.open(root_fd, BUNDLE_DIR, DIR_FLAGS)
    except FileNotFoundError:
        raise UnsafeStickError(Reason.NO_BUNDLE, "the stick has no keyd/ directory",
                               subject=BUNDLE_DIR,
                               fix="write a bundle with keydctl enroll") from None
    except OSError as exc:
        raise UnsafeStickError(Reason.UNSAFE_FILE, f"keyd/ cannot be opened safely "
                               f"({exc.strerror}): it must be a real directory",
                               subject=BUNDLE_DIR) from None


def _read_entries(keyd_fd: int, limits: Limits, opener: Opener) -> RawBundle:
    names = sorted(os.listdir(keyd_fd))
    if len(names) > limits.files:
        raise UnsafeStickError(Reason.TOO_MANY_FILES, f"keyd/ holds {len(names)} entries, "
                               f"more than the {limits.files} allowed", subject=BUNDLE_DIR)
    bundle = RawBundle(opener=opener.name)
    total = 0
    try:
        for name in names:
            try:
                data = _read_entry(keyd_fd, name, _cap(name, limits), opener)
            except UnsafeStickError as problem:
                bundle.problems[name] = problem
                continue
            total += len(data)
            bundle.files[name] = data
            if total > limits.total_bytes:
                raise UnsafeStickError(Reason.TOO_LARGE, f"keyd/ holds more than "
                                       f"{limits.total_bytes} bytes", subject=BUNDLE_DIR)
    except BaseException:
        bundle.wipe()
        raise
    return bundle


def _cap(name: str, limits: Limits) -> int:
    if name == MANIFEST_NAME:
        return limits.manifest_bytes
    if name == SIGNATURE_NAME:
        return limits.signature_bytes
    return limits.key_bytes


def _unsafe(name: str, problem: str, reason: Reason = Reason.UNSAFE_FILE) -> UnsafeStickError:
    shown = name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return UnsafeStickError(reason, f"keyd/{shown} {problem}", subject=f"keyd/{shown}")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _read_entry(keyd_fd: int, name: str, cap: int, opener: Opener) -> bytearray:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _unsafe(name, "has a name that is not UTF-8") from None
    try:
        before = os.stat(name, dir_fd=keyd_fd, follow_symlinks=False)
    except OSError as exc:
        raise _unsafe(name, f"cannot be examined ({exc.strerror})") from None
    if not stat.S_ISREG(before.st_mode):
        raise _unsafe(name, f"is {_kind(before.st_mode)}, not a regular file")
    if before.st_size > cap:
        raise _unsafe(name, f"is larger than {cap} bytes", Reason.TOO_LARGE)
    try:
        fd = opener.open(keyd_fd, name, FILE_FLAGS)
    except OSError as exc:
        raise _unsafe(name, f"cannot be opened safely ({exc.strerror})") from None
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
                before.st_dev, before.st_ino):
            raise _unsafe(name, "changed while it was being opened")
        return _read_capped(fd, name, cap, after.st_size)
    finally:
        os.close(fd)


def _read_capped(fd: int, name: str, cap: int, size: int) -> bytearray:
    # One byte of headroom tells a file that grew past the cap from one that fits.
    buffer = bytearray(min(size, cap) + 1)
    view = memoryview(buffer)
    got = 0
    while got < len(buffer):
        count = os.readv(fd, [view[got:]])
        if count == 0:
            break
        got += count
    view.release()
    if got > size:
        buffer[:] = bytes(len(buffer))
        if got > cap:
            raise _unsafe(name, f"is larger than {cap} bytes", Reason.TOO_LARGE)
        raise _unsafe(name, "grew while it was being read")
    del buffer[got:]
    return buffer
