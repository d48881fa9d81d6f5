"""The daemon core against a model: random interleavings of everything a NAS box throws at it.

hypothesis drives the real :class:`~keyd.daemon.core.Daemon` (the code keyd runs) on fake
ports: a fake kernel (FakeEngine: volumes open with the right key, disks can be absent,
a process can hold a volume busy), a manual loop whose worker jobs finish when the test
says so (so sticks, requests and disks arrive while unlocks and locks are running), and
restarts that lose the daemon's memory but keep the kernel.

Checked at every quiescent point (no job queued): the daemon's facts agree with the fake
kernel; every key it holds is on offer to some volume (none leaked, none used twice); every
real open and close of a stack has its audit record. Checked once time has passed (every
timer fired), from a reference model of who did what, in which order (the newest wins):
- a valid stick inserted after the newest admin lock, still in, the disks there: unlocked;
- an admin unlock with the right key newer than any lock, disks there since: unlocked;
- an admin lock newer than every stick and request (nothing holding it busy): locked;
- lock_on_removal, a stick inserted last and every stick with a verifying bundle for the
  volume pulled since: locked (unless it is still open from before any stick opened it);
- open degraded (a mirror side's disk was missing), that disk back and a valid stick for
  the volume in: the side is back (and audited ``mended``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from keyd.daemon.core import Daemon
from keyd.daemon.uevents import MemberAdded, StickAdded, StickGone, StickInfo
from keyd.trust.report import StickReport
from keyd.trust.secret import KeySet, SecretBytes
from tests.support.daemon_fakes import GOOD_KEY, Harness, accepted, harness, rejected

VOLUMES = ("tank", "work")
GRACE, RETRY_DELAY, RETRIES, MEMBER_WAIT, KEY_TIMEOUT = 5.0, 1.0, 2, 30.0, 90.0
SETTLE = KEY_TIMEOUT + MEMBER_WAIT + GRACE + 10  # every timer of the policy has fired
Kind = Literal["valid", "wrong-key", "rejected"]


@dataclass(frozen=True)
class ModelStick:
    """A stick of the model: which volume its bundle is for and whether its key is right."""

    info: StickInfo
    volume: str
    kind: Kind

    def report(self) -> StickReport:
        """A fresh verification report (the daemon wipes the keys of each one it uses)."""
        if self.kind == "rejected":
            return rejected()
        return accepted(self.volume, key=GOOD_KEY if self.kind == "valid" else b"wrong key")


def _stick(n: int, volume: str, kind: Kind) -> ModelStick:
    return ModelStick(StickInfo(f"/dev/sd{chr(ord('b') + n)}1", "vfat", f"SERIAL{n}"), volume, kind)


STICKS = (_stick(0, "tank", "valid"), _stick(1, "tank", "valid"), _stick(2, "work", "valid"),
          _stick(3, "tank", "wrong-key"), _stick(4, "work", "rejected"))


class ModelSticks:
    """The StickChecker: each stick's report follows from what the stick is."""

    def __init__(self) -> None:
        self.by_devnode = {s.info.devnode: s for s in STICKS}
        self.committed: list[tuple[str, ...]] = []

    def check(self, stick: StickInfo) -> StickReport:
        """The stick's report."""
        return self.by_devnode[stick.devnode].report()

    def commit(self, report: StickReport) -> None:
        """Record the commit."""
        self.committed.append(tuple(v.entry.volume for v in report.accepted))


