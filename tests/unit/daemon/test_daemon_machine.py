"""The per-volume state machine as a full table (every state x every event), plus invariants.

Cells give the next state ("=" unchanged) and the effects in order:
SU StartUnlock, SL StartLock, D DiscardKey, T ArmTimer, C CancelTimer,
SS StartServices, XS StopServices, P AskPassphrase, KF KeyFailed, A Audit, E EmitSignal.
The policy used: lock_on_removal, passphrase fallback, one busy retry.
"""

from __future__ import annotations

import pytest

from keyd.audit.ids import AuditEvent
from keyd.config.model import VolumePolicy
from keyd.daemon import effects as ef
from keyd.daemon import events as ev
from keyd.daemon.machine import (
    ALL_STATE_TYPES,
    Failed,
    Locked,
    Locking,
    Pending,
    State,
    Unlocked,
    Unlocking,
    WaitingForKey,
    WaitingForMembers,
    held_ref,
    transition,
)

POLICY = VolumePolicy(lock_on_removal=True, passphrase=True, lock_retries=1, grace=30,
                      key_timeout=90, member_wait=120)
KEY = ev.KeyArrived("k1", "stick", "S1", "FPR", "b1")
STATES: dict[str, State] = {
    "L": Locked(), "W": WaitingForKey(), "WT": WaitingForKey(timed_out=True, asking=True),
    "U": Unlocking(Pending(KEY, "waiting")),
    "M": WaitingForMembers(Pending(KEY, "locked", members_timer=True)),
    "O": Unlocked(serial="S1"), "OG": Unlocked(serial="S1", grace=True),
    "K": Locking(), "KR": Locking(attempt=1), "F": Failed("X"),
}
EVENTS: dict[str, ev.Event] = {
    "obs-u": ev.Observed("unlocked"), "obs-l": ev.Observed("locked"),
    "obs-p": ev.Observed("partial"), "key": ev.KeyArrived("k2", "stick", "S1"),
    "rej": ev.BundleRejected("S1", "BAD_SIGNATURE"), "ok": ev.UnlockSucceeded(),
    "f-key": ev.UnlockFailed("key", "WRONG_KEY"), "f-mem": ev.UnlockFailed("members", "DEGRADED"),
    "f-err": ev.UnlockFailed("error", "STORAGE"), "rm": ev.StickRemoved("S1"),
    "rm-other": ev.StickRemoved("S2"), "m-add": ev.MemberAdded(), "m-rm": ev.MemberRemoved(),
    "lock": ev.LockRequested(), "l-ok": ev.LockSucceeded(), "l-busy": ev.LockBusy("1 (bash)"),
    "l-fail": ev.LockFailed("STORAGE"), "grace": ev.GraceExpired(), "k-time": ev.KeyTimeout(),
    "m-time": ev.MembersTimeout(), "retry": ev.LockRetry(), "pw-none": ev.PassphraseUnavailable(),
}
CODES = {ef.StartUnlock: "SU", ef.StartLock: "SL", ef.DiscardKey: "D", ef.ArmTimer: "T",
         ef.CancelTimer: "C", ef.StartServices: "SS", ef.StopServices: "XS",
         ef.AskPassphrase: "P", ef.KeyFailed: "KF", ef.Audit: "A", ef.EmitSignal: "E"}
STATE_CODES = {Locked: "L", WaitingForKey: "W", Unlocking: "U", WaitingForMembers: "M",
               Unlocked: "O", Locking: "K", Failed: "F"}

