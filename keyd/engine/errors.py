"""Errors of the storage engine; all derive from :class:`keyd.errors.KeydError`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keyd.errors import KeydError


class StorageError(KeydError):
    """The stack cannot be brought up or down as configured (conflicts, missing devices)."""

    exit_code = 1


class DegradedRefused(StorageError):
    """A RAID layer lacks members and its degraded policy forbids starting it."""


class DevicesMissing(StorageError):
    """A configured device or every member of an array is not there (yet): a wait, not a fault.

    At boot, disks often appear after the key stick; the daemon retries when block devices
    appear instead of giving up.
    """


class KeyRejected(KeydError):
    """The key did not open the layer (wrong key, wrong parameters, or too short)."""

    exit_code = 6


class WrongVolume(KeyRejected):
    """The key opened a volume whose UUIDs are not the one its signed bundle names."""


@dataclass(frozen=True)
class Holder:
    """A process keeping a mount or device busy, and how (cwd, an open file...)."""

    pid: int
    command: str
    how: str
    path: str

    def __str__(self) -> str:
        return f"{self.pid} ({self.command}): {self.how} {self.path}"


class VolumeBusy(KeydError):
    """Lock refused: processes (or other mounts) still use the volume."""

    exit_code = 5

    def __init__(self, volume: str, holders: Sequence[Holder], reasons: Sequence[str] = (),
                 *, fix: str | None = None) -> None:
        lines = [f"volume {volume} is busy"]
        lines += [f"  pid {holder}" for holder in holders]
        lines += [f"  {reason}" for reason in reasons]
        super().__init__("\n".join(lines), fix=fix or (
            "stop those processes (or run `keydctl lock --force` to stop the volume's "
            "configured services first); keyd never kills processes"))
        self.volume = volume
        self.holders = tuple(holders)
        self.reasons = tuple(reasons)
        # At shutdown: what was flushed or remounted read-only instead (Executor.lock).
        self.quiesced: tuple[str, ...] = ()


class VolumeLocked(KeydError):
    """Another keyd process is working on the same volume."""

    exit_code = 5
