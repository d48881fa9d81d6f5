"""A volume's decrypted data area as one file, ``volume``, on a FUSE mount.

keyd attaches that file to a loop device, so the layers above see a block device as they
would over dm-crypt. The binding is pyfuse3 (libfuse3's low-level API, compiled): Debian 12
ships it as python3-pyfuse3, so the Debian package needs nothing from outside Debian, and the
venv builds PyPI's pyfuse3 against libfuse3-dev; mfusepy is not in Debian and fusepy is
unmaintained, and both drive libfuse's path-based high-level API through ctypes. pyfuse3 runs
on trio and is an optional extra: it and trio are imported by :func:`serve` only, so the
kernel (dm-crypt) path and the pure data path below never need them.

The data path is pure arithmetic (:func:`span`, :func:`partial_sectors`, :func:`merge`) over a
:class:`SectorCipher` and a :class:`Backing`, in :class:`Volume`: reads decrypt the whole
sectors a request touches and cut the request out of them; writes encrypt whole sectors and
read, decrypt and merge the old plaintext of a sector they cover only in part. The file is
opened ``direct_io``: no second copy in the page cache, and requests as large as libfuse3
negotiates (1 MiB; a loop device sends its 1 MiB writes as 1020 KiB + 4 KiB). Reads and writes
are served on the event loop itself and only syncs, which wait for the disk, in a thread:
measured, handing each request to a worker thread cost more than it gained (the cipher holds
the GIL: two threads decrypt slower than one; 4 KiB reads ran at half the rate; 1 MiB reads
with 4096-byte sectors at 0.45-0.5 of the cipher's rate instead of 0.6), and the backing
device's own readahead already overlaps its reads with the cipher work.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

from keyd.crypto.ciphers import SectorCipher
from keyd.engine.errors import StorageError
from keyd.errors import KeydError

if TYPE_CHECKING:
    import pyfuse3
    import trio

log = logging.getLogger("keyd.crypto.fuse")

VOLUME_NAME = "volume"
# The mount's root directory is pyfuse3.ROOT_INODE (1); the one file is the next inode.
ROOT_INODE, VOLUME_INODE = 1, 2
# The file's attributes never change while it is mounted: the kernel may cache them for long.
ATTR_TIMEOUT = 3600.0
# pyfuse3 tasks: one serving, a few waiting for a sync, one reading the next request; each
# holds a 1 MiB request buffer, locked in memory like the rest of the process.
MAX_TASKS = 4
FSTYPE = "keyd-crypt"

P = ParamSpec("P")
T = TypeVar("T")


class Backing(Protocol):
    """Where the ciphertext lives (a block device or an image file), addressed in bytes."""

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``."""
        ...

    def pwrite(self, data: bytes | bytearray, offset: int) -> None:
        """All of ``data`` at ``offset``."""
        ...

    def fsync(self) -> None:
        """Return once what was written is on the device."""
        ...


