"""Keys handed to keyd as file descriptors over D-Bus: what is accepted, and how it is read.

A caller controls what the descriptor is. A pipe whose writer stays open, a socket, a
terminal or a file on a hung network or FUSE file system would block a plain read, and
keyd reads in its main loop: udev events, D-Bus and the watchdog pings would stop with
it. So only two kinds are accepted: a memfd sealed against writes, shrinking and growing
(what keydctl sends: its content cannot change while keyd reads it), or a regular file.
Type, seals and size are checked and the bytes read in a thread of their own with a
deadline; the loop waits for that thread at most :data:`READ_DEADLINE` seconds.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading

from keyd.engine.keys import MAX_KEY_BYTES
from keyd.errors import KeydError
from keyd.trust.secret import SecretBytes

READ_DEADLINE = 2.0  # seconds the loop waits for a key read
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_USE = "pass a memfd sealed against writes (keydctl does) or an open regular file"


class BadKeyFd(KeydError):
    """The file descriptor cannot carry a key (its kind, its seals, its size, or a hung read)."""


def read_key_fd(fd: int, deadline: float = READ_DEADLINE) -> SecretBytes:
    """Check and read the key in ``fd`` (closed afterwards), giving up after ``deadline`` s."""
    result: list[SecretBytes | BaseException] = []

    def work() -> None:
        try:
            result.append(_checked_read(fd))
        except BaseException as exc:  # handed to the waiting loop
            result.append(exc)
        finally:
            os.close(fd)

    reader = threading.Thread(target=work, name="keyd-key-fd", daemon=True)
    reader.start()
    reader.join(deadline)
    if not result:  # the thread stays blocked; the loop goes on
        raise BadKeyFd(f"reading the key file descriptor did not finish within {deadline:g} s",
                       fix=_USE)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _checked_read(fd: int) -> SecretBytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise BadKeyFd(f"the key file descriptor is a {_kind(info.st_mode)}, not a sealed memfd "
                       "or a regular file", fix=_USE)
    _require_seals(fd)
    if not 0 < info.st_size <= MAX_KEY_BYTES:
        raise BadKeyFd(f"the key file descriptor holds {info.st_size} bytes",
                       fix=f"pass 1..{MAX_KEY_BYTES} bytes of key")
    buffer = bytearray(info.st_size)
    got = os.preadv(fd, [buffer], 0)
    if got != info.st_size:
        buffer[:] = bytes(len(buffer))
        raise BadKeyFd(f"the key file changed while it was read ({got} of {info.st_size} bytes)",
                       fix=_USE)
    return SecretBytes.adopt(buffer)


def _require_seals(fd: int) -> None:
    """A memfd must be sealed; a regular file on a file system has no seals to check."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: not a memfd (or shmem file)
        return
    if seals & SEALS != SEALS:
        raise BadKeyFd("the key memfd is not sealed against writes, shrinking and growing",
                       fix="memfd_create(MFD_ALLOW_SEALING), write the key, then F_ADD_SEALS "
                           "F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "pipe"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"
