"""What keyd knows about one volume, and what it shows of it. Pure data, no I/O.

The daemon is level-triggered: events only change these facts, and
:mod:`keyd.daemon.reconcile` derives from them, every time, what the volume
should be and which one job moves it there. Nothing an event says is "used up"
by the moment it arrives: a key from a stick stays on offer while the stick is
in, an admin's request stays until a newer one (or a newer stick) replaces it,
and what the kernel has comes from observation and from the jobs' results.

Key bytes never appear here: an offered key is a handle (``ref``) into the
daemon's :class:`~keyd.daemon.keystore.KeyStore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from keyd.config.model import VolumePolicy
from keyd.daemon.events import KeyArrived, ObservedKind

Job = Literal["unlock", "lock", "mend"]
Grace = Literal["off", "armed", "expired"]
Members = Literal["ok", "waiting", "gave-up"]


# A key on offer is the event that brought it: a handle and where it came from.
Offer = KeyArrived


def one_shot(offer: Offer) -> bool:
    """A request's key (D-Bus, passphrase) is tried once; a stick's stays while it is in."""
    return offer.source != "stick"


@dataclass(frozen=True)
class Intent:
    """The newest admin request for the volume: ``lock`` or ``unlock``, and who asked."""

    kind: Literal["lock", "unlock"]
    by: str
    seq: int = 0  # when it was asked: a stick inserted before it does not override it


@dataclass(frozen=True)
class VolumeFacts:
    """Everything the goal and the next job of one volume are derived from."""

    kernel: ObservedKind = "locked"     # what is open, as last observed or left by a job
    job: Job | None = None              # the one engine job running for it
    trying: Offer | None = None         # the key the running unlock (or mend) uses
    offers: tuple[Offer, ...] = ()      # keys waiting to be tried, oldest first
    intent: Intent | None = None        # the newest admin request, until a stick replaces it
    locked_at: int = 0                  # when the newest lock request came: sticks in before
                                        # it do not unlock the volume
    opened_by: str | None = None        # the stick that unlocked it (lock_on_removal applies)
    holders: frozenset[str] = frozenset()  # present sticks whose bundle for it verified
    booting: bool = True                # locked since start-up: key_timeout runs
    key_timed_out: bool = False
    want_passphrase: bool = False
    asking: bool = False
    grace: Grace = "off"
    devices: int = 0                    # block devices that appeared since start-up
    blocked_at: int | None = None       # ``devices`` when an unlock last failed for want of them
    members: Members = "ok"
    failure: str = ""                   # why the last unlock or lock failed (the detail)
    failed: bool = False                # ... and it was a fault, not a wrong key
    lock_attempts: int = 0
    recheck: bool = False               # a lock request: the engine looks at the kernel even if
                                        # keyd believes it locked (`lock --direct` behind its back)
    retry_due: bool = False
    refused: bool = False               # a lock gave up (busy or failed): not retried by itself
    rollback: bool = False              # the running lock closes a half-open stack from a crash
    warning: str = ""
    degraded: bool = False              # open with a side missing: mended when disks appear
    mended_at: int | None = None        # ``devices`` at the last mend (or unlock)
    shares: tuple[int, int] | None = None  # k-of-n: (shares held, shares needed)
    shutdown: bool = False              # the system goes down: locked, and nothing opens


def state_name(facts: VolumeFacts) -> str:
    """The state keyd reports (D-Bus, ``keydctl status``), derived from the facts."""
    if facts.job in ("unlock", "lock"):
        return "unlocking" if facts.job == "unlock" else "locking"
    if facts.kernel == "unlocked":
        return "unlocked"
    if facts.members == "waiting":
        return "waiting-for-members"
    if facts.failed:
        return "failed"
    return "waiting-for-key" if facts.booting else "locked"


def detail(facts: VolumeFacts, policy: VolumePolicy) -> str:
    """The one-line detail next to the state (``keydctl wait`` reads the key-timeout one)."""
    name = state_name(facts)
    if name in ("locked", "waiting-for-key") and facts.shares is not None:
        have, need = facts.shares
        more = need - have
        return f"waiting for {more} more stick{'s' if more > 1 else ''} ({have} of {need} shares)"
    if name == "waiting-for-key" and facts.key_timed_out:
        return f"key-timeout: dependents {policy.dependents}"
    if name == "unlocked" and facts.grace == "armed":
        return f"stick removed: locking in {policy.grace:g} s"
    if name == "unlocked":
        return facts.warning
    return facts.failure
