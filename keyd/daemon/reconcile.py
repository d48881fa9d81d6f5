"""One volume's decisions: events update facts, then one reconcile derives the goal and the job. Pure.

``step(facts, event, policy)`` = :func:`apply` (what the event changes in
the facts, and what it must be audited as) followed by :func:`reconcile` (compare
the goal with the kernel and start at most one engine job). Nothing depends on
*when* an event came: a key offered while a lock runs is tried once the lock is
done, a stick pulled and put back during an unlock is simply present when the
unlock ends, a member that appears after ``member_wait`` still retries.

The goal, in order (keyd(8), "How keyd decides"):

1. the newest admin request (``keydctl lock``/``unlock``, D-Bus) wins, until a
   stick is inserted after it;
2. a usable key on offer (a present stick's, or a request's) means unlocked;
3. a half-open stack keyd left behind (a crash) is rolled back;
4. with ``lock_on_removal``, a volume a stick unlocked is locked once no stick whose
   bundle for it verified is plugged in any more and the grace has passed (with two
   such sticks in, pulling one changes nothing);
5. otherwise the kernel's state is kept: keyd never closes what nobody asked it to.

Once the system goes down (:class:`~keyd.daemon.events.ShutdownStarted`) every open
volume is locked and nothing opens or starts any more: keys are discarded, services
are not started again, and a busy volume is not retried but flushed and left open
for systemd-shutdown (keyd(8), SHUTDOWN).

A volume open degraded is mended (its missing sides brought back) whenever a disk
appears and no lock is wanted: the sticks that verified for it and are still in are
read again for the key the sides' crypt layers need; no key outlives its job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

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
    KeyFailed,
    RecheckSticks,
    StartLock,
    StartMend,
    StartServices,
    StartUnlock,
    Timer,
)
from keyd.daemon.facts import Intent, Offer, VolumeFacts, one_shot

Result = tuple[VolumeFacts, list[Effect]]
Goal = Literal["unlocked", "locked", "keep"]


def step(facts: VolumeFacts, event: ev.Event, policy: VolumePolicy) -> Result:
    """Apply ``event`` to the facts, then reconcile; the new facts and the effects to carry out."""
    applied, first = apply(facts, event, policy)
    reconciled, then = reconcile(applied, policy)
    if reconciled.shutdown:  # services are stopping: starting them would fight systemd
        return reconciled, [e for e in first + then if not isinstance(e, StartServices)]
    return reconciled, first + then


def apply(facts: VolumeFacts, event: ev.Event, policy: VolumePolicy) -> Result:
    """What ``event`` changes in the facts (no decision about jobs: see :func:`reconcile`)."""
    handler: Callable[[VolumeFacts, Any, VolumePolicy], Result] = _APPLY[type(event)]
    return handler(facts, event, policy)


# -- the goal and the job ---------------------------------------------------------------------

def goal(facts: VolumeFacts, policy: VolumePolicy) -> Goal:
    """Where the volume should be now (see the module docstring for the order)."""
    if facts.intent is not None:
        return "locked" if facts.intent.kind == "lock" else "unlocked"
    if next_offer(facts, policy) is not None:
        return "unlocked"
    if facts.kernel == "partial" and not facts.refused:
        return "locked"
    if _removal_pending(facts, policy) and facts.grace == "expired":
        return "locked"
    return "keep"


def next_offer(facts: VolumeFacts, policy: VolumePolicy) -> Offer | None:
    """The key to try next: requests before sticks, oldest first; none while devices are awaited."""
    if facts.blocked_at is not None and facts.blocked_at == facts.devices:
        return None  # the last try lacked devices, and none appeared since
    usable = [o for o in facts.offers if one_shot(o) or policy.auto_unlock]
    return min(usable, key=lambda o: not one_shot(o), default=None)


def reconcile(facts: VolumeFacts, policy: VolumePolicy) -> Result:
    """Start the job (at most one) that moves the volume towards its goal; arm or cancel the grace."""
    facts, effects = _grace(facts, policy)
    if facts.job is not None:
        return facts, effects
    facts, asked = _passphrase(facts, policy)
    target = goal(facts, policy)
    if target == "unlocked":
        facts, more = _towards_unlocked(facts, policy)
    elif target == "locked":
        facts, more = _towards_locked(facts)
    else:
        more = []
    if target != "locked" and facts.job is None:
        facts, mend = _mend(facts)
        more += mend
    return facts, effects + asked + more


def _removal_pending(facts: VolumeFacts, policy: VolumePolicy) -> bool:
    """A stick unlocked the volume, none of its sticks is in, nothing overrides lock_on_removal."""
    return (policy.lock_on_removal and facts.kernel == "unlocked" and facts.intent is None
            and facts.opened_by is not None and not facts.holders and not facts.refused)


def _grace(facts: VolumeFacts, policy: VolumePolicy) -> Result:
    pending = _removal_pending(facts, policy)
    if pending and facts.grace == "off" and facts.job is None:
        return replace(facts, grace="armed"), [
            ArmTimer(Timer.GRACE, policy.grace),
            Audit(A.GRACE_STARTED, f"stick removed: locking in {policy.grace:g} s",
                  serial=facts.opened_by, result="armed")]
    if not pending and facts.grace != "off" and facts.job != "lock":
        why = ("a request keeps it unlocked" if facts.intent is not None
               else "a valid stick is back")
        return replace(facts, grace="off"), [
            CancelTimer(Timer.GRACE),
            Audit(A.GRACE_STARTED, f"{why}: removal lock cancelled", serial=facts.opened_by,
                  result="cancelled")]
    return facts, []


def _passphrase(facts: VolumeFacts, policy: VolumePolicy) -> Result:
    if not (facts.want_passphrase and policy.passphrase and not facts.asking
            and facts.kernel == "locked" and facts.intent is None and not facts.shutdown):
        return facts, []
    return replace(facts, want_passphrase=False, asking=True), [
        AskPassphrase(policy.passphrase_timeout),
        Audit(A.PASSPHRASE_FALLBACK, "asking for the passphrase", result="asking")]


def _towards_unlocked(facts: VolumeFacts, policy: VolumePolicy) -> Result:
    offer = next_offer(facts, policy)
    if offer is None:
        return facts, []
    rest = tuple(o for o in facts.offers if o != offer)
    if facts.kernel == "unlocked" and not one_shot(offer):
        # Already open (a restart, or the stick is back): the stick now holds it open; on a
        # degraded volume its key opens the missing sides whose disks are here. It does not
        # count as the mend for these disks: if its key is wrong, the other sticks still in
        # are read again (_mend).
        held = replace(facts, offers=rest, opened_by=facts.opened_by or offer.serial)
        if facts.degraded:
            return replace(held, job="mend", trying=offer), [StartMend(offer.ref)]
        return held, [DiscardKey(offer.ref)]
    # A request's key is tried even on an open volume: the engine compares with the
    # kernel, where `keydctl lock --direct` may have closed the stack behind keyd's back.
    # A disk that appears while the unlock runs may be a side it could not see: mend then.
    # On an open volume the request's key is no mend of the disks already here: if it is
    # wrong for the missing side, the sticks still in are read again (_mend).
    mended_at = facts.mended_at if facts.kernel == "unlocked" else facts.devices
    return replace(facts, job="unlock", trying=offer, offers=rest, mended_at=mended_at), [
        StartUnlock(offer.ref),
        Audit(A.UNLOCK_STARTED, f"unlocking with a key from {offer.source}"
              + (f" ({offer.by})" if offer.by else ""), reason=offer.by, serial=offer.serial,
              signer=offer.signer, bundle_id=offer.bundle_id)]


def _mend(facts: VolumeFacts) -> Result:
    """An open, degraded volume tries to bring its sides back whenever a disk appeared.

    Their crypt layers need the key: the sticks that verified for the volume and are still
    in are read again (their keys were wiped after the unlock), and each key that comes
    back is another try.
    """
    if not (facts.degraded and facts.kernel == "unlocked" and facts.mended_at != facts.devices
            and not facts.shutdown):
        return facts, []
    recheck: list[Effect] = [RecheckSticks(tuple(sorted(facts.holders)))] if facts.holders \
        else []
    return replace(facts, job="mend", mended_at=facts.devices), [StartMend(None), *recheck]


def _towards_locked(facts: VolumeFacts) -> Result:
    if (facts.kernel == "locked" and not facts.recheck) or (facts.lock_attempts > 0
                                                            and not facts.retry_due):
        return facts, []
    rollback = facts.intent is None and facts.kernel == "partial"
    by = (facts.intent.by if facts.intent is not None else
          "start-up rollback" if rollback else "stick removed")
    started = replace(facts, job="lock", retry_due=False, rollback=rollback)
    effects: list[Effect] = [StartLock(stop_services=facts.kernel == "unlocked",
                                       quiesce=facts.shutdown)]
    if facts.lock_attempts == 0:
        effects.append(Audit(A.LOCK_STARTED, f"locking ({by})", reason=by))
    return started, effects


# -- what each event changes ------------------------------------------------------------------

def _observed(facts: VolumeFacts, event: ev.Observed, policy: VolumePolicy) -> Result:
    if event.state == "unlocked":
        return replace(facts, kernel="unlocked", booting=False, degraded=event.degraded), [
            StartServices(), Audit(A.RECONCILED, "found unlocked at start-up", result="unlocked")]
    if event.state == "partial":
        return replace(facts, kernel="partial"), [
            Audit(A.RECONCILED, "found half-open at start-up: rolling back", result="partial")]
    return replace(facts, kernel="locked"), [ArmTimer(Timer.KEY, policy.key_timeout)]


def _key_arrived(facts: VolumeFacts, event: ev.KeyArrived, policy: VolumePolicy) -> Result:
    if facts.shutdown:
        return facts, [DiscardKey(event.ref)]
    holders = facts.holders | ({event.serial} if event.source == "stick" and event.serial else set())
    mending = facts.kernel == "unlocked" and facts.degraded
    # k-of-n shares combined are a stick's act too (the last one's), tried once: the
    # sticks usually leave again, and none of them alone holds the volume.
    plugged = event.source in ("stick", "shares")
    if plugged and not mending and (not policy.auto_unlock or event.seq < facts.locked_at):
        # Sticks don't unlock this volume, or this one was in before the admin locked it.
        return replace(facts, holders=holders), [DiscardKey(event.ref)]
    # The newest action wins: a stick inserted after a request replaces it, a D-Bus
    # unlock replaces anything before it.
    newer = facts.intent is None or event.seq > facts.intent.seq
    intent = Intent("unlock", event.by or "D-Bus request", event.seq) if event.source == "dbus" \
        else None if plugged and newer else facts.intent
    shares = None if event.source == "shares" else facts.shares
    return replace(facts, offers=(*facts.offers, event), intent=intent, holders=holders,
                   shares=shares,
                   blocked_at=None, refused=False,
                   asking=facts.asking and event.source != "passphrase"), []


def _stick_removed(facts: VolumeFacts, event: ev.StickRemoved, policy: VolumePolicy) -> Result:
    gone = [o for o in facts.offers if o.source == "stick" and o.serial == event.serial]
    kept = tuple(o for o in facts.offers if o not in gone)
    return replace(facts, offers=kept, holders=facts.holders - {event.serial}, refused=False), [
        DiscardKey(o.ref) for o in gone]


def _member_added(facts: VolumeFacts, event: ev.MemberAdded, policy: VolumePolicy) -> Result:
    return replace(facts, devices=facts.devices + 1), []


def _lock_requested(facts: VolumeFacts, event: ev.LockRequested, policy: VolumePolicy) -> Result:
    return replace(facts, intent=Intent("lock", event.by, event.seq), locked_at=event.seq,
                   offers=(), booting=False, recheck=True,
                   want_passphrase=False, refused=False, lock_attempts=0), [
        CancelTimer(Timer.KEY), *[DiscardKey(o.ref) for o in facts.offers]]


def _shutdown_started(facts: VolumeFacts, event: ev.ShutdownStarted,
                      policy: VolumePolicy) -> Result:
    # Like a lock request, but only what is open is locked (no recheck of a locked one),
    # and for good: the facts keep ``shutdown`` until keyd exits.
    locked, effects = _lock_requested(facts, ev.LockRequested(event.by, event.seq), policy)
    return replace(locked, shutdown=True, recheck=False), effects


def _unlock_succeeded(facts: VolumeFacts, event: ev.UnlockSucceeded,
                      policy: VolumePolicy) -> Result:
    used = _tried(facts)
    sticks = [o for o in facts.offers if not one_shot(o)]  # their job is done
    opened_by = used.serial if used.source == "stick" else facts.opened_by
    facts = replace(facts, kernel="unlocked", job=None, trying=None, booting=False,
                    offers=tuple(o for o in facts.offers if one_shot(o)), opened_by=opened_by,
                    members="ok", failure="", failed=False, blocked_at=None, warning="",
                    refused=False, degraded=event.still_degraded)
    done = Audit(A.UNLOCK_FINISHED, "unlocked" if event.changed else "was already unlocked",
                 result="unlocked" if event.changed else "already-unlocked", serial=used.serial,
                 signer=used.signer, bundle_id=used.bundle_id, seconds=event.seconds)
    degraded = [Audit(A.DEGRADED, f"unlocked degraded: {line}", result="degraded",
                      serial=used.serial, signer=used.signer, bundle_id=used.bundle_id)
                for line in event.degraded]
    return facts, [DiscardKey(used.ref), *[DiscardKey(o.ref) for o in sticks],
                   CancelTimer(Timer.KEY), CancelTimer(Timer.MEMBERS), done, *degraded,
                   *_mended(event.mended), StartServices()]


def _mended(lines: tuple[str, ...]) -> list[Effect]:
    return [Audit(A.MENDED, f"brought back: {line}", result="mended") for line in lines]


def _mend_done(facts: VolumeFacts, event: ev.Mended, policy: VolumePolicy) -> Result:
    return replace(facts, job=None, trying=None, degraded=event.still_degraded), [
        *_forget_trying(facts), *_mended(event.mended)]


def _mend_failed(facts: VolumeFacts, event: ev.MendFailed, policy: VolumePolicy) -> Result:
    # The volume stays open degraded; another stick's key, or the next disk, is another try.
    return replace(facts, job=None, trying=None), [
        *_forget_trying(facts),
        Audit(A.MENDED, f"could not bring a side back: {event.message or event.reason}",
              result="mend-failed", reason=event.reason,
              serial=facts.trying.serial if facts.trying else None)]


def _forget_trying(facts: VolumeFacts) -> list[Effect]:
    return [DiscardKey(facts.trying.ref)] if facts.trying is not None else []


def _unlock_failed(facts: VolumeFacts, event: ev.UnlockFailed, policy: VolumePolicy) -> Result:
    used = _tried(facts)
    failed = Audit(A.UNLOCK_FAILED, event.message or event.reason, result=event.kind,
                   reason=event.reason, serial=used.serial, signer=used.signer,
                   bundle_id=used.bundle_id)
    facts = replace(facts, job=None, trying=None, failure=event.message or event.reason)
    if event.kind == "key":
        return _wrong_key(facts, used, policy, failed)
    # Devices or members missing, or another fault: keep the key, retry once devices appear.
    facts = replace(facts, offers=(used, *facts.offers), blocked_at=facts.devices,
                    failed=event.kind == "error")
    if event.kind != "members" or facts.members != "ok":
        return facts, [failed]
    return replace(facts, members="waiting"), [
        failed, ArmTimer(Timer.MEMBERS, policy.member_wait),
        Audit(A.DEGRADED, f"RAID members missing: waiting up to {policy.member_wait:g} s",
              result="waiting", reason=event.reason)]


def _wrong_key(facts: VolumeFacts, used: Offer, policy: VolumePolicy, failed: Audit) -> Result:
    effects: list[Effect] = [DiscardKey(used.ref), failed]
    if used.source == "stick" and used.serial is not None:
        effects.append(KeyFailed(used.serial))
    # The request this key answered is done; a newer one (its key still on offer) stands.
    intent = None if used.source == "dbus" and facts.intent is not None \
        and facts.intent.kind == "unlock" and facts.intent.seq == used.seq else facts.intent
    return replace(facts, intent=intent, failure="wrong key",
                   want_passphrase=used.source == "passphrase" and policy.passphrase), effects


def _tried(facts: VolumeFacts) -> Offer:
    # A job result always follows a started unlock; an orphan result is a bug upstream.
    assert facts.trying is not None, "an unlock result without an unlock"
    return facts.trying


def _lock_succeeded(facts: VolumeFacts, event: ev.LockSucceeded, policy: VolumePolicy) -> Result:
    what, result = (("rolled back", "rolled-back") if facts.rollback else
                    ("locked", "locked") if event.changed else
                    ("was already locked", "already-locked"))
    done = Audit(A.LOCK_FINISHED, what, result=result,
                 reason=facts.intent.by if facts.intent else None, seconds=event.seconds)
    effects: list[Effect] = [done, CancelTimer(Timer.GRACE), CancelTimer(Timer.LOCK_RETRY)]
    if facts.rollback:
        effects.append(ArmTimer(Timer.KEY, policy.key_timeout))
    return replace(facts, kernel="locked", job=None, opened_by=None, grace="off", failure="",
                   failed=False, lock_attempts=0, retry_due=False, rollback=False,
                   recheck=False, warning="", degraded=False, mended_at=None), effects


def _lock_busy(facts: VolumeFacts, event: ev.LockBusy, policy: VolumePolicy) -> Result:
    if facts.shutdown:  # no time to wait: left to systemd-shutdown, flushed
        quiesced = f"; {event.quiesced}" if event.quiesced else ""
        message = f"busy at shutdown, left open: {event.holders}{quiesced}"
        return _gave_up(facts, warning=message), [
            Audit(A.LOCK_BUSY, message, result="left-open", reason="BUSY")]
    attempts = facts.lock_attempts + 1
    if attempts <= policy.lock_retries and not facts.rollback:
        return replace(facts, job=None, lock_attempts=attempts), [
            ArmTimer(Timer.LOCK_RETRY, policy.lock_retry_delay),
            Audit(A.LOCK_BUSY, f"busy, retrying in {policy.lock_retry_delay:g} s: "
                  f"{event.holders}", result="retrying", reason="BUSY")]
    if facts.rollback:
        message = f"half-open stack is in use: {event.holders}"
        return _gave_up(facts, failure=message), [
            Audit(A.LOCK_BUSY, message, result="failed", reason="BUSY")]
    warning = f"lock refused, volume busy: {event.holders}"
    return _gave_up(facts, warning=warning), [
        StartServices(), Audit(A.LOCK_BUSY, f"{warning}; stays unlocked",
                               result="stays-unlocked", reason="BUSY")]


def _lock_failed(facts: VolumeFacts, event: ev.LockFailed, policy: VolumePolicy) -> Result:
    message = event.message or event.reason
    still_open = event.kernel == "unlocked"
    facts = replace(_gave_up(facts, failure=message, warning=message if still_open else ""),
                    kernel=event.kernel)
    # Nothing was closed: the services stopped for the lock come back.
    return facts, [*([StartServices()] if still_open else []),
                   Audit(A.LOCK_FAILED, message, result="failed", reason=event.reason)]


def _gave_up(facts: VolumeFacts, *, failure: str = "", warning: str = "") -> VolumeFacts:
    """A lock that will not be retried by itself: the request that wanted it is answered."""
    lock = facts.intent is not None and facts.intent.kind == "lock"
    return replace(facts, job=None, lock_attempts=0, retry_due=False, rollback=False,
                   recheck=False, refused=True, intent=None if lock else facts.intent,
                   failure=failure,
                   failed=bool(failure), warning=warning, grace="off")


def _grace_expired(facts: VolumeFacts, event: ev.GraceExpired, policy: VolumePolicy) -> Result:
    return (replace(facts, grace="expired") if facts.grace == "armed" else facts), []


def _key_timeout(facts: VolumeFacts, event: ev.KeyTimeout, policy: VolumePolicy) -> Result:
    if not facts.booting or facts.key_timed_out or facts.kernel != "locked":
        return facts, []
    skip = "start degraded" if policy.dependents == "degraded" else "are skipped"
    return replace(facts, key_timed_out=True, want_passphrase=policy.passphrase), [
        Audit(A.KEY_TIMEOUT, f"no key within {policy.key_timeout:g} s; dependents {skip}",
              result=policy.dependents)]


def _members_timeout(facts: VolumeFacts, event: ev.MembersTimeout,
                     policy: VolumePolicy) -> Result:
    if facts.members != "waiting":
        return facts, []
    requests = [o for o in facts.offers if one_shot(o)]  # a stick's key waits on for its disks
    answered = facts.intent is not None and facts.intent.kind == "unlock" and bool(requests)
    return replace(facts, members="gave-up", failure="RAID members still missing", failed=True,
                   offers=tuple(o for o in facts.offers if not one_shot(o)),
                   intent=None if answered else facts.intent), [
        *[DiscardKey(o.ref) for o in requests],
        Audit(A.DEGRADED, f"RAID members missing after {policy.member_wait:g} s: gave up",
              result="refused", reason="MEMBERS_MISSING")]


def _lock_retry(facts: VolumeFacts, event: ev.LockRetry, policy: VolumePolicy) -> Result:
    return (replace(facts, retry_due=True) if facts.lock_attempts > 0 else facts), []


def _passphrase_unavailable(facts: VolumeFacts, event: ev.PassphraseUnavailable,
                            policy: VolumePolicy) -> Result:
    return replace(facts, asking=False), [
        Audit(A.PASSPHRASE_FALLBACK, f"passphrase prompt unanswered: {event.reason}",
              result="unanswered", reason=event.reason)]


def _bundle_rejected(facts: VolumeFacts, event: ev.BundleRejected, policy: VolumePolicy) -> Result:
    return facts, [Audit(A.BUNDLE_REJECTED, f"bundle rejected: {event.reason}", result="rejected",
                         reason=event.reason, serial=event.serial, bundle_id=event.bundle_id)]


def _shares_held(facts: VolumeFacts, event: ev.SharesHeld, policy: VolumePolicy) -> Result:
    return replace(facts, shares=(event.have, event.need) if event.have else None), []


def _nothing(facts: VolumeFacts, event: Any, policy: VolumePolicy) -> Result:
    return facts, []


_APPLY: dict[type, Callable[[VolumeFacts, Any, VolumePolicy], Result]] = {
    ev.Observed: _observed, ev.KeyArrived: _key_arrived, ev.BundleRejected: _bundle_rejected,
    ev.UnlockSucceeded: _unlock_succeeded, ev.UnlockFailed: _unlock_failed,
    ev.Mended: _mend_done, ev.MendFailed: _mend_failed,
    ev.StickRemoved: _stick_removed, ev.MemberAdded: _member_added, ev.MemberRemoved: _nothing,
    ev.LockRequested: _lock_requested, ev.LockSucceeded: _lock_succeeded,
    ev.LockBusy: _lock_busy, ev.LockFailed: _lock_failed, ev.GraceExpired: _grace_expired,
    ev.KeyTimeout: _key_timeout, ev.MembersTimeout: _members_timeout, ev.LockRetry: _lock_retry,
    ev.PassphraseUnavailable: _passphrase_unavailable, ev.SharesHeld: _shares_held,
    ev.ShutdownStarted: _shutdown_started}
