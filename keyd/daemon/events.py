"""What can happen to a volume: the closed set of events that update its facts.

Events are plain frozen data. Key material never travels in an event: an
accepted key is represented by ``ref``, a handle into the daemon's
:class:`~keyd.daemon.keystore.KeyStore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KeySourceKind = Literal["stick", "shares", "passphrase", "dbus"]
FailureKind = Literal["key", "members", "error"]
ObservedKind = Literal["locked", "unlocked", "partial"]


@dataclass(frozen=True)
class Observed:
    """Start-up reconciliation: what the kernel has of this volume right now."""

    state: ObservedKind
    degraded: bool = False  # open with a side missing (a member, a zfs vdev)


@dataclass(frozen=True)
class KeyArrived:
    """A key for this volume was accepted (a verified stick bundle, a passphrase, D-Bus)."""

    ref: str
    source: KeySourceKind = "stick"
    serial: str | None = None
    signer: str | None = None
    bundle_id: str | None = None
    by: str | None = None  # who handed it in (D-Bus: "D-Bus request by uid N"), for the audit
    seq: int = 0  # when the stick went in / the request came (the daemon's own counter)


@dataclass(frozen=True)
class BundleRejected:
    """A stick carried a bundle for this volume that failed verification."""

    serial: str | None
    reason: str
    bundle_id: str | None = None


@dataclass(frozen=True)
class UnlockSucceeded:
    """The engine opened the stack (``changed`` False: it was already open).

    ``degraded`` lists what the unlock accepted in a degraded state (e.g. a zfs
    mirror imported with a side missing), one line each; ``mended`` what it brought
    back into a volume already open degraded; ``still_degraded`` whether a side is
    missing after it (read from the kernel).
    """

    seconds: float = 0.0
    changed: bool = True
    degraded: tuple[str, ...] = ()
    mended: tuple[str, ...] = ()
    still_degraded: bool = False


@dataclass(frozen=True)
class UnlockFailed:
    """The engine could not open the stack; ``kind`` says whether the key or the members."""

    kind: FailureKind
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Mended:
    """A mend job ran: ``mended`` lists the sides it brought back (none: nothing could be)."""

    mended: tuple[str, ...] = ()
    still_degraded: bool = False


@dataclass(frozen=True)
class MendFailed:
    """Bringing a late side back failed; the volume stays open degraded."""

    reason: str
    message: str = ""


@dataclass(frozen=True)
class StickRemoved:
    """A stick left the machine."""

    serial: str | None


@dataclass(frozen=True)
class MemberAdded:
    """A block device that may be a member of some volume appeared."""


@dataclass(frozen=True)
class MemberRemoved:
    """A block device that may be a member of some volume went away."""


@dataclass(frozen=True)
class LockRequested:
    """Someone (D-Bus, keydctl) asked for the volume to be locked."""

    by: str = "request"
    seq: int = 0


@dataclass(frozen=True)
class ShutdownStarted:
    """The system is going down: every open volume is locked, and nothing opens any more."""

    by: str = "system shutdown"
    seq: int = 0


@dataclass(frozen=True)
class LockSucceeded:
    """The engine closed the stack (``changed`` False: nothing of it was open)."""

    seconds: float = 0.0
    changed: bool = True


@dataclass(frozen=True)
class LockBusy:
    """The lock was refused because processes use the volume (``holders`` names them;
    ``quiesced`` says what was flushed instead, at shutdown)."""

    holders: str = ""
    quiesced: str = ""


@dataclass(frozen=True)
class LockFailed:
    """The lock failed for another reason; ``kernel`` is what is open after it (observed)."""

    reason: str
    message: str = ""
    kernel: ObservedKind = "unlocked"


@dataclass(frozen=True)
class GraceExpired:
    """The grace timer after the unlocking stick was pulled ran out."""


@dataclass(frozen=True)
class KeyTimeout:
    """No key arrived within ``key_timeout`` of start-up."""


@dataclass(frozen=True)
class MembersTimeout:
    """Missing RAID members did not appear within ``member_wait``."""


@dataclass(frozen=True)
class LockRetry:
    """Time to try a busy lock again."""


@dataclass(frozen=True)
class PassphraseUnavailable:
    """The passphrase prompt was not answered (timeout, no agent, cancelled)."""

    reason: str = "no answer"


@dataclass(frozen=True)
class SharesHeld:
    """keyd holds ``have`` of the ``need`` shares of a k-of-n enrollment (0: none any more)."""

    have: int
    need: int


Event = (Observed | KeyArrived | BundleRejected | UnlockSucceeded | UnlockFailed | Mended
         | MendFailed | StickRemoved | MemberAdded | MemberRemoved | LockRequested
         | LockSucceeded | LockBusy | LockFailed | GraceExpired | KeyTimeout | MembersTimeout
         | LockRetry | PassphraseUnavailable | SharesHeld | ShutdownStarted)

ALL_EVENT_TYPES: tuple[type, ...] = (
    Observed, KeyArrived, BundleRejected, UnlockSucceeded, UnlockFailed, Mended, MendFailed,
    StickRemoved,
    MemberAdded, MemberRemoved, LockRequested, LockSucceeded, LockBusy, LockFailed,
    GraceExpired, KeyTimeout, MembersTimeout, LockRetry, PassphraseUnavailable, SharesHeld,
    ShutdownStarted)
