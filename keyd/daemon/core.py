"""The daemon's core: facts per volume, fed by udev, timers, workers and D-Bus; no I/O of its own.

Everything here runs in the event loop (the :class:`~keyd.daemon.ports.Scheduler`),
one callback at a time, so no locks are needed. Every event updates the facts
of the volumes it concerns and reconciles them (:mod:`keyd.daemon.reconcile`,
pure); blocking work (mounting a stick, cryptsetup, asking a passphrase) goes
to workers whose results come back as events. The effects the pure core asks
for are carried out by :meth:`Daemon.carry`; the state shown on D-Bus is
derived from the facts and announced whenever it changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyd.audit.ids import AuditEvent as A
from keyd.audit.record import PRIORITY_NOTICE, PRIORITY_WARNING, AuditRecord, duration_ms
from keyd.audit.sink import AuditSink
from keyd.config.model import Config, DaemonSettings, Volume, VolumePolicy
from keyd.daemon import effects as ef
from keyd.daemon import events as ev
from keyd.daemon import workers
from keyd.daemon.backoff import Backoff
from keyd.daemon.facts import VolumeFacts, detail, state_name
from keyd.daemon.keystore import KeyStore
from keyd.daemon.ports import (
    Announcer,
    PassphraseAsker,
    Scheduler,
    StickChecker,
    UnitManager,
    VolumeEngine,
)
from keyd.daemon.reconcile import step
from keyd.daemon.sharebox import ShareBox
from keyd.daemon.uevents import (
    MemberAdded,
    MemberRemoved,
    StickAdded,
    StickGone,
    StickInfo,
    UEvent,
)
from keyd.errors import KeydError, user_message
from keyd.trust.errors import TrustError
from keyd.trust.report import HeldShare, StickReport, Verdict
from keyd.trust.secret import KeySet
from keyd.trust.shares import ShareSet

if TYPE_CHECKING:  # annotations only: the manifest parser loads with the first stick
    from keyd.trust.manifest import ShareFile

log = logging.getLogger("keyd.daemon")

TIMER_EVENTS: dict[ef.Timer, ev.Event] = {
    ef.Timer.GRACE: ev.GraceExpired(), ef.Timer.KEY: ev.KeyTimeout(),
    ef.Timer.MEMBERS: ev.MembersTimeout(), ef.Timer.LOCK_RETRY: ev.LockRetry()}
_WARN = {A.UNLOCK_FAILED, A.LOCK_BUSY, A.LOCK_FAILED, A.BUNDLE_REJECTED, A.BACKOFF, A.DEGRADED,
         A.KEY_TIMEOUT, A.SERVICES_FAILED, A.DBUS_DENIED, A.STATE_NOT_SAVED,
         A.REVOCATIONS_NEAR_CAP, A.SHARES_EXPIRED}


def target_unit(volume: str) -> str:
    """The unit keyd starts when ``volume`` is unlocked (dependents order after it)."""
    return f"keyd-unlocked@{volume}.target"


class QuietAnnouncer:
    """An :class:`Announcer` for when no D-Bus service is published."""

    def state_changed(self, volume: str, state: str, detail: str) -> None:
        """Ignore."""


@dataclass
class Announcers:
    """Several :class:`Announcer` s (D-Bus and the state file), told in turn."""

    announcers: list[Announcer]

    def state_changed(self, volume: str, state: str, detail: str) -> None:
        """Tell each one."""
        for announcer in self.announcers:
            announcer.state_changed(volume, state, detail)


@dataclass
class DaemonPorts:
    """Everything outside the core, injected."""

    engine: VolumeEngine
    units: UnitManager
    sticks: StickChecker
    asker: PassphraseAsker
    sink: AuditSink
    announcer: Announcer = field(default_factory=QuietAnnouncer)


class Daemon:
    """Keeps each volume's facts and carries out what reconciling them decides."""

    def __init__(self, config: Config, ports: DaemonPorts, loop: Scheduler) -> None:
        self.config = config
        self.settings: DaemonSettings = config.daemon
        self.ports = ports
        self.loop = loop
        self.volumes: dict[str, Volume] = {v.name: v for v in config.volumes}
        self.facts: dict[str, VolumeFacts] = {name: VolumeFacts() for name in self.volumes}
        self.shown: dict[str, tuple[str, str]] = {name: ("locked", "") for name in self.volumes}
        self.keys = KeyStore()
        self.shares = ShareBox()
        self.backoff = Backoff(config.daemon.backoff_base, config.daemon.backoff_max)
        self.sticks: dict[str, StickInfo] = {}
        self.inserted: dict[str, int] = {}  # devnode -> when it went in (the order of actions)
        self._seq = 0
        self._timers: dict[tuple[str, ef.Timer], Any] = {}
        self._retries: dict[str, Any] = {}
        self._checks = 0
        self._on_settled: Callable[[], object] | None = None

    # -- start-up and shutdown -------------------------------------------------------------

    def start(self, present: Iterable[StickInfo],
              on_settled: Callable[[], object] | None = None) -> None:
        """Reconcile with the kernel, then handle the sticks already plugged in (coldplug).

        ``on_settled`` runs once no stick check and no unlock or lock started here is
        still running (the daemon's READY=1), so a headless boot with the stick in
        has its volumes open before units ordered after keyd.service start.
        """
        for name, observed in self._observe().items():
            self.dispatch(name, observed)
        for stick in present:
            self.stick_added(stick)
        self.audit(None, A.DAEMON_STARTED, f"keyd started with {len(self.volumes)} volume(s), "
                   f"{len(self.sticks)} stick(s) present", result="started")
        self._on_settled = on_settled
        self._maybe_settled()

    def busy(self) -> bool:
        """True while a stick check, an unlock or a lock is running."""
        return self._checks > 0 or any(f.job is not None for f in self.facts.values())

    def _maybe_settled(self) -> None:
        if self._on_settled is not None and not self.busy():
            callback, self._on_settled = self._on_settled, None
            callback()

    def _observe(self) -> dict[str, ev.Observed]:
        try:
            reports = self.ports.engine.status(list(self.volumes.values()))
        except Exception as exc:  # the daemon must come up even if the kernel can't be read
            log.error("cannot read the kernel's state at start-up: %s", user_message(exc))
            return dict.fromkeys(self.volumes, ev.Observed("locked"))
        return {report.name: workers.observed(report) for report in reports}

    def stop(self) -> None:
        """Cancel every timer and wipe every key held (the stacks stay as they are)."""
        for handle in [*self._timers.values(), *self._retries.values()]:
            self.loop.cancel(handle)
        self._timers.clear()
        self._retries.clear()
        self.keys.wipe_all()
        self.shares.wipe_all()

    def policy(self, volume: str) -> VolumePolicy:
        """How ``volume`` is treated (its keyd.toml keys over the [daemon] defaults)."""
        return self.volumes[volume].policy

    # -- events ----------------------------------------------------------------------------

    def state(self, volume: str) -> str:
        """The state keyd shows for ``volume`` (derived from its facts)."""
        return state_name(self.facts[volume])

    def dispatch(self, volume: str, event: ev.Event) -> None:
        """Update one volume's facts with ``event``, reconcile, carry out the effects."""
        before = self.facts[volume]
        if isinstance(event, ev.UnlockSucceeded) and before.trying is not None:
            self._commit(volume, before.trying.ref)
        after, effects = step(before, event, self.policy(volume))
        self.facts[volume] = after
        if state_name(after) != state_name(before):
            log.info("volume %s: %s -> %s (%s)", volume, state_name(before), state_name(after),
                     type(event).__name__)
        for effect in effects:
            self.carry(volume, effect)
        self._announce(volume)
        self._maybe_settled()

    def _announce(self, volume: str) -> None:
        shown = (state_name(self.facts[volume]), detail(self.facts[volume], self.policy(volume)))
        if shown != self.shown[volume]:
            self.shown[volume] = shown
            self.ports.announcer.state_changed(volume, *shown)

    def broadcast(self, event: ev.Event) -> None:
        """Feed ``event`` to every volume."""
        for volume in self.volumes:
            self.dispatch(volume, event)

    def handle_uevent(self, uevent: UEvent) -> None:
        """React to one translated udev event."""
        if isinstance(uevent, StickAdded):
            self.stick_added(uevent.stick)
        elif isinstance(uevent, StickGone):
            self.stick_gone(uevent.devnode)
        elif isinstance(uevent, MemberAdded):
            self.broadcast(ev.MemberAdded())
        elif isinstance(uevent, MemberRemoved):
            self.broadcast(ev.MemberRemoved())

    # -- sticks ----------------------------------------------------------------------------

    def stick_added(self, stick: StickInfo) -> None:
        """A candidate stick: check it now, or after its backoff."""
        if self.sticks.get(stick.devnode) == stick:
            return  # coldplug and the add event, or a change event: already handled
        self.sticks[stick.devnode] = stick
        self.inserted[stick.devnode] = self._next()
        self.audit(None, A.STICK_INSERTED, f"key stick {stick.key} inserted at {stick.devnode} "
                   f"({stick.fstype})", serial=stick.key, result=stick.fstype)
        self._try_stick(stick)

    def _try_stick(self, stick: StickInfo) -> None:
        wait = self.backoff.wait(stick.key, self.loop.now())
        if wait > 0:
            self.audit(None, A.BACKOFF, f"stick {stick.key} failed before: ignored for "
                       f"{wait:.0f} s more", serial=stick.key, result="ignored",
                       reason=f"{self.backoff.failures(stick.key)} failures")
            self._retries[stick.devnode] = self.loop.call_later(
                wait, lambda: self._retry_stick(stick))
            return
        self._checks += 1
        seq = self.inserted[stick.devnode]  # when it went in, even if it is gone by the verdict
        self.loop.run_in_worker(lambda: self.ports.sticks.check(stick),
                                lambda report: self._stick_checked(stick, report, seq))

    def _retry_stick(self, stick: StickInfo) -> None:
        self._retries.pop(stick.devnode, None)
        if self.sticks.get(stick.devnode) == stick:
            self._try_stick(stick)

    def stick_gone(self, devnode: str) -> None:
        """A stick (or its medium) went away."""
        stick = self.sticks.pop(devnode, None)
        self.inserted.pop(devnode, None)
        handle = self._retries.pop(devnode, None)
        if handle is not None:
            self.loop.cancel(handle)
        if stick is None:
            return
        self.audit(None, A.STICK_REMOVED, f"key stick {stick.key} removed from {devnode}",
                   serial=stick.key, result="removed")
        self.broadcast(ev.StickRemoved(stick.key))

    def _stick_checked(self, stick: StickInfo, report: Any, seq: int) -> None:
        self._checks -= 1
        try:
            self._use_report(stick, report, seq)
        finally:
            self._maybe_settled()

    def _use_report(self, stick: StickInfo, report: Any, seq: int) -> None:
        if not isinstance(report, StickReport):  # the worker raised: report it as a refusal
            report = StickReport(None, f"checking the stick failed: {report}")
            self.audit(None, A.BUNDLE_REJECTED, report.message, serial=stick.key,
                       result="rejected", reason="INTERNAL_ERROR")
            self._stick_failed(stick.key)
            return
        if report.reason is not None:
            self.audit(None, A.BUNDLE_REJECTED, report.message, serial=stick.key,
                       signer=report.signer, result="rejected", reason=report.reason.value)
            self._stick_failed(stick.key)
            return
        accepted = [self._verdict(stick, report, verdict, seq) for verdict in report.verdicts]
        report.wipe()  # keys moved to the key store are separate buffers by now
        if any(accepted):
            self.backoff = self.backoff.succeeded(stick.key)
        else:
            self._stick_failed(stick.key)
        if stick.devnode not in self.sticks:  # pulled while it was being read
            self.broadcast(ev.StickRemoved(stick.key))

    def _verdict(self, stick: StickInfo, report: StickReport, verdict: Verdict, seq: int) -> bool:
        entry = verdict.entry
        if entry.volume not in self.volumes:
            self.audit(entry.volume, A.BUNDLE_REJECTED, f"bundle {entry.bundle_id} is for "
                       f"volume {entry.volume}, which is not configured", serial=stick.key,
                       signer=report.signer, bundle_id=entry.bundle_id, result="rejected",
                       reason="UNKNOWN_VOLUME")
            return False
        if verdict.accepted and entry.share is not None and verdict.share is not None:
            return self._share(stick, report, verdict, (entry.share, verdict.share), seq)
        if not verdict.accepted or verdict.keys is None:
            reason = verdict.reason.value if verdict.reason else "REJECTED"
            self.dispatch(entry.volume, ev.BundleRejected(stick.key, reason, entry.bundle_id))
            return False
        one = StickReport(None, report.message, report.signer, report.manifest, (verdict,))
        ref = self.keys.put(verdict.keys.copy(), one)
        self.audit(entry.volume, A.BUNDLE_ACCEPTED, verdict.message, serial=stick.key,
                   signer=report.signer, bundle_id=entry.bundle_id, result="accepted")
        self.dispatch(entry.volume, ev.KeyArrived(ref, "stick", stick.key, report.signer,
                                                  entry.bundle_id, seq=seq))
        return True

    def _share(self, stick: StickInfo, report: StickReport, verdict: Verdict,
               share: tuple[ShareFile, HeldShare], seq: int) -> bool:
        """Keep an accepted k-of-n share; with enough of them, their keys are on offer."""
        entry, (spec, held) = verdict.entry, share
        split = ShareSet(entry.volume, spec.set_id, entry.generation, spec.threshold, spec.count)
        one = StickReport(None, report.message, report.signer, report.manifest, (verdict,))
        try:
            progress = self.shares.add(split, spec.index, held, one, self.loop.now())
        except TrustError as exc:
            self.audit(entry.volume, A.SHARES_COMBINED, exc.message, result="rejected",
                       reason=exc.reason.value, serial=stick.key, bundle_id=entry.bundle_id)
            self._shares_held(entry.volume)
            return False
        self.audit(entry.volume, A.SHARE_ACCEPTED, verdict.message, result="accepted",
                   reason=f"{progress.have} of {split.threshold}", serial=stick.key,
                   signer=report.signer, bundle_id=entry.bundle_id)
        timeout = self.policy(entry.volume).share_timeout
        self.loop.call_later(timeout, lambda: self._expire_shares(entry.volume, timeout))
        if progress.keys is None:
            self.dispatch(entry.volume, ev.SharesHeld(progress.have, split.threshold))
            return True
        self.audit(entry.volume, A.SHARES_COMBINED, f"{split.threshold} of {split.count} shares "
                   f"of set {split.set_id} combined", result="combined", serial=stick.key)
        ref = self.keys.put(progress.keys, progress.report)
        self.dispatch(entry.volume, ev.KeyArrived(ref, "shares", stick.key, report.signer,
                                                  entry.bundle_id, seq=seq))
        return True

    def _expire_shares(self, volume: str, timeout: float) -> None:
        gone = self.shares.expire(volume, self.loop.now() - timeout + 0.001)
        if gone:
            self.audit(volume, A.SHARES_EXPIRED, f"{gone} share(s) zeroed unused after "
                       f"{timeout:g} s", result="expired")
            self._shares_held(volume)

    def _shares_held(self, volume: str) -> None:
        """Tell the volume's facts how many shares keyd still holds for it."""
        have, need = self.shares.waiting(volume) or (0, 0)
        self.dispatch(volume, ev.SharesHeld(have, need))

    def _stick_failed(self, key: str) -> None:
        self.backoff = self.backoff.failed(key, self.loop.now())
        count = self.backoff.failures(key)
        self.audit(None, A.BACKOFF, f"stick {key} failed {count} time(s) in a row: ignored for "
                   f"{self.backoff.delay(count):.0f} s", serial=key, result="armed",
                   reason=f"{count} failures")

    def _commit(self, volume: str, ref: str) -> None:
        """Record what the used bundle teaches; a failure is audited, never silent: the
        replay guard does not advance until it is fixed."""
        try:
            held = self.keys.get(ref)
            warning = self.ports.sticks.commit(held.report) if held.report is not None else None
        except KeyError:
            return
        except KeydError as exc:
            self.audit(volume, A.STATE_NOT_SAVED, "cannot record the accepted bundle's "
                       f"generation and revocations (retired sticks are not refused until it "
                       f"is fixed): {user_message(exc)}", result="not-saved",
                       reason="STATE_ERROR")
            return
        if warning is not None:
            self.audit(volume, A.REVOCATIONS_NEAR_CAP, warning, result="warning")

    # -- effects ---------------------------------------------------------------------------

    def carry(self, volume: str, effect: ef.Effect) -> None:
        """Carry out one effect the pure core asked for."""
        match effect:
            case ef.StartUnlock() | ef.StartLock() | ef.StartMend() | ef.AskPassphrase():
                self._start_job(volume, effect)
            case ef.RecheckSticks(serials):
                for stick in [s for s in self.sticks.values() if s.key in serials]:
                    self._try_stick(stick)
            case ef.DiscardKey(ref):
                self.keys.discard(ref)
            case ef.ArmTimer(timer, seconds):
                self._arm(volume, timer, seconds)
            case ef.CancelTimer(timer):
                handle = self._timers.pop((volume, timer), None)
                if handle is not None:
                    self.loop.cancel(handle)
            case ef.StartServices():
                self._units(volume, "start", [*self.volumes[volume].services,
                                              target_unit(volume)])
            case ef.KeyFailed(serial):
                self._stick_failed(serial)
            case ef.Audit():
                self.audit(volume, effect.event, effect.message, result=effect.result,
                           reason=effect.reason, serial=effect.serial, signer=effect.signer,
                           bundle_id=effect.bundle_id, seconds=effect.seconds)

    def _start_job(self, volume: str,
                   job: ef.StartUnlock | ef.StartLock | ef.StartMend | ef.AskPassphrase) -> None:
        """Hand the blocking work to a worker; its result comes back as an event."""
        vol, engine = self.volumes[volume], self.ports.engine
        back = lambda event: self.dispatch(volume, event)  # noqa: E731 (a result callback)
        match job:
            case ef.StartUnlock(ref):
                self.loop.run_in_worker(lambda: workers.unlock(engine, vol, self.keys, ref), back)
            case ef.StartLock(stop_services, quiesce):
                units = [target_unit(volume), *reversed(vol.services)] if stop_services else []
                self.loop.run_in_worker(
                    lambda: workers.lock(engine, vol, self.ports.units, units, quiesce=quiesce),
                    back)
            case ef.StartMend(ref_or_none):
                log.info("volume %s is open degraded: bringing back what it lacks%s", volume,
                         " (with a stick's key)" if ref_or_none else " (key-less sides only)")
                self.loop.run_in_worker(
                    lambda: workers.mend(engine, vol, self.keys, ref_or_none), back)
            case ef.AskPassphrase(timeout):
                self.loop.run_in_background(
                    lambda: workers.ask(self.ports.asker, self.keys, vol, timeout), back)

    def _arm(self, volume: str, timer: ef.Timer, seconds: float) -> None:
        old = self._timers.pop((volume, timer), None)
        if old is not None:
            self.loop.cancel(old)

        def fire() -> None:
            self._timers.pop((volume, timer), None)
            self.dispatch(volume, TIMER_EVENTS[timer])
        self._timers[(volume, timer)] = self.loop.call_later(seconds, fire)

    def _units(self, volume: str, verb: str, units: list[str]) -> None:
        for unit in units:
            try:
                getattr(self.ports.units, verb)(unit)
            except KeydError as exc:
                self.audit(volume, A.SERVICES_FAILED, f"cannot {verb} {unit}: "
                           f"{user_message(exc)}", result=verb, reason=unit)

    def audit(self, volume: str | None, event: A, message: str, *, seconds: float | None = None,
              **fields: str | None) -> None:
        """Write one audit record (about ``volume`` if given)."""
        priority = PRIORITY_WARNING if event in _WARN else PRIORITY_NOTICE
        prefix = f"volume {volume}: " if volume else ""
        if message.startswith(prefix):  # verdicts already name their volume
            prefix = ""
        self.ports.sink.emit(AuditRecord(event, prefix + message, volume=volume,
                                         duration_ms=duration_ms(seconds), priority=priority,
                                         **fields))

    # -- requests (D-Bus) ------------------------------------------------------------------

    def volume_info(self, volume: str) -> dict[str, str]:
        """The daemon's view of one volume (D-Bus GetVolume)."""
        facts = self.facts[volume]
        policy = self.policy(volume)
        mountpoint = next((layer.mountpoint for layer in self.volumes[volume].layers
                           if layer.kind == "mount" and layer.name == self.volumes[volume].top),
                          "")
        return {"name": volume, "state": state_name(facts), "detail": detail(facts, policy),
                "mountpoint": mountpoint, "dependents": policy.dependents,
                "key_timed_out": str(facts.key_timed_out).lower(),
                "key_names": ",".join(self.volumes[volume].key_names),
                "lock_on_removal": str(policy.lock_on_removal).lower()}

    def request_unlock(self, volume: str, keys: KeySet, by: str | None = None) -> str:
        """Use keys given over D-Bus; returns the state right after (usually unlocking)."""
        self.dispatch(volume, ev.KeyArrived(self.keys.put(keys), "dbus", by=by, seq=self._next()))
        return self.state(volume)

    def request_lock(self, volume: str, by: str) -> str:
        """Lock on request; returns the state right after (usually locking)."""
        self.dispatch(volume, ev.LockRequested(by, self._next()))
        return self.state(volume)

    def request_shutdown(self, by: str) -> list[str]:
        """The system goes down: lock every open volume, open nothing from now on. Returns
        the volumes that are still being worked on (``keydctl shutdown`` waits for them)."""
        # The root file system's volume stays: systemd-shutdown remounts the root read-only
        # last, and its FUSE driver, a root storage daemon, outlives that (keyd(8), BOOT).
        seq = self._next()
        for volume in [v for v in self.volumes.values() if v.boot != "root"]:
            self.dispatch(volume.name, ev.ShutdownStarted(by, seq))
        return [v for v in self.facts if self.state(v) in ("locking", "unlocking")]

    def _next(self) -> int:
        """The order of sticks going in and requests coming: the newest action wins."""
        self._seq += 1
        return self._seq
