"""What the pure core (keyd.daemon.reconcile) asks the world to do: plain data, carried out by the daemon."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from keyd.audit.ids import AuditEvent


class Timer(enum.StrEnum):
    """The per-volume timers; at most one of each kind runs per volume."""

    GRACE = "grace"
    KEY = "key"
    MEMBERS = "members"
    LOCK_RETRY = "lock-retry"


@dataclass(frozen=True)
class StartUnlock:
    """Open the volume's stack with the key behind ``ref`` (in a worker, not the loop)."""

    ref: str


@dataclass(frozen=True)
class StartLock:
    """Close the volume's stack (in a worker); first stop its services, waiting for them.

    ``quiesce`` (at shutdown): if the volume is busy, flush its file systems instead.
    """

    stop_services: bool = False
    quiesce: bool = False


@dataclass(frozen=True)
class StartMend:
    """Bring back the sides of the open, degraded volume whose disks are here now (in a
    worker); ``ref`` is the key for their crypt layers (None: only key-less sides)."""

    ref: str | None = None


@dataclass(frozen=True)
class RecheckSticks:
    """Read the plugged-in sticks with these identities again (their keys come back as
    KeyArrived events, with the order they went in)."""

    serials: tuple[str, ...]


@dataclass(frozen=True)
class DiscardKey:
    """Wipe and forget the key behind ``ref``."""

    ref: str


@dataclass(frozen=True)
class ArmTimer:
    """Start (or restart) ``timer``; its expiry comes back as an event."""

    timer: Timer
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    """Stop ``timer`` if it runs."""

    timer: Timer


@dataclass(frozen=True)
class StartServices:
    """Start the volume's configured units and ``keyd-unlocked@VOLUME.target``."""


@dataclass(frozen=True)
class AskPassphrase:
    """Ask for the volume's passphrase through systemd-ask-password (in a worker)."""

    timeout: float


@dataclass(frozen=True)
class KeyFailed:
    """The key from stick ``serial`` did not open the volume: count it for that stick's backoff."""

    serial: str


@dataclass(frozen=True)
class Audit:
    """Write one audit record about this volume (the daemon adds the volume's name)."""

    event: AuditEvent
    message: str
    result: str | None = None
    reason: str | None = None
    serial: str | None = None
    signer: str | None = None
    bundle_id: str | None = None
    seconds: float | None = None


Effect = (StartUnlock | StartLock | StartMend | RecheckSticks | DiscardKey | ArmTimer
          | CancelTimer | StartServices | AskPassphrase | KeyFailed | Audit)
