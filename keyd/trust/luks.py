"""Add an enrolled key to a LUKS keyslot without the new key ever touching a disk.

``cryptsetup luksAddKey`` reads the *existing* key from stdin (``--key-file -``,
the runner's ``secret``) and the *new* key from a file argument. That file is a
``memfd`` (anonymous RAM, best effort: it can be swapped like any memory)
named by its ``/proc/<keyd pid>/fd/N`` path: cryptsetup opens it by path, so
the runner needs no descriptor passing. The memfd is truncated and closed
right after, and no key byte appears in argv.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from keyd.runner import Runner
from keyd.trust.secret import SecretBytes


@contextlib.contextmanager
def memfd_path(secret: SecretBytes) -> Iterator[str]:
    """Yield a ``/proc/<pid>/fd/N`` path whose content is ``secret``; drop it on exit."""
    fd = os.memfd_create("keyd-new-key", os.MFD_CLOEXEC)
    try:
        view = memoryview(secret.buffer)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)


def luks_uuid(runner: Runner, device: str) -> str:
    """The LUKS UUID of ``device`` (raises ProgramError if it is not LUKS)."""
    return runner.run(["cryptsetup", "luksUUID", device]).stdout.strip()


def add_keyslot(runner: Runner, device: str, new_key: SecretBytes, existing_key: SecretBytes,
                *, iter_time_ms: int | None = None) -> None:
    """Add ``new_key`` to a free keyslot of ``device``, unlocking with ``existing_key``."""
    iter_time = ["--iter-time", str(iter_time_ms)] if iter_time_ms else []
    with memfd_path(new_key) as path:
        runner.run(["cryptsetup", "luksAddKey", "--batch-mode", "--key-file", "-", *iter_time,
                    device, path], secret=existing_key.buffer, timeout=300)
