"""Small explicit fakes of the daemon's ports and a harness wiring them to a real Daemon.

For unit tests and the D-Bus tests' second process (which needs them importable);
production code never imports this module.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from keyd.audit.sink import MemorySink
from keyd.config import Config, Volume, parse_config
from keyd.config.model import DaemonSettings, VolumePolicy
from keyd.daemon.core import Daemon, DaemonPorts
from keyd.daemon.uevents import StickInfo
from keyd.engine.assess import LayerStatus
from keyd.engine.errors import DevicesMissing, Holder, KeyRejected, VolumeBusy
from keyd.engine.executor import KeySource
from keyd.engine.keys import KeyInventory
from keyd.engine.service import Outcome
from keyd.engine.status import VolumeReport
from keyd.errors import KeydError
from keyd.trust.errors import Reason
from keyd.trust.manifest import KeyEntry, KeyFile, Manifest, ShareFile
from keyd.trust.report import HeldShare, StickReport, Verdict
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.shares import ShareSet, new_master, seal
from keyd.trust.shares import split as split_master

CONFIG = parse_config(textwrap.dedent("""
    [volume.tank]
    services = ["smbd.service"]
    [volume.tank.layer.md0]
    kind = "raid"
    uuid = "6b8b4567327b23c6643c986966334873"
    degraded = "always"
    [volume.tank.layer.crypt0]
    kind = "crypt"
    type = "luks"
    below = ["md0"]
    [volume.tank.layer.data]
    kind = "mount"
    below = ["crypt0"]
    fstype = "xfs"
    mountpoint = "/srv/tank"

    [volume.work]
    [volume.work.layer.crypt1]
    kind = "crypt"
    type = "luks"
    device = "/dev/disk/by-uuid/bbbb"