TABLE = [
    # state L
    ("L", "obs-u", "O", "SS A E"),
    ("L", "obs-l", "W", "T E"),
    ("L", "obs-p", "K", "A XS SL A E"),
    ("L", "key", "U", "SU A E"),
    ("L", "rej", "=", "A"),
    ("L", "ok", "=", ""),
    ("L", "f-key", "=", ""),
    ("L", "f-mem", "=", ""),
    ("L", "f-err", "=", ""),
    ("L", "rm", "=", ""),
    ("L", "rm-other", "=", ""),
    ("L", "m-add", "=", ""),
    ("L", "m-rm", "=", ""),
    ("L", "lock", "K", "XS SL A E"),
    ("L", "l-ok", "=", ""),
    ("L", "l-busy", "=", ""),
    ("L", "l-fail", "=", ""),
    ("L", "grace", "=", ""),
    ("L", "k-time", "=", ""),
    ("L", "m-time", "=", ""),
    ("L", "retry", "=", ""),
    ("L", "pw-none", "=", ""),
    # state W
    ("W", "obs-u", "=", ""),
    ("W", "obs-l", "=", ""),
    ("W", "obs-p", "=", ""),
    ("W", "key", "U", "SU A E"),
    ("W", "rej", "=", "A"),
    ("W", "ok", "=", ""),
    ("W", "f-key", "=", ""),
    ("W", "f-mem", "=", ""),
    ("W", "f-err", "=", ""),
    ("W", "rm", "=", ""),
    ("W", "rm-other", "=", ""),
    ("W", "m-add", "=", ""),
    ("W", "m-rm", "=", ""),
    ("W", "lock", "K", "C XS SL A E"),
    ("W", "l-ok", "=", ""),
    ("W", "l-busy", "=", ""),
    ("W", "l-fail", "=", ""),
    ("W", "grace", "=", ""),
    ("W", "k-time", "W", "A E P A"),
    ("W", "m-time", "=", ""),
    ("W", "retry", "=", ""),
    ("W", "pw-none", "=", ""),
    # state WT
    ("WT", "obs-u", "=", ""),
    ("WT", "obs-l", "=", ""),
    ("WT", "obs-p", "=", ""),
    ("WT", "key", "U", "SU A E"),
    ("WT", "rej", "=", "A"),
    ("WT", "ok", "=", ""),
    ("WT", "f-key", "=", ""),
    ("WT", "f-mem", "=", ""),
    ("WT", "f-err", "=", ""),
    ("WT", "rm", "=", ""),
    ("WT", "rm-other", "=", ""),
    ("WT", "m-add", "=", ""),
    ("WT", "m-rm", "=", ""),
    ("WT", "lock", "K", "C XS SL A E"),
    ("WT", "l-ok", "=", ""),
    ("WT", "l-busy", "=", ""),
    ("WT", "l-fail", "=", ""),
    ("WT", "grace", "=", ""),
    ("WT", "k-time", "=", ""),
    ("WT", "m-time", "=", ""),
    ("WT", "retry", "=", ""),
    ("WT", "pw-none", "W", "A"),
    # state U
    ("U", "obs-u", "=", ""),
    ("U", "obs-l", "=", ""),
    ("U", "obs-p", "=", ""),
    ("U", "key", "=", "D"),
    ("U", "rej", "=", "A"),
    ("U", "ok", "O", "D C A SS E"),
    ("U", "f-key", "W", "D A KF E"),
    ("U", "f-mem", "M", "T A E"),
    ("U", "f-err", "F", "D C A E"),
    ("U", "rm", "U", ""),
    ("U", "rm-other", "=", ""),
    ("U", "m-add", "=", ""),
    ("U", "m-rm", "=", ""),
    ("U", "lock", "U", ""),
    ("U", "l-ok", "=", ""),
    ("U", "l-busy", "=", ""),
    ("U", "l-fail", "=", ""),
    ("U", "grace", "=", ""),
    ("U", "k-time", "U", ""),
    ("U", "m-time", "=", ""),
    ("U", "retry", "=", ""),
    ("U", "pw-none", "=", ""),
    # state M
    ("M", "obs-u", "=", ""),
    ("M", "obs-l", "=", ""),
    ("M", "obs-p", "=", ""),
    ("M", "key", "=", "D"),
    ("M", "rej", "=", "A"),
    ("M", "ok", "=", ""),
    ("M", "f-key", "=", ""),
    ("M", "f-mem", "=", ""),
    ("M", "f-err", "=", ""),
    ("M", "rm", "M", ""),
    ("M", "rm-other", "=", ""),
    ("M", "m-add", "U", "SU"),
    ("M", "m-rm", "=", ""),
    ("M", "lock", "L", "D C C E"),
    ("M", "l-ok", "=", ""),
    ("M", "l-busy", "=", ""),
    ("M", "l-fail", "=", ""),
    ("M", "grace", "=", ""),
    ("M", "k-time", "=", ""),
    ("M", "m-time", "F", "D C A E"),
    ("M", "retry", "=", ""),
    ("M", "pw-none", "=", ""),
    # state O
    ("O", "obs-u", "=", ""),
    ("O", "obs-l", "=", ""),
    ("O", "obs-p", "=", ""),
    ("O", "key", "=", "D"),
    ("O", "rej", "=", "A"),
    ("O", "ok", "=", ""),
    ("O", "f-key", "=", ""),
    ("O", "f-mem", "=", ""),
    ("O", "f-err", "=", ""),
    ("O", "rm", "O", "T A E"),
    ("O", "rm-other", "=", ""),
    ("O", "m-add", "=", ""),
    ("O", "m-rm", "=", ""),
    ("O", "lock", "K", "XS SL A E"),
    ("O", "l-ok", "=", ""),
    ("O", "l-busy", "=", ""),
    ("O", "l-fail", "=", ""),
    ("O", "grace", "=", ""),
    ("O", "k-time", "=", ""),
    ("O", "m-time", "=", ""),
    ("O", "retry", "=", ""),
    ("O", "pw-none", "=", ""),
    # state OG
    ("OG", "obs-u", "=", ""),
    ("OG", "obs-l", "=", ""),
    ("OG", "obs-p", "=", ""),
    ("OG", "key", "O", "D C A E"),
    ("OG", "rej", "=", "A"),
    ("OG", "ok", "=", ""),
    ("OG", "f-key", "=", ""),
    ("OG", "f-mem", "=", ""),
    ("OG", "f-err", "=", ""),
    ("OG", "rm", "=", ""),
    ("OG", "rm-other", "=", ""),
    ("OG", "m-add", "=", ""),
    ("OG", "m-rm", "=", ""),
    ("OG", "lock", "K", "C XS SL A E"),
    ("OG", "l-ok", "=", ""),
    ("OG", "l-busy", "=", ""),
    ("OG", "l-fail", "=", ""),
    ("OG", "grace", "K", "XS SL A E"),
    ("OG", "k-time", "=", ""),
    ("OG", "m-time", "=", ""),
    ("OG", "retry", "=", ""),
    ("OG", "pw-none", "=", ""),
    # state K
    ("K", "obs-u", "=", ""),
    ("K", "obs-l", "=", ""),
    ("K", "obs-p", "=", ""),
    ("K", "key", "=", "D"),
    ("K", "rej", "=", "A"),
    ("K", "ok", "=", ""),
    ("K", "f-key", "=", ""),
    ("K", "f-mem", "=", ""),
    ("K", "f-err", "=", ""),
    ("K", "rm", "=", ""),
    ("K", "rm-other", "=", ""),
    ("K", "m-add", "=", ""),
    ("K", "m-rm", "=", ""),
    ("K", "lock", "=", ""),
    ("K", "l-ok", "L", "A E"),
    ("K", "l-busy", "K", "T A"),
    ("K", "l-fail", "F", "A E"),
    ("K", "grace", "=", ""),
    ("K", "k-time", "=", ""),
    ("K", "m-time", "=", ""),
    ("K", "retry", "=", ""),
    ("K", "pw-none", "=", ""),
    # state KR
    ("KR", "obs-u", "=", ""),
    ("KR", "obs-l", "=", ""),
    ("KR", "obs-p", "=", ""),
    ("KR", "key", "=", "D"),
    ("KR", "rej", "=", "A"),
    ("KR", "ok", "=", ""),
    ("KR", "f-key", "=", ""),
    ("KR", "f-mem", "=", ""),
    ("KR", "f-err", "=", ""),
    ("KR", "rm", "=", ""),
    ("KR", "rm-other", "=", ""),
    ("KR", "m-add", "=", ""),
    ("KR", "m-rm", "=", ""),
    ("KR", "lock", "=", ""),
    ("KR", "l-ok", "L", "A E"),
    ("KR", "l-busy", "O", "SS A E"),
    ("KR", "l-fail", "F", "A E"),
    ("KR", "grace", "=", ""),
    ("KR", "k-time", "=", ""),
    ("KR", "m-time", "=", ""),
    ("KR", "retry", "=", "SL"),
    ("KR", "pw-none", "=", ""),
    # state F
    ("F", "obs-u", "=", ""),
    ("F", "obs-l", "=", ""),
    ("F", "obs-p", "=", ""),
    ("F", "key", "U", "SU A E"),
    ("F", "rej", "=", "A"),
    ("F", "ok", "=", ""),
    ("F", "f-key", "=", ""),
    ("F", "f-mem", "=", ""),
    ("F", "f-err", "=", ""),
    ("F", "rm", "=", ""),
    ("F", "rm-other", "=", ""),
    ("F", "m-add", "=", ""),
    ("F", "m-rm", "=", ""),
    ("F", "lock", "K", "XS SL A E"),
    ("F", "l-ok", "=", ""),
    ("F", "l-busy", "=", ""),
    ("F", "l-fail", "=", ""),
    ("F", "grace", "=", ""),
    ("F", "k-time", "=", ""),
    ("F", "m-time", "=", ""),
    ("F", "retry", "=", ""),
    ("F", "pw-none", "=", ""),
]