class FileBacking:
    """A :class:`Backing` over an open descriptor; positional I/O, so threads may share it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; EIO past the end (the size was checked)."""
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        while (done := sum(map(len, parts))) < length:
            more = os.pread(self.fd, length - done, offset + done)
            if not more:
                raise OSError(errno.EIO, "the backing device ended inside the volume")
            parts.append(more)
        return b"".join(parts)

    def pwrite(self, data: bytes | bytearray, offset: int) -> None:
        """All of ``data`` at ``offset`` (pwrite may write less than asked)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def fsync(self) -> None:
        """``fsync(2)`` the descriptor."""
        os.fsync(self.fd)


@dataclass(frozen=True)
class Span:
    """The whole sectors a byte range touches: ``count`` from ``first``, with ``head`` bytes of
    the first sector before the range and ``tail`` bytes of the last one after it."""

    first: int
    count: int
    head: int
    tail: int

    @property
    def aligned(self) -> bool:
        """Whether the range covers its sectors exactly."""
        return self.head == 0 and self.tail == 0


def span(offset: int, length: int, sector_size: int) -> Span:
    """The sectors that ``length`` (> 0) bytes at ``offset`` touch."""
    first, head = divmod(offset, sector_size)
    end = offset + length
    stop = -(-end // sector_size)
    return Span(first, stop - first, head, stop * sector_size - end)


def within(offset: int, length: int, size: int) -> int:
    """How many of ``length`` bytes at ``offset`` lie inside a volume of ``size`` bytes."""
    return max(0, min(length, size - offset))


def partial_sectors(where: Span) -> tuple[int, ...]:
    """The sectors a write covers only in part: their old plaintext must be merged in."""
    last = where.first + where.count - 1
    edges = [where.first] if where.head else []
    if where.tail and last not in edges:
        edges.append(last)
    return tuple(edges)


def merge(where: Span, sector_size: int, old: Mapping[int, bytes], data: bytes) -> bytearray:
    """The plaintext of ``where``'s sectors once ``data`` is written at ``where.head``:
    ``old`` gives the plaintext of the partial sectors (:func:`partial_sectors`)."""
    plain = bytearray(where.count * sector_size)
    for sector, text in old.items():
        at = (sector - where.first) * sector_size
        plain[at:at + sector_size] = text
    plain[where.head:where.head + len(data)] = data
    return plain


class Volume:
    """The decrypted data area: ``size`` bytes at byte ``offset`` of ``backing``.

    Methods are blocking and thread-safe; errors are OSErrors with the errno a file gives.
    """

    def __init__(self, backing: Backing, cipher: SectorCipher, *, offset: int, size: int,
                 read_only: bool) -> None:
        self.backing = backing
        self.cipher = cipher
        self.offset = offset
        self.size = size
        self.read_only = read_only
        self.sector_size = cipher.sector_size
        # Two writes into different parts of one sector must not both merge into the same old
        # plaintext (the second would undo the first); whole-sector writes need no lock.
        self._merging = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer at the end, none past it."""
        length = within(offset, length, self.size)
        if length == 0:
            return b""
        where = span(offset, length, self.sector_size)
        plain = self._sectors(where.first, where.count)
        return plain if where.aligned else plain[where.head:where.head + length]

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``; returns how much fits (ENOSPC if nothing does)."""
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        length = within(offset, len(data), self.size)
        if length == 0:
            if data:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return 0
        data = data if length == len(data) else data[:length]
        where = span(offset, length, self.sector_size)
        if where.aligned:
            self._store(where.first, data)
            return length
        with self._merging:
            old = {sector: self._sectors(sector, 1) for sector in partial_sectors(where)}
            self._store(where.first, merge(where, self.sector_size, old, data))
        return length

    def sync(self) -> None:
        """Return once every write so far is on the backing device."""
        self.backing.fsync()

    def _sectors(self, first: int, count: int) -> bytes:
        at = self.offset + first * self.sector_size
        return self.cipher.decrypt(first, self.backing.pread(count * self.sector_size, at))

    def _store(self, first: int, plain: bytes | bytearray) -> None:
        data = plain if isinstance(plain, bytes) else bytes(plain)
        at = self.offset + first * self.sector_size
        self.backing.pwrite(self.cipher.encrypt(first, data), at)


class BindingMissing(KeydError):
    """pyfuse3 (the optional ``fuse`` extra) is not installed."""

    def __init__(self) -> None:
        super().__init__("the userspace crypt backend needs pyfuse3, which is not installed",
                         fix="apt-get install python3-pyfuse3 (or pip install 'keyd[fuse]')")


def _load_binding() -> None:
    # Bound here, not at import: only the serving process needs the binding (an optional extra).
    global pyfuse3, trio  # noqa: PLW0603
    try:
        import pyfuse3  # noqa: PLC0415
        import trio  # noqa: PLC0415
    except ImportError as exc:
        raise BindingMissing() from exc


def _errors(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Turn a callback's OSError into its errno for the kernel, anything else into EIO."""
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            # A fault in the cipher or a bug: the block layer above sees a failing disk.
            log.exception("request failed: %s", type(exc).__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc
    return wrapper


def _missing() -> OSError:
    return OSError(errno.ENOENT, os.strerror(errno.ENOENT))


class VolumeOperations:
    """The FUSE callbacks of a mount holding only ``volume``; mixed into pyfuse3.Operations
    by :func:`serve`. Reads and writes run on the event loop, syncs in a worker thread."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.opened = 0
        self.stopping = False
        self.mounted_ns = time.time_ns()

    def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        """The root directory's or the volume file's attributes."""
        entry = pyfuse3.EntryAttributes()
        if inode == ROOT_INODE:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o700, 2
        elif inode == VOLUME_INODE:
            entry.st_mode = stat.S_IFREG | (0o400 if self.volume.read_only else 0o600)
            entry.st_nlink, entry.st_size = 1, self.volume.size
            entry.st_blocks = -(-self.volume.size // 512)
        else:
            raise _missing()
        entry.st_ino, entry.st_blksize = inode, self.volume.sector_size
        entry.attr_timeout = entry.entry_timeout = ATTR_TIMEOUT
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.mounted_ns
        return entry

    def stop(self) -> None:
        """End serving once nobody has the file open: unmounting under an attached loop device
        would fail every request of the file system on it."""
        self.stopping = True
        if self.opened:
            log.warning("asked to stop while the volume is open %d time(s) (a loop device?): "
                        "stopping once it is closed", self.opened)
        else:
            pyfuse3.terminate()

    async def _sync(self) -> None:
        # fsync waits for the disk: meanwhile the event loop serves other requests.
        await trio.to_thread.run_sync(self.volume.sync)

    @_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Only ``volume`` exists, in the root."""
        if parent_inode != ROOT_INODE or name != VOLUME_NAME.encode():
            raise _missing()
        return self.attributes(VOLUME_INODE)

    @_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """See :meth:`attributes`."""
        return self.attributes(inode)

    @_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Nothing about the file can change: its size is the data area's."""
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    @_errors
    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open the volume; for writing only if it is read-write."""
        if inode != VOLUME_INODE:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if self.volume.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        self.opened += 1
        # direct_io: the loop device and the file system above cache already.
        return pyfuse3.FileInfo(fh=VOLUME_INODE, direct_io=True, keep_cache=False)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Decrypted bytes; see :meth:`Volume.read`."""
        return self.volume.read(off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Encrypted onto the backing device; see :meth:`Volume.write`."""
        return self.volume.write(off, buf)

    @_errors
    async def flush(self, fh: int) -> None:
        """At every close: what was written is on the device before close returns."""
        await self._sync()

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """What was written is on the device before fsync returns (a loop device's flush)."""
        await self._sync()

    async def release(self, fh: int) -> None:
        """The last close of one open; a pending stop happens after the last one."""
        self.opened -= 1
        if self.stopping and not self.opened:
            pyfuse3.terminate()

    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Only the root is a directory."""
        if inode != ROOT_INODE:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return ROOT_INODE

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """The root lists ``volume``."""
        if start_id == 0:
            pyfuse3.readdir_reply(token, VOLUME_NAME.encode(), self.attributes(VOLUME_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        """Nothing to release."""

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The volume's size, all of it used."""
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = self.volume.sector_size
        data.f_blocks = self.volume.size // self.volume.sector_size
        data.f_files, data.f_namemax = 1, 255
        return data


def mount_options(fsname: str, *, read_only: bool) -> set[str]:
    """libfuse mount options: the source and type `findmnt` shows, read-only if asked.

    No allow_other: only root (the mount's owner) opens the file, as losetup and the loop
    device do; default_permissions lets the kernel check the file's mode.
    """
    options = {"default_permissions", f"fsname={fsname}", f"subtype={FSTYPE}"}
    return options | {"ro"} if read_only else options


def serve(volume: Volume, mountpoint: str, *, fsname: str, ready: Callable[[], None]) -> None:
    """Mount ``volume`` at ``mountpoint``; call ``ready`` once its file answers; serve until
    the mount is unmounted from outside or SIGTERM/SIGINT (see :meth:`VolumeOperations.stop`)."""
    _load_binding()
    # The mixin's callbacks come first; pyfuse3.Operations answers ENOSYS for the rest.
    operations = type("VolumeFS", (VolumeOperations, pyfuse3.Operations), {})(volume)
    try:
        pyfuse3.init(operations, mountpoint, mount_options(fsname, read_only=volume.read_only))
    except RuntimeError as exc:  # pyfuse3 says only that fuse_session_mount failed
        raise StorageError(f"cannot mount the FUSE file system at {mountpoint}",
                           fix="is /dev/fuse there (modprobe fuse), and the mountpoint a "
                               "directory?") from exc
    try:
        trio.run(_main, operations, os.path.join(mountpoint, VOLUME_NAME), ready)
    except BaseExceptionGroup as group:
        raise _first(group) from None
    finally:
        # Unmounts unless it was unmounted from outside already.
        pyfuse3.close(unmount=True)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    # trio's nursery wraps what one of its tasks raised (and the cancellations that followed).
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _main(operations: VolumeOperations, path: str, ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, operations)
        nursery.start_soon(_announce, path, operations.volume.size, ready)
        await pyfuse3.main(max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


async def _stop_on_signals(operations: VolumeOperations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for number in signals:
            log.info("signal %d: stopping", number)
            operations.stop()


async def _announce(path: str, size: int, ready: Callable[[], None]) -> None:
    # A stat through the kernel needs the loop to answer: once it returns, the mount is usable.
    try:
        found = await trio.to_thread.run_sync(os.stat, path)
    except OSError as exc:
        raise StorageError(f"the FUSE mount does not answer: {path}: {exc.strerror}") from exc
    if found.st_size != size:
        raise StorageError(f"{path} has {found.st_size} bytes, not {size}")
    ready()