"""), "keyd.toml")

GOOD_KEY = b"correct horse battery staple"
STICK = StickInfo("/dev/sdc1", "vfat", "4C530001", "1234-ABCD")
SIGNER = "A" * 40


class FakeLoop:
    """A manual event loop: timers fire on :meth:`advance`, workers run on :meth:`run`."""

    def __init__(self) -> None:
        self.time = 1000.0
        self.timers: dict[int, tuple[float, Callable[[], None]]] = {}
        self.work: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []
        self.next_id = 0

    def call_later(self, seconds: float, callback: Callable[[], None]) -> int:
        """Schedule ``callback`` at now + ``seconds`` (fires in :meth:`advance`)."""
        self.next_id += 1
        self.timers[self.next_id] = (self.time + seconds, callback)
        return self.next_id

    def cancel(self, handle: Any) -> None:
        """Drop a scheduled callback."""
        self.timers.pop(handle, None)

    def run_in_worker(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Queue ``work``; it runs in :meth:`run`."""
        self.work.append((work, done))

    def run_in_background(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Queue ``work``; it runs in :meth:`run`."""
        self.work.append((work, done))

    def now(self) -> float:
        """The manual clock."""
        return self.time

    def run(self) -> None:
        """Run queued work (and the work its results queue) to completion."""
        while self.work:
            work, done = self.work.pop(0)
            try:
                result = work()
            except Exception as exc:
                result = exc
            done(result)

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in order, running work in between."""
        end = self.time + seconds
        while True:
            due = sorted((t, h) for h, (t, _) in self.timers.items() if t <= end)
            if not due:
                break
            when, handle = due[0]
            self.time = max(self.time, when)
            _, callback = self.timers.pop(handle)
            callback()
            self.run()
        self.time = end


@dataclass
class FakeEngine:
    """Volumes open when given GOOD_KEY; scripted failures by volume.

    ``absent``: volumes whose disks are not there (unlock: DevicesMissing); ``held``: volumes
    a process keeps busy (lock: VolumeBusy) until the test lets go; ``changes`` records each
    real open and close (and mend), for checking the audit against the kernel. ``late``:
    volumes whose mirror side's disk is not there: they open degraded (``degraded``), and
    a mend (or unlock) with the right key once it is there brings the side back.
    """

    open: set[str] = field(default_factory=set)
    partial: set[str] = field(default_factory=set)
    busy: list[bool] = field(default_factory=list)
    unlock_errors: list[KeydError] = field(default_factory=list)
    keys_seen: list[bytes] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    absent: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    changes: list[tuple[str, str]] = field(default_factory=list)
    late: set[str] = field(default_factory=set)
    degraded: set[str] = field(default_factory=set)

    def unlock(self, volume: Volume, keys: KeySource, *, start_services: bool = False) -> Outcome:
        """Open if the key is GOOD_KEY (or fail with the next scripted error)."""
        self.calls.append(f"unlock {volume.name}")
        if self.unlock_errors:
            raise self.unlock_errors.pop(0)
        changed = volume.name not in self.open
        if changed and volume.name in self.absent:
            raise DevicesMissing(f"cannot unlock volume {volume.name}: device is not present")
        key = self._key(volume, keys)
        if changed and key != GOOD_KEY:
            raise KeyRejected(f"wrong key for volume {volume.name}")
        if changed:
            self.changes.append(("open", volume.name))
            self.open.add(volume.name)
            if volume.name in self.late:
                self.degraded.add(volume.name)
                return Outcome(volume.name, True, degraded=("pool DEGRADED (without side)",))
        mended = self._mend(volume, key)
        return Outcome(volume.name, changed, mended=mended)

    def mend(self, volume: Volume, keys: KeySource) -> Outcome:
        """Bring the late side back if its disk is here and the key is right."""
        self.calls.append(f"mend {volume.name}")
        layer = next(layer for layer in volume.layers if layer.kind == "crypt")
        known = not isinstance(keys, KeyInventory) or keys.has(layer.key)
        key = self._key(volume, keys) if known else None
        mended = self._mend(volume, key)
        return Outcome(volume.name, bool(mended), mended=mended)

    def _key(self, volume: Volume, keys: KeySource) -> bytes:
        layer = next(layer for layer in volume.layers if layer.kind == "crypt")
        key = bytes(keys.key(volume.name, layer.key, layer))
        self.keys_seen.append(key)
        return key

    def _mend(self, volume: Volume, key: bytes | None) -> tuple[str, ...]:
        name = volume.name
        if name not in self.degraded or name in self.late or key is None:
            return ()
        if key != GOOD_KEY:
            raise KeyRejected(f"wrong key for the late side of volume {name}")
        self.degraded.discard(name)
        self.changes.append(("mend", name))
        return ("side is back in the pool",)

    def lock(self, volume: Volume, *, force: bool = False, quiesce: bool = False) -> Outcome:
        """Close, unless the next scripted busy flag (or a holder) says busy (and then, with
        ``quiesce``, say the file system was flushed)."""
        self.calls.append(f"lock {volume.name}{' (quiesce)' if quiesce else ''}")
        if (self.busy and self.busy.pop(0)) or volume.name in self.held:
            busy = VolumeBusy(volume.name, [Holder(42, "bash", "cwd in", "/srv/tank")])
            busy.quiesced = ("/srv/tank: synced, still read-write",) if quiesce else ()
            raise busy
        changed = volume.name in self.open | self.partial
        if changed:
            self.changes.append(("close", volume.name))
        self.open.discard(volume.name)
        self.degraded.discard(volume.name)
        self.partial.discard(volume.name)
        return Outcome(volume.name, changed)

    conflict: set[str] = field(default_factory=set)

    def status(self, volumes: Sequence[Volume]) -> list[VolumeReport]:
        """Reports built from the open/partial/conflict sets."""
        return [self._report(volume) for volume in volumes]

    def _report(self, volume: Volume) -> VolumeReport:
        name = volume.name
        bottom = LayerStatus("crypt0", "crypt", open=name in self.open | self.partial, owned=True,
                             degraded=name in self.degraded)
        top = LayerStatus("data", "mount", open=name in self.open,
                          problem="device missing" if name in self.conflict else None)
        state = ("unlocked (degraded)" if name in self.degraded else
                 "unlocked" if name in self.open else "partial" if name in self.partial
                 else "conflict" if name in self.conflict else "locked")
        return VolumeReport(name, state, (top, bottom), volume.services)


@dataclass
class FakeUnits:
    """Records unit starts/stops; refuses the units in ``refuse``."""

    calls: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    def start(self, unit: str) -> None:
        """Record a start."""
        self._call("start", unit)

    def stop(self, unit: str) -> None:
        """Record a stop."""
        self._call("stop", unit)

    def wait_stopped(self, unit: str, timeout: float) -> bool:
        """Stopped at once (the fake has no slow services)."""
        return True

    def _call(self, verb: str, unit: str) -> None:
        self.calls.append(f"{verb} {unit}")
        if unit in self.refuse:
            raise KeydError(f"Unit {unit} not found.")


def entry(volume: str, bundle: str = "b-1") -> KeyEntry:
    """A manifest entry for ``volume``."""
    return KeyEntry(volume, bundle, (KeyFile(f"{volume}.key", "0" * 64),), 3,
                    datetime(2026, 1, 1, tzinfo=UTC))


def accepted(*volumes: str, key: bytes = GOOD_KEY) -> StickReport:
    """A report accepting one key (``key``) per volume."""
    verdicts = tuple(Verdict(entry(v), None, f"volume {v}: accepted",
                             KeySet.single(SecretBytes(key)))
                     for v in volumes)
    return StickReport(None, "ok", SIGNER, Manifest(tuple(v.entry for v in verdicts)), verdicts)


def share_reports(volume: str, *, threshold: int = 2, count: int = 3, set_id: str = "set-1",
                  key: bytes = GOOD_KEY) -> list[StickReport]:
    """One accepted share report per stick of a k-of-n enrollment sealing ``key`` (real
    Shamir and sealing; only the stick reading is faked)."""
    split = ShareSet(volume, set_id, 3, threshold, count)
    with new_master() as master:
        pieces = split_master(master, threshold, count)
        sealed = seal(master, split, KeySet.single(SecretBytes(key)))
    reports = []
    for index, piece in pieces:
        share = ShareFile(set_id, index, threshold, count, KeyFile(f"{volume}.share", "0" * 64))
        bundle = replace(entry(volume, f"{set_id}-{index}"), share=share)
        verdict = Verdict(bundle, None, f"volume {volume}: share {index} of {count} accepted",
                          share=HeldShare(SecretBytes(piece), dict(sealed)))
        reports.append(StickReport(None, "ok", SIGNER, Manifest((bundle,)), (verdict,)))
    return reports


def rejected(reason: Reason = Reason.BAD_SIGNATURE) -> StickReport:
    """A report refusing the whole stick."""
    return StickReport(reason, f"{reason.value}: refused")


@dataclass
class FakeSticks:
    """Returns the scripted report for each check; records commits."""

    reports: list[StickReport] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    committed: list[tuple[str, ...]] = field(default_factory=list)
    handed_out: list[StickReport] = field(default_factory=list)

    def check(self, stick: StickInfo) -> StickReport:
        """The next scripted report."""
        self.checked.append(stick.devnode)
        report = self.reports.pop(0)
        self.handed_out.append(report)
        return report

    commit_error: KeydError | None = None
    commit_warning: str | None = None

    def commit(self, report: StickReport) -> str | None:
        """Record which volumes were committed (or fail with ``commit_error``)."""
        if self.commit_error is not None:
            raise self.commit_error
        self.committed.append(tuple(v.entry.volume for v in report.accepted))
        return self.commit_warning


@dataclass
class FakeAsker:
    """Answers passphrase prompts from a script."""

    answers: list[bytes | None] = field(default_factory=list)
    asked: list[tuple[str, float]] = field(default_factory=list)

    def ask(self, volume: str, names: Sequence[str], timeout: float) -> KeySet | None:
        """The next scripted answer, for every key name (None: unanswered)."""
        self.asked.append((volume, timeout))
        answer = self.answers.pop(0) if self.answers else None
        return KeySet.single(SecretBytes(answer)) if answer is not None else None


@dataclass
class Signals:
    """Records StateChanged signals."""

    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def state_changed(self, volume: str, state: str, detail: str) -> None:
        """Record the signal."""
        self.seen.append((volume, state, detail))


@dataclass
class Harness:
    """A daemon with every fake port, for assertions."""

    daemon: Daemon
    loop: FakeLoop
    engine: FakeEngine
    units: FakeUnits
    sticks: FakeSticks
    asker: FakeAsker
    sink: MemorySink
    signals: Signals

    def state(self, volume: str) -> str:
        """The volume's state name."""
        return self.daemon.state(volume)

    def events(self) -> list[str]:
        """The audit event names so far."""
        return self.sink.events()


def with_policy(config: Config, settings: DaemonSettings, policy: VolumePolicy) -> Config:
    """``config`` with ``settings`` and every volume under ``policy`` (as keyd.toml would give)."""
    volumes = tuple(replace(volume, policy=policy) for volume in config.volumes)
    return replace(config, volumes=volumes, daemon=replace(settings, defaults=policy))


def harness(settings: DaemonSettings | None = None, loop: Any = None,
            **volume_policy: Any) -> Harness:
    """A real Daemon on fake ports (and a FakeLoop unless ``loop`` is given)."""
    config = with_policy(CONFIG, settings or DaemonSettings(), VolumePolicy(**volume_policy))
    loop = loop or FakeLoop()
    engine, units = FakeEngine(), FakeUnits()
    sticks, asker, sink, signals = FakeSticks(), FakeAsker(), MemorySink(), Signals()
    daemon = Daemon(config, DaemonPorts(engine, units, sticks, asker, sink, signals), loop)
    return Harness(daemon, loop, engine, units, sticks, asker, sink, signals)