def test_the_table_covers_every_state_and_every_event_exactly_once() -> None:
    cells = [(s, e) for s, e, _, _ in TABLE]
    assert len(cells) == len(set(cells))
    assert set(cells) == {(s, e) for s in STATES for e in EVENTS}
    assert {type(s) for s in STATES.values()} == set(ALL_STATE_TYPES)
    assert {type(e) for e in EVENTS.values()} == set(ev.ALL_EVENT_TYPES)


@pytest.mark.parametrize(("state", "event", "expected_state", "expected_effects"), TABLE)
def test_transition_table(state: str, event: str, expected_state: str,
                          expected_effects: str) -> None:
    before = STATES[state]
    after, effects = transition(before, EVENTS[event], POLICY)
    assert ("=" if after == before else STATE_CODES[type(after)]) == expected_state
    assert " ".join(CODES[type(effect)] for effect in effects) == expected_effects


def test_every_signal_names_the_state_it_announces() -> None:
    for state in STATES.values():
        for event in EVENTS.values():
            after, effects = transition(state, event, POLICY)
            for effect in effects:
                if isinstance(effect, ef.EmitSignal):
                    assert effect.state == after.name


def test_a_stick_with_a_valid_key_unlocks_a_waiting_volume_and_starts_its_services() -> None:
    state, effects = transition(WaitingForKey(), KEY, POLICY)
    assert effects[0] == ef.StartUnlock("k1")
    state, effects = transition(state, ev.UnlockSucceeded(1.5), POLICY)
    assert state == Unlocked(serial="S1")
    assert ef.StartServices() in effects and ef.DiscardKey("k1") in effects
    audit = next(e for e in effects if isinstance(e, ef.Audit))
    assert (audit.event, audit.serial, audit.signer, audit.bundle_id, audit.seconds) == \
        (AuditEvent.UNLOCK_FINISHED, "S1", "FPR", "b1", 1.5)