class DaemonModel(RuleBasedStateMachine):
    """Random orderings of stick, disk, request, busy, job, timer and restart events."""

    def __init__(self) -> None:
        super().__init__()
        self.h: Harness = harness(lock_on_removal=True, grace=GRACE, key_timeout=KEY_TIMEOUT,
                                  member_wait=MEMBER_WAIT, lock_retries=RETRIES,
                                  lock_retry_delay=RETRY_DELAY)
        self.h.daemon.ports.sticks = ModelSticks()
        self.present: set[ModelStick] = set()
        self.clock = 0
        self.inserted: dict[ModelStick, int] = {}
        # When each volume was last locked, unlocked (right key) or sent a wrong key.
        self.asked: dict[tuple[str, str], int] = {}
        self.since: dict[str, int] = dict.fromkeys(VOLUMES, 0)  # audit records before the newest
        self.gap: dict[str, bool] = dict.fromkeys(VOLUMES, False)  # disks gone since an unlock
        self.down: int | None = None  # len(engine.changes) when the shutdown began
        self.in_flight = 0  # jobs running then: they end, then their volume is locked again
        self.h.daemon.start([])

    def _tick(self, volume: str, *, counts: bool = True) -> int:
        """The time of an action; one that ``counts`` starts a new window for refusals."""
        self.clock += 1
        if counts:
            self.since[volume] = len(self.h.sink.records)
        return self.clock

    def _ask(self, volume: str, what: str) -> None:
        self.asked[(volume, what)] = self._tick(volume)
        if what == "unlock":
            self.gap[volume] = volume in self.h.engine.absent

    # -- the world ------------------------------------------------------------------------

    @rule(stick=st.sampled_from(STICKS))
    def insert(self, stick: ModelStick) -> None:
        if stick in self.present:
            return
        self.present.add(stick)
        self.inserted[stick] = self._tick(stick.volume, counts=stick.kind != "rejected")
        self.h.daemon.handle_uevent(StickAdded(stick.info))

    @rule(stick=st.sampled_from(STICKS))
    def pull(self, stick: ModelStick) -> None:
        if stick not in self.present:
            return
        self.present.discard(stick)
        self.h.daemon.handle_uevent(StickGone(stick.info.devnode))

    @rule(volume=st.sampled_from(VOLUMES))
    def disks_go(self, volume: str) -> None:
        self.h.engine.absent.add(volume)
        self.gap[volume] = True

    @rule(volume=st.sampled_from(VOLUMES))
    def disks_come(self, volume: str) -> None:
        self.h.engine.absent.discard(volume)
        self.h.daemon.handle_uevent(MemberAdded(f"/dev/disk-{volume}"))

    @rule()
    def mirror_side_goes(self) -> None:
        """One disk of tank's array is unplugged: tank opens degraded from now on."""
        self.h.engine.late.add("tank")

    @rule()
    def mirror_side_comes(self) -> None:
        self.h.engine.late.discard("tank")
        self.h.daemon.handle_uevent(MemberAdded("/dev/side-tank"))

    @rule(volume=st.sampled_from(VOLUMES), busy=st.booleans())
    def hold(self, volume: str, busy: bool) -> None:
        (self.h.engine.held.add if busy else self.h.engine.held.discard)(volume)

    @rule(volume=st.sampled_from(VOLUMES))
    def admin_lock(self, volume: str) -> None:
        self._ask(volume, "lock")
        self.h.daemon.request_lock(volume, "keydctl lock")

    @rule(volume=st.sampled_from(VOLUMES), right=st.booleans())
    def admin_unlock(self, volume: str, right: bool) -> None:
        key = GOOD_KEY if right else b"not the key"
        # A wrong key is refused on a locked volume, and not even tried on an open one (the
        # engine has nothing to open): the model expects nothing until the next action.
        self._ask(volume, "unlock" if right else "wrong")
        self.h.daemon.request_unlock(volume, KeySet.single(SecretBytes(key)), "uid 0")

    @rule()
    def shutdown(self) -> None:
        """The system goes down (keyd-shutdown.service): what is open is locked, for good."""
        if self.down is None:
            self.down, self.in_flight = len(self.h.engine.changes), len(self.h.loop.work)
        self.h.daemon.request_shutdown("system shutdown")

    # -- the daemon's own pace ------------------------------------------------------------

    @rule()
    def one_job_finishes(self) -> None:
        if self.h.loop.work:
            work, done = self.h.loop.work.pop(0)
            done(work())

    @rule()
    def all_jobs_finish(self) -> None:
        self.h.loop.run()

    @rule(seconds=st.sampled_from([0.5, RETRY_DELAY, GRACE + 0.1]))
    def time_passes(self, seconds: float) -> None:
        self.h.loop.advance(seconds)

    @rule()
    def restart(self) -> None:
        """keyd restarts (crash, upgrade): jobs in flight finish, memory is lost, the kernel stays."""
        self.h.loop.run()
        old = self.h.daemon
        old.stop()
        self.down = None  # a new keyd: the shutdown did not happen after all
        self.h.daemon = Daemon(old.config, old.ports, self.h.loop)
        self.asked.clear()  # admin requests were in memory only; coldplug re-reads every stick
        coldplug = sorted(self.present, key=lambda s: s.info.devnode)
        for stick in coldplug:
            self.inserted[stick] = self._tick(stick.volume, counts=stick.kind != "rejected")
        self.h.daemon.start([s.info for s in coldplug])

    # -- what must hold -------------------------------------------------------------------

    @invariant()
    def facts_agree_with_the_kernel_and_no_key_leaks(self) -> None:
        if self.h.loop.work:
            return  # a job is in flight: its result has not come back yet
        daemon, engine = self.h.daemon, self.h.engine
        offered: set[str] = set()
        for volume in VOLUMES:
            facts = daemon.facts[volume]
            kernel = "unlocked" if volume in engine.open else "locked"
            assert facts.kernel == kernel, (volume, facts, engine.open)
            assert facts.job is None and facts.trying is None, facts
            offered |= {o.ref for o in facts.offers}
        assert set(daemon.keys._keys) == offered  # every key held is on offer, once

    @invariant()
    def every_open_and_close_is_audited(self) -> None:
        if self.h.loop.work:
            return
        records = self.h.sink.records
        for volume in VOLUMES:
            opened = [r for r in records if r.volume == volume and r.event == "unlock-finished"
                      and r.result == "unlocked"]
            closed = [r for r in records if r.volume == volume and r.event == "lock-finished"
                      and r.result != "already-locked"]
            mended = [r for r in records if r.volume == volume and r.event == "mended"
                      and r.result == "mended"]
            assert len(opened) == self.h.engine.changes.count(("open", volume))
            assert len(closed) == self.h.engine.changes.count(("close", volume))
            assert len(mended) == self.h.engine.changes.count(("mend", volume))

    @rule()
    def settle(self) -> None:
        """Let every job finish and every timer fire, then compare with the reference model."""
        self.h.loop.run()
        self.h.loop.advance(SETTLE)
        self.h.loop.run()
        for volume in VOLUMES:
            self._check(volume)

    def _check(self, volume: str) -> None:
        is_open = volume in self.h.engine.open
        if self.down is not None:
            # Nothing opens or mends after the shutdown began (but what was under way then);
            # only a busy volume stays open.
            after = self.h.engine.changes[self.down:]
            assert after.count(("open", volume)) + after.count(("mend", volume)) \
                <= self.in_flight, (volume, after)
            assert not is_open or any(
                r.volume == volume and r.event == "lock-busy" and r.result == "left-open"
                for r in self.h.sink.records), (volume, self.h.daemon.facts[volume])
            return
        disks = volume not in self.h.engine.absent
        lock, unlock, wrong = (self.asked.get((volume, what), 0) for what in ("lock", "unlock", "wrong"))
        holders = [self.inserted[s] for s in self._holders(volume)]
        fresh = [self.inserted[s] for s in self._holders(volume) if s.kind == "valid"
                 and self.inserted[s] > lock]
        newest_stick = max((t for s, t in self.inserted.items() if s.volume == volume
                            and s.kind != "rejected"), default=0)
        why = (volume, (lock, unlock, wrong, newest_stick), self.present,
               self.h.daemon.facts[volume])
        if is_open and volume not in self.h.engine.late and any(
                s.kind == "valid" for s in self._holders(volume)):
            assert volume not in self.h.engine.degraded, why  # the late side is back
        if wrong > max(lock, unlock, newest_stick):
            return  # the newest thing asked was a wrong key: nothing to expect
        if (fresh and disks) or (unlock > max(lock, newest_stick) and not self.gap[volume]):
            assert is_open, why
        elif lock > max(unlock, *holders, newest_stick, 0) and not self._refused(volume):
            assert not is_open, why
        elif newest_stick > max(lock, unlock) and not holders and not self._refused(volume):
            assert not is_open or self.h.daemon.facts[volume].opened_by is None, why

    def _refused(self, volume: str) -> bool:
        """A lock was refused since the last action: a process held the volume busy."""
        return any(r.volume == volume and r.event == "lock-busy" and r.result == "stays-unlocked"
                   for r in self.h.sink.records[self.since[volume]:])

    def _holders(self, volume: str) -> list[ModelStick]:
        """Sticks with a bundle for the volume that verifies (right key or not) hold it open."""
        return [s for s in self.present if s.volume == volume and s.kind != "rejected"]



TestDaemonModel = DaemonModel.TestCase
TestDaemonModel.settings = settings(max_examples=5000, stateful_step_count=30, deadline=None)
