"""The process that serves one userspace-decrypted volume: ``python3 -m keyd.crypto.serve NAME``.

keyd starts it as root for a crypt layer when the kernel has no dm-crypt, then attaches
``<mountpoint>/volume`` to a loop device. Its protocol with that parent:

- argv: NAME only, ``<volume>-<layer>`` (e.g. ``tank-crypt``).
- stdin: one line of JSON, the spec (:func:`keyd.crypto.spec.parse_spec`: backing, offset, size, sector_size,
  cipher, read_only, mountpoint), then the key bytes up to EOF. The key never travels in argv,
  a file or a log line; it is read into one buffer that is wiped once the cipher has it.
- stdout: the single line ``ready`` once the mount's ``volume`` file answers, then closed. A
  failure before that: nothing on stdout, the reason on stderr, a non-zero exit.
- stderr: log lines; from ``ready`` on they go to the journal (``keyd-crypt``) instead.
- SIGTERM or SIGINT: unmount and exit 0 once nothing holds the file open (the loop device is
  detached); an unmount from outside (``umount``, ``fusermount3 -u``) ends it as well.

Before it reads the key it locks its memory (``mlockall``: the key and the plaintext stay out
of swap, and serving needs no page-in while the loop device it backs may be what swaps), stops
being dumpable (no core, no ptrace or /proc/PID/mem for other users) and sets its core limit to
0. It names itself so that keyd finds it again after its own restart (:func:`served_name`):
its comm is ``keyd-crypt``, its /proc/PID/cmdline becomes ``@keyd-crypt NAME`` (the ``@``, as
for keyd's ntfs-3g, spares it from systemd-shutdown's final kill until the file systems above
are unmounted), and its mount, at the spec's mountpoint, shows the backing device as its
source and ``fuse.keyd-crypt`` as its type (keyd finds its base device there, as it would
in a dm mapping's slaves).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
import resource
import sys
from collections.abc import Sequence
from typing import Protocol

from keyd.crypto.ciphers import SectorCipher, sector_cipher
from keyd.crypto.fuse_volume import FSTYPE, FileBacking, Volume, serve
from keyd.crypto.spec import SPEC, CryptSpec, parse_spec
from keyd.engine.errors import StorageError
from keyd.errors import ConfigError, KeydError, user_message
from keyd.trust.secret import SecretBytes

log = logging.getLogger("keyd.crypto.serve")

MODULE = "keyd.crypto.serve"
COMM = FSTYPE
CMDLINE_TAG = f"@{FSTYPE}"
# A spec line and a key (TrueCrypt cascades: 3 x 64 bytes) are far below this.
MAX_REQUEST = 64 * 1024
# <volume>-<layer>: keyd's names are [a-z0-9_]; no comma (libfuse's option separator), no space.
_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}-[A-Za-z0-9_]{1,32}$")

# <sys/prctl.h>, <sys/mman.h>, <malloc.h>
PR_SET_DUMPABLE, PR_SET_NAME = 4, 15
MCL_CURRENT, MCL_FUTURE = 1, 2
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MiB = 1 << 20


class CipherFactory(Protocol):
    """Builds the :class:`SectorCipher` of a dm-crypt table line (:func:`sector_cipher`)."""

    def __call__(self, spec: str, key: bytearray, *, sector_size: int, iv_large_sectors: bool,
                 iv_offset: int) -> SectorCipher:
        """The cipher; it copies what it needs of ``key`` (the caller wipes ``key`` after)."""
        ...


def read_request(fd: int) -> tuple[CryptSpec, SecretBytes]:
    """Read stdin to EOF into one buffer: the spec line, then the key; wipe the buffer."""
    buffer = bytearray(MAX_REQUEST + 1)
    view = memoryview(buffer)
    try:
        used = 0
        while used <= MAX_REQUEST and (count := os.readv(fd, [view[used:]])):
            used += count
        if used > MAX_REQUEST:
            raise ConfigError(SPEC, "", f"more than {MAX_REQUEST} bytes on stdin")
        newline = buffer.find(b"\n", 0, used)
        if newline < 0:
            raise ConfigError(SPEC, "", "no spec line (JSON, then a newline, then the key)")
        spec = parse_spec(bytes(view[:newline]))
        if used == newline + 1:
            raise ConfigError(SPEC, "", "no key after the spec line")
        return spec, SecretBytes.adopt(bytearray(view[newline + 1:used]))
    finally:
        view.release()
        buffer[:] = bytes(len(buffer))


def served_name(cmdline: Sequence[str]) -> str | None:
    """The NAME a serving process serves, from its /proc/PID/cmdline split at NULs: renamed
    (``@keyd-crypt NAME``, then the padding's empty strings) or not
    (``python3 -m keyd.crypto.serve NAME``); None for any other process."""
    args = list(cmdline)
    while args and not args[-1]:
        args.pop()
    if len(args) == 2 and args[0] == CMDLINE_TAG:
        return args[1]
    if len(args) >= 4 and args[-3:-1] == ["-m", MODULE]:
        return args[-1]
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def harden() -> None:
    """Lock memory (a warning if the kernel refuses), stop being dumpable, no core files."""
    libc = _libc()
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        log.warning("mlockall failed (%s): the key and decrypted data may reach swap",
                    os.strerror(ctypes.get_errno()))
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise StorageError(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except OSError as exc:
        # keyd.service's seccomp filter refuses setrlimit (~@resources); it sets LimitCORE=0,
        # and a process that is not dumpable leaves no core anyway.
        log.info("core limit unchanged (%s)", exc.strerror)


def keep_heap() -> None:
    """Keep freed request buffers in malloc's heap for the next request.

    By default glibc maps each 1 MiB buffer anew and trims the heap when it is freed; faulting
    the pages in again (and, with memory locked, populating and locking them) took half the
    CPU of a 1 MiB read: measured 240 MB/s, 460 MB/s with these settings. The heap then keeps
    its high-water mark, a few MiB per request in flight.
    """
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, 32 * MiB)  # the most glibc takes on 64-bit
    libc.mallopt(M_TRIM_THRESHOLD, 64 * MiB)


def _argv_area() -> tuple[int, int]:
    # /proc/PID/stat fields 48 and 49 (arg_start, arg_end); the 2nd field, comm, may hold spaces.
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return int(fields[45]), int(fields[46])


def rename(name: str) -> None:
    """comm ``keyd-crypt``; cmdline ``@keyd-crypt NAME``, written over the original argv
    strings (they are longer: ``keyd.crypto.serve`` alone is), as setproctitle(3) does."""
    _libc().prctl(PR_SET_NAME, COMM.encode(), 0, 0, 0)
    start, end = _argv_area()
    text = f"{CMDLINE_TAG}\0{name}\0".encode()
    if len(text) > end - start:
        log.warning("cmdline stays as started: %d bytes of argv are too few", end - start)
        return
    # Python copied argv at start-up; nothing reads this memory but the kernel's cmdline.
    ctypes.memmove(start, text.ljust(end - start, b"\0"), end - start)


def _ready() -> None:
    # The parent stops reading stdout and stderr here: later log lines go to the journal
    # (or nowhere, without one), and fds 1 and 2 stay valid descriptors.
    _redirect(2, _journal_fd())
    os.write(1, b"ready\n")
    _redirect(1, os.open(os.devnull, os.O_WRONLY))


def _redirect(target: int, fd: int) -> None:
    os.dup2(fd, target)
    os.close(fd)


def _journal_fd() -> int:
    try:
        # Imported on use, as keyd.audit.sink does: only a serving process needs it.
        stream = importlib.import_module("systemd.journal").stream(FSTYPE)
        fd = os.dup(stream.fileno())
        stream.close()
        return fd
    except (ImportError, OSError):
        return os.open(os.devnull, os.O_WRONLY)


def _data_size(spec: CryptSpec, fd: int) -> int:
    end = os.lseek(fd, 0, os.SEEK_END)
    room = end - spec.offset
    size = spec.size if spec.size is not None else room - room % spec.sector_size
    if size <= 0 or size > room:
        raise StorageError(f"{spec.backing} has {end} bytes: no room for {size} bytes of data "
                           f"at offset {spec.offset}", fix="check offset and size")
    return size


def _cipher(spec: CryptSpec, key: SecretBytes, factory: CipherFactory) -> SectorCipher:
    cipher = factory(spec.cipher, key.buffer, sector_size=spec.sector_size,
                     iv_large_sectors=spec.iv_large_sectors, iv_offset=spec.iv_offset)
    if cipher.sector_size != spec.sector_size:
        raise StorageError(f"{spec.cipher} works on {cipher.sector_size}-byte sectors, "
                           f"the spec says {spec.sector_size}")
    return cipher


def _open(spec: CryptSpec) -> int:
    # O_EXCL on a block device: not while it is mounted, in an array or served already.
    flags = (os.O_RDONLY if spec.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_EXCL
    try:
        return os.open(spec.backing, flags)
    except OSError as exc:
        raise StorageError(f"cannot open {spec.backing}: {exc.strerror}",
                           fix="is it there, and not in use (mounted, or served already)?") \
            from None


def _make_mountpoint(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the mountpoint {path}: {exc.strerror}") from None


def run(name: str, spec: CryptSpec, key: SecretBytes, factory: CipherFactory) -> None:
    """Open the backing device, build the cipher (then wipe ``key``), serve, flush at exit."""
    with key:
        fd = _open(spec)
        try:
            volume = Volume(FileBacking(fd), _cipher(spec, key, factory), offset=spec.offset,
                            size=_data_size(spec, fd), read_only=spec.read_only)
            key.wipe()
            _make_mountpoint(spec.mountpoint)
            serve(volume, spec.mountpoint, fsname=spec.backing, ready=_ready)
            volume.sync()
        finally:
            os.close(fd)


def main(argv: Sequence[str] | None = None, factory: CipherFactory | None = None) -> int:
    """Serve the volume NAME (argv) that stdin describes; see the module's protocol."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="keyd-crypt: %(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not _NAME.match(args[0]):
        print(f"usage: python3 -m {MODULE} VOLUME-LAYER  (spec line and key on stdin)",
              file=sys.stderr)
        return 2
    try:
        rename(args[0])
        keep_heap()
        harden()
        spec, key = read_request(sys.stdin.fileno())
        run(args[0], spec, key, factory or sector_cipher)
    except KeydError as exc:
        print(user_message(exc), file=sys.stderr)
        return exc.exit_code
    log.info("%s: unmounted", args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