def test_an_unlock_accepted_degraded_is_audited_as_degraded() -> None:
    state, _ = transition(WaitingForKey(), KEY, POLICY)
    line = "pool tank imported DEGRADED: /dev/mapper/keyd-tank-b missing"
    state, effects = transition(state, ev.UnlockSucceeded(1.0, degraded=(line,)), POLICY)
    assert state == Unlocked(serial="S1")
    audits = [(e.event, e.result, e.message) for e in effects if isinstance(e, ef.Audit)]
    assert audits == [(AuditEvent.UNLOCK_FINISHED, "unlocked", "unlocked"),
                      (AuditEvent.DEGRADED, "degraded", f"unlocked degraded: {line}")]


def test_pulling_the_unlocking_stick_arms_the_grace_timer_only_with_lock_on_removal() -> None:
    state, effects = transition(Unlocked(serial="S1"), ev.StickRemoved("S1"), POLICY)
    assert state == Unlocked(serial="S1", grace=True)
    assert ef.ArmTimer(ef.Timer.GRACE, 30) in effects
    off = VolumePolicy(lock_on_removal=False)
    assert transition(Unlocked(serial="S1"), ev.StickRemoved("S1"), off) == \
        (Unlocked(serial="S1"), [])


def test_a_stick_pulled_during_the_unlock_locks_after_the_grace_period() -> None:
    state, _ = transition(Locked(), KEY, POLICY)
    state, _ = transition(state, ev.StickRemoved("S1"), POLICY)
    state, effects = transition(state, ev.UnlockSucceeded(), POLICY)
    assert state == Unlocked(serial="S1", grace=True)
    assert ef.ArmTimer(ef.Timer.GRACE, 30) in effects
    state, effects = transition(state, ev.GraceExpired(), POLICY)
    assert isinstance(state, Locking) and effects[:2] == [ef.StopServices(), ef.StartLock()]


