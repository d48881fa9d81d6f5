"""Random event sequences (hypothesis) never drive a volume into an inconsistent state.

A small simulator plays the world: engine results arrive only for an operation
in flight, timers fire only while armed, keys get fresh handles. After every
step the invariants below must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.config.model import VolumePolicy
from keyd.daemon import effects as ef
from keyd.daemon import events as ev
from keyd.daemon.machine import (
    Locked,
    Locking,
    State,
    Unlocked,
    Unlocking,
    WaitingForKey,
    WaitingForMembers,
    held_ref,
    transition,
)

TIMER_EVENTS: dict[ef.Timer, ev.Event] = {ef.Timer.GRACE: ev.GraceExpired(), ef.Timer.KEY: ev.KeyTimeout(),
                ef.Timer.MEMBERS: ev.MembersTimeout(), ef.Timer.LOCK_RETRY: ev.LockRetry()}
WORLD = ["stick-key", "passphrase-key", "dbus-key", "rejected", "stick-removed", "other-removed",
         "member-added", "member-removed", "lock-requested", "observed-locked",
         "observed-unlocked", "observed-partial", "passphrase-none",
         "result-ok", "result-key", "result-members", "result-error", "result-busy",
         "result-lock-failed", "timer"]


@dataclass
class World:
    """What the effects did to the outside, as far as the invariants care."""

    state: State = field(default_factory=Locked)
    inflight: str | None = None
    introduced: set[str] = field(default_factory=set)
    discarded: set[str] = field(default_factory=set)
    timers: set[ef.Timer] = field(default_factory=set)
    count: int = 0

    def event(self, choice: str, pick: int) -> ev.Event | None:
        simple: dict[str, ev.Event] = {
            "rejected": ev.BundleRejected("S1", "BAD_SIGNATURE"),
            "stick-removed": ev.StickRemoved("S1"), "other-removed": ev.StickRemoved("S2"),
            "member-added": ev.MemberAdded(), "member-removed": ev.MemberRemoved(),
            "lock-requested": ev.LockRequested(), "observed-locked": ev.Observed("locked"),
            "observed-unlocked": ev.Observed("unlocked"),
            "observed-partial": ev.Observed("partial"),
            "passphrase-none": ev.PassphraseUnavailable()}
        if choice in simple:
            return simple[choice]
        if choice.endswith("-key"):
            self.count += 1
            ref = f"k{self.count}"
            self.introduced.add(ref)
            source = choice.removesuffix("-key")
            return ev.KeyArrived(ref, source, "S1" if source == "stick" else None)  # type: ignore[arg-type]
        if choice == "timer":
            armed = sorted(self.timers)
            return TIMER_EVENTS[armed[pick % len(armed)]] if armed else None
        return self.result(choice)

    def result(self, choice: str) -> ev.Event | None:
        unlock: dict[str, ev.Event] = {
            "result-ok": ev.UnlockSucceeded(), "result-key": ev.UnlockFailed("key", "K"),
            "result-members": ev.UnlockFailed("members", "M"),
                  "result-error": ev.UnlockFailed("error", "E")}
        lock: dict[str, ev.Event] = {
            "result-ok": ev.LockSucceeded(), "result-busy": ev.LockBusy("1 (sh)"),
            "result-lock-failed": ev.LockFailed("E")}
        table = {"unlock": unlock, "lock": lock}.get(self.inflight or "", {})
        if choice not in table:
            return None
        self.inflight = None
        return table[choice]

    def apply(self, event: ev.Event, policy: VolumePolicy) -> None:
        if isinstance(event, ev.GraceExpired | ev.KeyTimeout | ev.MembersTimeout | ev.LockRetry):
            self.timers.discard(next(t for t, e in TIMER_EVENTS.items() if e == event))
        after, effects = transition(self.state, event, policy)
        for effect in effects:
            self.effect(effect, after)
        self.state = after
        self.check()

    def effect(self, effect: ef.Effect, after: State) -> None:
        if isinstance(effect, ef.StartUnlock | ef.StartLock):
            assert self.inflight is None, "two engine operations at once"
            self.inflight = "unlock" if isinstance(effect, ef.StartUnlock) else "lock"
        if isinstance(effect, ef.StartUnlock):
            assert effect.ref == held_ref(after) and effect.ref not in self.discarded
        if isinstance(effect, ef.DiscardKey):
            assert effect.ref in self.introduced and effect.ref not in self.discarded
            self.discarded.add(effect.ref)
        if isinstance(effect, ef.ArmTimer):
            self.timers.add(effect.timer)
        if isinstance(effect, ef.CancelTimer):
            self.timers.discard(effect.timer)
        if isinstance(effect, ef.StartServices):
            assert isinstance(after, Unlocked)
        if isinstance(effect, ef.StopServices):
            assert isinstance(after, Locking)
        if isinstance(effect, ef.EmitSignal):
            assert effect.state == after.name

    def check(self) -> None:
        state = self.state
        held = {held_ref(state)} - {None}
        assert self.introduced - self.discarded == held, "a key handle leaked or vanished"
        assert (self.inflight == "unlock") == isinstance(state, Unlocking)
        if self.inflight == "lock":
            assert isinstance(state, Locking)
        if isinstance(state, Locking):
            assert self.inflight == "lock" or ef.Timer.LOCK_RETRY in self.timers
        if isinstance(state, Unlocked) and state.grace:
            assert ef.Timer.GRACE in self.timers
        if isinstance(state, WaitingForMembers):
            assert ef.Timer.MEMBERS in self.timers
        if isinstance(state, WaitingForKey) and not state.timed_out:
            assert ef.Timer.KEY in self.timers


def play(policy: VolumePolicy, steps: list[tuple[str, int]]) -> World:
    """Run the simulated world through ``steps``, checking the invariants after each."""
    world = World()
    for choice, pick in steps:
        event = world.event(choice, pick)
        if event is not None:
            world.apply(event, policy)
    return world


STEPS = st.lists(st.tuples(st.sampled_from(WORLD), st.integers(0, 3)), max_size=60)
policies = st.builds(VolumePolicy, auto_unlock=st.booleans(), lock_on_removal=st.booleans(),
                     passphrase=st.booleans(), lock_retries=st.integers(0, 3),
                     dependents=st.sampled_from(["degraded", "skip"]))


@settings(max_examples=400, deadline=None)
@given(policies, STEPS)
def test_random_event_sequences_keep_every_invariant(policy: VolumePolicy,
                                                     steps: list[tuple[str, int]]) -> None:
    play(policy, steps)


@settings(max_examples=200, deadline=None)
@given(policies, STEPS)
def test_any_reachable_state_can_still_be_locked_on_request(policy: VolumePolicy,
                                                            steps: list[tuple[str, int]]) -> None:
    world = play(policy, steps)
    world.apply(ev.LockRequested(), policy)
    for _ in range(10):  # settle: the engine succeeds from now on, pending retries fire
        if world.inflight is not None:
            world.apply(world.result("result-ok") or ev.MemberAdded(), policy)
        elif isinstance(world.state, Locking) and ef.Timer.LOCK_RETRY in world.timers:
            world.apply(ev.LockRetry(), policy)
    # Locked, or waiting for a key after rolling back a half-open stack found at start-up.
    assert isinstance(world.state, Locked) or world.state == WaitingForKey()
