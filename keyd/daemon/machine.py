"""The per-volume state machine: ``transition(state, event, policy) -> (state, effects)``. Pure.

States: locked, waiting-for-key, unlocking, waiting-for-members, unlocked,
locking, failed. Every state accepts every event; an event that means nothing
in a state (a stale timer, a second key while one is being tried) leaves the
state as it is and, where it holds a key, asks for that key to be wiped, so
no key handle is ever leaked or used twice.

Invariants (checked by the hypothesis tests): at most one engine operation in
flight, and only in ``unlocking``/``locking``; every key handle that arrives
is either held by the state or discarded exactly once; services are started
only on entering ``unlocked`` and stopped only on entering ``locking``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from keyd.audit.ids import AuditEvent as A
from keyd.config.model import VolumePolicy
from keyd.daemon import events as ev
from keyd.daemon.effects import (
    ArmTimer,
    AskPassphrase,
    Audit,
    CancelTimer,
    DiscardKey,
    Effect,
    EmitSignal,
    KeyFailed,
    StartLock,
    StartServices,
    StartUnlock,
    StopServices,
    Timer,
)

Resume = Literal["locked", "waiting", "timed-out"]


@dataclass(frozen=True)
class Locked:
    """Closed; a stick with a valid bundle (or a D-Bus key) unlocks it."""

    reason: str = ""
    name = "locked"


@dataclass(frozen=True)
class WaitingForKey:
    """Closed at start-up, waiting ``key_timeout`` for a key; then dependents are released."""

    timed_out: bool = False
    asking: bool = False
    name = "waiting-for-key"


@dataclass(frozen=True)
class Pending:
    """A key being tried: where to go back to if it fails, and what happened meanwhile."""

    key: ev.KeyArrived
    resume: Resume = "locked"
    lock_after: bool = False
    stick_present: bool = True
    members_timer: bool = False
    members_expired: bool = False
    serial: str | None = None  # the stick that had unlocked it (kept through a D-Bus re-check)


@dataclass(frozen=True)
class Unlocking:
    """The engine is opening the stack with ``pending.key``."""

    pending: Pending
    name = "unlocking"


@dataclass(frozen=True)
class WaitingForMembers:
    """RAID members are missing; the key is kept until they appear or ``member_wait`` ends."""

    pending: Pending
    name = "waiting-for-members"


@dataclass(frozen=True)
class Unlocked:
    """Open; ``serial`` is the stick that unlocked it, ``grace`` a removal lock is pending."""

    serial: str | None = None
    grace: bool = False
    warning: str = ""
    name = "unlocked"


@dataclass(frozen=True)
class Locking:
    """The engine is closing the stack (``attempt`` > 0 after busy refusals)."""

    attempt: int = 0
    by: str = "request"
    rollback: bool = False
    # A key that arrived while a half-open stack found at start-up was rolled back (the
    # stick that was in when keyd died): used once the rollback is done.
    held: ev.KeyArrived | None = None
    name = "locking"


@dataclass(frozen=True)
class Failed:
    """An unlock or lock failed for a reason a new key alone may not fix."""

    reason: str
    message: str = ""
    name = "failed"


State = Locked | WaitingForKey | Unlocking | WaitingForMembers | Unlocked | Locking | Failed
Result = tuple[State, list[Effect]]
ALL_STATE_TYPES: tuple[type, ...] = (Locked, WaitingForKey, Unlocking, WaitingForMembers,
                                     Unlocked, Locking, Failed)


def signal(state: State, detail: str = "") -> EmitSignal:
    """The StateChanged signal announcing ``state``."""
    return EmitSignal(state.name, detail)


def held_ref(state: State) -> str | None:
    """The key handle the state holds, if any."""
    if isinstance(state, Locking):
        return state.held.ref if state.held is not None else None
    return state.pending.key.ref if isinstance(state, Unlocking | WaitingForMembers) else None


def _begin_unlock(key: ev.KeyArrived, resume: Resume, serial: str | None = None) -> Result:
    state = Unlocking(Pending(key, resume, serial=serial))
    return state, [StartUnlock(key.ref),
                   Audit(A.UNLOCK_STARTED, f"unlocking with a key from {key.source}"
                         + (f" ({key.by})" if key.by else ""), reason=key.by,
                         serial=key.serial, signer=key.signer, bundle_id=key.bundle_id),
                   signal(state)]


def _begin_lock(by: str, *, rollback: bool = False) -> Result:
    state = Locking(by=by, rollback=rollback)
    return state, [StopServices(), StartLock(),
                   Audit(A.LOCK_STARTED, f"locking ({by})", reason=by), signal(state)]


def _accept_key(key: ev.KeyArrived, policy: VolumePolicy, resume: Resume) -> Result | None:
    """None when the key may be used; else the refusal."""
    if key.source == "stick" and not policy.auto_unlock:
        return None
    return _begin_unlock(key, resume)


def _on_locked(state: Locked, event: ev.Event, policy: VolumePolicy) -> Result:
    if isinstance(event, ev.Observed):
        return _observed(event, policy)
    if isinstance(event, ev.KeyArrived):
        return _accept_key(event, policy, "locked") or (state, [DiscardKey(event.ref)])
    if isinstance(event, ev.LockRequested):
        return _begin_lock(event.by)
    return state, []


def _observed(event: ev.Observed, policy: VolumePolicy) -> Result:
    if event.state == "unlocked":
        unlocked = Unlocked()
        return unlocked, [StartServices(), Audit(A.RECONCILED, "found unlocked at start-up",
                                                 result="unlocked"), signal(unlocked)]
    if event.state == "partial":
        state, effects = _begin_lock("start-up rollback", rollback=True)
        return state, [Audit(A.RECONCILED, "found half-open at start-up: rolling back",
                             result="partial"), *effects]
    waiting = WaitingForKey()
    return waiting, [ArmTimer(Timer.KEY, policy.key_timeout), signal(waiting)]


def _on_waiting(state: WaitingForKey, event: ev.Event, policy: VolumePolicy) -> Result:
    if isinstance(event, ev.KeyArrived):
        resume: Resume = "timed-out" if state.timed_out else "waiting"
        return _accept_key(event, policy, resume) or (state, [DiscardKey(event.ref)])
    if isinstance(event, ev.KeyTimeout) and not state.timed_out:
        return _key_timeout(policy)
    if isinstance(event, ev.PassphraseUnavailable) and state.asking:
        return replace(state, asking=False), [Audit(
            A.PASSPHRASE_FALLBACK, f"passphrase prompt unanswered: {event.reason}",
            result="unanswered", reason=event.reason)]
    if isinstance(event, ev.LockRequested):
        state_, effects = _begin_lock(event.by)
        return state_, [CancelTimer(Timer.KEY), *effects]
    return state, []


def _key_timeout(policy: VolumePolicy) -> Result:
    state = WaitingForKey(timed_out=True, asking=policy.passphrase)
    effects: list[Effect] = [
        Audit(A.KEY_TIMEOUT, f"no key within {policy.key_timeout:g} s; dependents "
              f"{'start degraded' if policy.dependents == 'degraded' else 'are skipped'}",
              result=policy.dependents),
        signal(state, f"key-timeout: dependents {policy.dependents}")]
    if policy.passphrase:
        effects += [AskPassphrase(policy.passphrase_timeout),
                    Audit(A.PASSPHRASE_FALLBACK, "asking for the passphrase", result="asking")]
    return state, effects


def _on_unlocking(state: Unlocking, event: ev.Event, policy: VolumePolicy) -> Result:
    pending = state.pending
    if isinstance(event, ev.UnlockSucceeded):
        return _unlocked(pending, event, policy)
    if isinstance(event, ev.UnlockFailed):
        return _unlock_failed(pending, event, policy)
    if isinstance(event, ev.KeyArrived):
        return state, [DiscardKey(event.ref)]
    return Unlocking(_note(pending, event)), []


def _note(pending: Pending, event: ev.Event) -> Pending:
    """What an unlock in progress remembers for when it ends."""
    if isinstance(event, ev.StickRemoved) and event.serial == pending.key.serial:
        return replace(pending, stick_present=False)
    if isinstance(event, ev.LockRequested):
        return replace(pending, lock_after=True)
    if isinstance(event, ev.KeyTimeout) and pending.resume == "waiting":
        return replace(pending, resume="timed-out")
    if isinstance(event, ev.MembersTimeout) and pending.members_timer:
        # The wait for members ran out during a retry: if this one fails too, give up.
        return replace(pending, members_timer=False, members_expired=True)
    return pending


def _finish(pending: Pending, *, keep_key_timer: bool = False) -> list[Effect]:
    """Wipe the key tried and stop the timers that waited for this unlock."""
    cancels: list[Effect] = [] if keep_key_timer else [CancelTimer(Timer.KEY)]
    if pending.members_timer:
        cancels.append(CancelTimer(Timer.MEMBERS))
    return [DiscardKey(pending.key.ref), *cancels]


def _degraded(key: ev.KeyArrived, event: ev.UnlockSucceeded) -> list[Effect]:
    """One DEGRADED record per thing the unlock accepted degraded (policy allowed it)."""
    return [Audit(A.DEGRADED, f"unlocked degraded: {line}", result="degraded",
                  serial=key.serial, signer=key.signer, bundle_id=key.bundle_id)
            for line in event.degraded]


def _unlocked(pending: Pending, event: ev.UnlockSucceeded, policy: VolumePolicy) -> Result:
    key = pending.key
    done = Audit(A.UNLOCK_FINISHED, "unlocked" if event.changed else "was already unlocked",
                 result="unlocked" if event.changed else "already-unlocked", serial=key.serial,
                 signer=key.signer, bundle_id=key.bundle_id, seconds=event.seconds)
    effects = [*_finish(pending), done, *_degraded(key, event)]
    if pending.lock_after:
        state, lock = _begin_lock("request during unlock")
        return state, effects + lock
    serial = key.serial if key.source == "stick" else pending.serial
    unlocked = Unlocked(serial=serial)
    effects += [StartServices(), signal(unlocked)]
    if serial is not None and not pending.stick_present and policy.lock_on_removal:
        grace, more = _grace(unlocked, policy)
        return grace, effects + more
    return unlocked, effects


def _unlock_failed(pending: Pending, event: ev.UnlockFailed, policy: VolumePolicy) -> Result:
    key = pending.key
    failed = Audit(A.UNLOCK_FAILED, event.message or event.reason, result=event.kind,
                   reason=event.reason, serial=key.serial, signer=key.signer,
                   bundle_id=key.bundle_id)
    if event.kind == "members" and not pending.lock_after:
        return _wait_members(pending, policy, failed)
    # A wrong key sends a waiting volume back to waiting: its start-up key timer keeps running.
    keep = event.kind == "key" and pending.resume == "waiting" and not pending.lock_after
    effects: list[Effect] = [*_finish(pending, keep_key_timer=keep), failed]
    if event.kind == "key" and key.serial is not None and key.source == "stick":
        effects.append(KeyFailed(key.serial))
    if pending.lock_after:
        return Locked("request during unlock"), [*effects, signal(Locked())]
    if event.kind == "error":
        state: State = Failed(event.reason, event.message)
        return state, [*effects, signal(state, event.message)]
    return _resume(pending.resume, policy, effects)


def _resume(resume: Resume, policy: VolumePolicy, effects: list[Effect]) -> Result:
    if resume == "locked":
        state: State = Locked("wrong key")
        return state, [*effects, signal(state, "wrong key")]
    if resume == "waiting":
        state = WaitingForKey()
        return state, [*effects, signal(state, "wrong key")]
    state, more = _key_timeout(policy)
    return state, [*effects, *more]


def _wait_members(pending: Pending, policy: VolumePolicy, failed: Audit) -> Result:
    if pending.members_expired:
        return _give_up_members(pending, policy)
    state = WaitingForMembers(replace(pending, members_timer=True))
    effects: list[Effect] = []
    if not pending.members_timer:
        effects += [ArmTimer(Timer.MEMBERS, policy.member_wait),
                    Audit(A.DEGRADED, f"RAID members missing: waiting up to "
                          f"{policy.member_wait:g} s", result="waiting", reason=failed.reason)]
    return state, [*effects, signal(state)]


def _give_up_members(pending: Pending, policy: VolumePolicy) -> Result:
    failed = Failed("MEMBERS_MISSING", "RAID members still missing")
    return failed, [*_finish(pending),
                    Audit(A.DEGRADED, f"RAID members missing after {policy.member_wait:g} s:"
                          " gave up", result="refused", reason="MEMBERS_MISSING"),
                    signal(failed, failed.message)]


def _on_members(state: WaitingForMembers, event: ev.Event, policy: VolumePolicy) -> Result:
    pending = state.pending
    if isinstance(event, ev.MemberAdded):
        return Unlocking(pending), [StartUnlock(pending.key.ref)]
    if isinstance(event, ev.MembersTimeout):
        return _give_up_members(replace(pending, members_timer=False), policy)
    if isinstance(event, ev.KeyArrived):
        return state, [DiscardKey(event.ref)]
    if isinstance(event, ev.StickRemoved) and event.serial == pending.key.serial:
        return WaitingForMembers(replace(pending, stick_present=False)), []
    if isinstance(event, ev.LockRequested):
        locked = Locked(event.by)
        return locked, [*_finish(pending), signal(locked)]
    return state, []


def _grace(state: Unlocked, policy: VolumePolicy) -> Result:
    return replace(state, grace=True), [
        ArmTimer(Timer.GRACE, policy.grace),
        Audit(A.GRACE_STARTED, f"stick removed: locking in {policy.grace:g} s",
              serial=state.serial, result="armed"),
        EmitSignal("unlocked", f"stick removed: locking in {policy.grace:g} s")]


def _key_while_unlocked(state: Unlocked, event: ev.KeyArrived) -> Result:
    if state.grace and event.source == "stick" and event.serial is not None:
        back = Unlocked(serial=event.serial)
        return back, [DiscardKey(event.ref), CancelTimer(Timer.GRACE),
                      Audit(A.GRACE_STARTED, "a valid stick is back: removal lock cancelled",
                            serial=event.serial, result="cancelled"), signal(back)]
    if event.source == "dbus" and not state.grace:
        # A request (keydctl unlock): the engine compares with the kernel, where
        # `keydctl lock --direct` may have closed the stack behind keyd's back.
        return _begin_unlock(event, "locked", state.serial)
    return state, [DiscardKey(event.ref)]


def _on_unlocked(state: Unlocked, event: ev.Event, policy: VolumePolicy) -> Result:
    if isinstance(event, ev.KeyArrived):
        return _key_while_unlocked(state, event)
    if (isinstance(event, ev.StickRemoved) and event.serial is not None
            and event.serial == state.serial and policy.lock_on_removal and not state.grace):
        return _grace(state, policy)
    if isinstance(event, ev.GraceExpired) and state.grace:
        return _begin_lock("stick removed")
    if isinstance(event, ev.LockRequested):
        locking, effects = _begin_lock(event.by)
        return locking, ([CancelTimer(Timer.GRACE)] if state.grace else []) + effects
    return state, []


def _on_locking(state: Locking, event: ev.Event, policy: VolumePolicy) -> Result:
    if isinstance(event, ev.LockSucceeded):
        return _locked(state, event, policy)
    if isinstance(event, ev.LockBusy):
        return _busy(state, event, policy)
    if isinstance(event, ev.LockFailed):
        failed = Failed(event.reason, event.message)
        return failed, [*_drop_held(state), Audit(A.LOCK_FAILED, event.message or event.reason,
                                                  result="failed", reason=event.reason),
                        signal(failed, event.message)]
    if isinstance(event, ev.LockRetry) and state.attempt > 0:
        return state, [StartLock()]
    return _hold_during_rollback(state, event)


def _hold_during_rollback(state: Locking, event: ev.Event) -> Result:
    """Keys arriving while locking: kept only during a start-up rollback, else discarded."""
    if isinstance(event, ev.KeyArrived):
        if not state.rollback:
            return state, [DiscardKey(event.ref)]
        return replace(state, held=event), _drop_held(state)  # the newest key is kept
    if state.held is not None and (isinstance(event, ev.LockRequested) or (
            isinstance(event, ev.StickRemoved) and state.held.serial == event.serial)):
        return replace(state, held=None), _drop_held(state)  # locked on purpose, or key gone
    return state, []


def _drop_held(state: Locking) -> list[Effect]:
    return [DiscardKey(state.held.ref)] if state.held is not None else []


def _locked(state: Locking, event: ev.LockSucceeded, policy: VolumePolicy) -> Result:
    done = Audit(A.LOCK_FINISHED, "rolled back" if state.rollback else "locked",
                 result="rolled-back" if state.rollback else "locked", reason=state.by,
                 seconds=event.seconds)
    if state.rollback and state.held is not None:
        unlocking, effects = _begin_unlock(state.held, "waiting")
        return unlocking, [done, *effects]
    if state.rollback:
        waiting = WaitingForKey()
        return waiting, [done, ArmTimer(Timer.KEY, policy.key_timeout), signal(waiting)]
    locked = Locked(state.by)
    return locked, [done, signal(locked)]


def _busy(state: Locking, event: ev.LockBusy, policy: VolumePolicy) -> Result:
    if state.attempt < policy.lock_retries and not state.rollback:
        return replace(state, attempt=state.attempt + 1), [
            ArmTimer(Timer.LOCK_RETRY, policy.lock_retry_delay),
            Audit(A.LOCK_BUSY, f"busy, retrying in {policy.lock_retry_delay:g} s: "
                  f"{event.holders}", result="retrying", reason="BUSY")]
    if state.rollback:
        failed = Failed("BUSY", f"half-open stack is in use: {event.holders}")
        return failed, [*_drop_held(state),
                        Audit(A.LOCK_BUSY, failed.message, result="failed", reason="BUSY"),
                        signal(failed, failed.message)]
    warning = f"lock refused, volume busy: {event.holders}"
    unlocked = Unlocked(warning=warning)
    return unlocked, [StartServices(),
                      Audit(A.LOCK_BUSY, f"{warning}; stays unlocked", result="stays-unlocked",
                            reason="BUSY"), signal(unlocked, warning)]


def _on_failed(state: Failed, event: ev.Event, policy: VolumePolicy) -> Result:
    if isinstance(event, ev.KeyArrived):
        return _accept_key(event, policy, "locked") or (state, [DiscardKey(event.ref)])
    if isinstance(event, ev.LockRequested):
        return _begin_lock(event.by)
    return state, []


def _dispatch(state: State, event: ev.Event, policy: VolumePolicy) -> Result:
    result: Result
    match state:
        case Locked():
            result = _on_locked(state, event, policy)
        case WaitingForKey():
            result = _on_waiting(state, event, policy)
        case Unlocking():
            result = _on_unlocking(state, event, policy)
        case WaitingForMembers():
            result = _on_members(state, event, policy)
        case Unlocked():
            result = _on_unlocked(state, event, policy)
        case Locking():
            result = _on_locking(state, event, policy)
        case Failed():
            result = _on_failed(state, event, policy)
    return result


def transition(state: State, event: ev.Event, policy: VolumePolicy) -> Result:
    """The next state and the effects to carry out, for ``event`` in ``state``. Pure."""
    if isinstance(event, ev.BundleRejected):
        return state, [Audit(A.BUNDLE_REJECTED, f"bundle rejected: {event.reason}",
                             result="rejected", reason=event.reason, serial=event.serial,
                             bundle_id=event.bundle_id)]
    return _dispatch(state, event, policy)