def test_a_busy_lock_retries_then_stays_unlocked_with_a_warning() -> None:
    state, _ = transition(Unlocked(serial="S1"), ev.LockRequested(), POLICY)
    state, effects = transition(state, ev.LockBusy("42 (bash)"), POLICY)
    assert state == Locking(attempt=1) and ef.ArmTimer(ef.Timer.LOCK_RETRY, 5.0) in effects
    state, effects = transition(state, ev.LockRetry(), POLICY)
    assert effects == [ef.StartLock()]
    state, effects = transition(state, ev.LockBusy("42 (bash)"), POLICY)
    assert isinstance(state, Unlocked) and "42 (bash)" in state.warning
    assert ef.StartServices() in effects
    signal = next(e for e in effects if isinstance(e, ef.EmitSignal))
    assert "busy" in signal.detail


def test_a_wrong_key_from_a_stick_counts_for_that_sticks_backoff() -> None:
    state, effects = transition(Unlocking(Pending(KEY, "locked")),
                                ev.UnlockFailed("key", "WRONG_KEY"), POLICY)
    assert state == Locked("wrong key") and ef.KeyFailed("S1") in effects


def test_a_wrong_passphrase_after_the_key_timeout_asks_again() -> None:
    passphrase = ev.KeyArrived("p1", "passphrase")
    state, effects = transition(Unlocking(Pending(passphrase, "timed-out")),
                                ev.UnlockFailed("key", "WRONG_KEY"), POLICY)
    assert state == WaitingForKey(timed_out=True, asking=True)
    assert ef.AskPassphrase(POLICY.passphrase_timeout) in effects
    assert not any(isinstance(e, ef.KeyFailed) for e in effects)


def test_key_timeout_without_fallback_only_releases_dependents() -> None:
    policy = VolumePolicy(passphrase=False, dependents="degraded")
    state, effects = transition(WaitingForKey(), ev.KeyTimeout(), policy)
    assert state == WaitingForKey(timed_out=True)
    assert [type(e) for e in effects] == [ef.Audit, ef.EmitSignal]
    assert "degraded" in effects[1].detail  # type: ignore[union-attr]


def test_missing_members_keep_the_key_and_retry_when_a_member_appears() -> None:
    state, effects = transition(Unlocking(Pending(KEY)), ev.UnlockFailed("members", "DEG"), POLICY)
    assert isinstance(state, WaitingForMembers) and ef.ArmTimer(ef.Timer.MEMBERS, 120) in effects
    state, effects = transition(state, ev.MemberAdded(), POLICY)
    assert effects == [ef.StartUnlock("k1")]
    state, effects = transition(state, ev.UnlockFailed("members", "DEG"), POLICY)
    assert isinstance(state, WaitingForMembers)
    assert not any(isinstance(e, ef.ArmTimer) for e in effects)  # the first deadline holds


def test_sticks_are_ignored_for_volumes_without_auto_unlock_but_dbus_keys_are_not() -> None:
    policy = VolumePolicy(auto_unlock=False)
    assert transition(Locked(), KEY, policy) == (Locked(), [ef.DiscardKey("k1")])
    state, _ = transition(Locked(), ev.KeyArrived("d1", "dbus"), policy)
    assert isinstance(state, Unlocking)


def test_a_dbus_key_for_an_unlocked_volume_rechecks_with_the_engine_and_keeps_the_stick() -> None:
    # keydctl --direct may have locked it behind keyd's back: the engine looks at the kernel.
    request = ev.KeyArrived("d1", "dbus", by="D-Bus request by uid 0")
    state, effects = transition(Unlocked(serial="S1"), request, POLICY)
    assert state == Unlocking(Pending(request, "locked", serial="S1"))
    assert ef.StartUnlock("d1") in effects
    started = next(e for e in effects if isinstance(e, ef.Audit))
    assert (started.reason, started.message) == (
        "D-Bus request by uid 0", "unlocking with a key from dbus (D-Bus request by uid 0)")
    state, effects = transition(state, ev.UnlockSucceeded(changed=False), POLICY)
    assert state == Unlocked(serial="S1")  # removal of S1 still locks it
    state, _ = transition(Unlocked(serial="S1"), request, POLICY)
    state, effects = transition(state, ev.UnlockFailed("key", "WRONG_KEY"), POLICY)
    assert isinstance(state, Locked)  # it really was closed, and the key was wrong
    grace = Unlocked(serial="S1", grace=True)
    assert transition(grace, request, POLICY) == (grace, [ef.DiscardKey("d1")])


