"""Add an enrolled key to a LUKS keyslot without the new key ever touching a disk.

``cryptsetup luksAddKey`` reads the *existing* key from stdin (``--key-file -``,
the runner's ``secret``) and the *new* key from a file argument: a memfd path
(keyd.memfd), so no key byte appears in argv or on a disk.
"""

from __future__ import annotations

from keyd.memfd import memfd_path
from keyd.runner import Runner
from keyd.trust.secret import SecretBytes


def luks_uuid(runner: Runner, device: str) -> str:
    """The LUKS UUID of ``device`` (raises ProgramError if it is not LUKS)."""
    return runner.run(["cryptsetup", "luksUUID", device]).stdout.strip()


def add_keyslot(runner: Runner, device: str, new_key: SecretBytes, existing_key: SecretBytes,
                *, iter_time_ms: int | None = None) -> None:
    """Add ``new_key`` to a free keyslot of ``device``, unlocking with ``existing_key``."""
    iter_time = ["--iter-time", str(iter_time_ms)] if iter_time_ms else []
    with memfd_path(new_key.buffer) as path:
        runner.run(["cryptsetup", "luksAddKey", "--batch-mode", "--key-file", "-", *iter_time,
                    device, path], secret=existing_key.buffer, timeout=300)
