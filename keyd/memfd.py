"""Secrets handed to a program as a file path without ever touching a disk.

Some secrets must reach a program as a file argument (``cryptsetup luksAddKey``'s new
key, TrueCrypt keyfiles): keyd writes them to a ``memfd`` (anonymous RAM; best effort,
it can be swapped like any memory) and names it by its ``/proc/<keyd pid>/fd/N`` path,
which the program opens like a file: the runner needs no descriptor passing, and no key
byte appears in argv. The memfd is truncated and closed right after.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def memfd_path(secret: bytes | bytearray) -> Iterator[str]:
    """Yield a ``/proc/<pid>/fd/N`` path whose content is ``secret``; drop it on exit."""
    fd = os.memfd_create("keyd-secret", os.MFD_CLOEXEC)
    try:
        view = memoryview(secret)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)