def test_a_half_open_stack_found_at_start_up_is_rolled_back_then_waits_for_a_key() -> None:
    state, effects = transition(Locked(), ev.Observed("partial"), POLICY)
    assert isinstance(state, Locking) and state.rollback and ef.StartLock() in effects
    state, effects = transition(state, ev.LockSucceeded(), POLICY)
    assert state == WaitingForKey() and ef.ArmTimer(ef.Timer.KEY, 90) in effects


def test_the_member_wait_ending_during_a_retry_gives_up_when_that_retry_fails() -> None:
    # Found by hypothesis: the MEMBERS timer fired while a retry ran; the next failure
    # must not wait again without a timer (the key would be held forever).
    state, _ = transition(Unlocking(Pending(KEY)), ev.UnlockFailed("members", "DEG"), POLICY)
    state, _ = transition(state, ev.MemberAdded(), POLICY)
    state, effects = transition(state, ev.MembersTimeout(), POLICY)
    assert isinstance(state, Unlocking) and effects == []
    state, effects = transition(state, ev.UnlockFailed("members", "DEG"), POLICY)
    assert state == Failed("MEMBERS_MISSING", "RAID members still missing")
    assert ef.DiscardKey("k1") in effects


def test_the_member_wait_ending_during_a_successful_retry_is_harmless() -> None:
    state, _ = transition(Unlocking(Pending(KEY)), ev.UnlockFailed("members", "DEG"), POLICY)
    state, _ = transition(state, ev.MemberAdded(), POLICY)
    state, _ = transition(state, ev.MembersTimeout(), POLICY)
    state, effects = transition(state, ev.UnlockSucceeded(), POLICY)
    assert isinstance(state, Unlocked) and ef.CancelTimer(ef.Timer.MEMBERS) not in effects


def test_a_key_arriving_during_the_start_up_rollback_is_used_once_the_rollback_is_done() -> None:
    # Lab finding: keyd SIGKILLed mid-unlock leaves a half-open stack; on restart the stick
    # still plugged in is coldplugged while the rollback runs. Its key must not be lost.
    state, _ = transition(Locked(), ev.Observed("partial"), POLICY)
    state, effects = transition(state, KEY, POLICY)
    assert isinstance(state, Locking) and state.held == KEY and effects == []
    state, effects = transition(state, ev.LockSucceeded(), POLICY)
    assert state == Unlocking(Pending(KEY, "waiting")) and ef.StartUnlock("k1") in effects
    assert next(e.event for e in effects if isinstance(e, ef.Audit)) == AuditEvent.LOCK_FINISHED


def test_a_newer_key_during_the_rollback_replaces_the_held_one() -> None:
    state, _ = transition(Locked(), ev.Observed("partial"), POLICY)
    state, _ = transition(state, KEY, POLICY)
    newer = ev.KeyArrived("k9", "dbus")
    state, effects = transition(state, newer, POLICY)
    assert isinstance(state, Locking) and state.held == newer and effects == [ef.DiscardKey("k1")]


@pytest.mark.parametrize("event", [ev.LockRequested(), ev.StickRemoved("S1"), ev.LockFailed("E"),
                                   ev.LockBusy("1 (sh)")])
def test_a_key_held_during_the_rollback_is_dropped_by_a_lock_request_removal_or_failure(
        event: ev.Event) -> None:
    state, _ = transition(Locked(), ev.Observed("partial"), POLICY)
    state, _ = transition(state, KEY, POLICY)
    state, effects = transition(state, event, POLICY)
    assert ef.DiscardKey("k1") in effects and held_ref(state) is None


def test_a_key_during_an_ordinary_lock_is_discarded_not_held() -> None:
    state, effects = transition(Locking(), KEY, POLICY)
    assert state == Locking() and effects == [ef.DiscardKey("k1")]
