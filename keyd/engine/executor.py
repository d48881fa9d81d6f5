"""Runs plans through the adapters: unlock as a transaction, lock only when nothing is busy.

Unlock: each step that opens something is remembered; when a step fails (or
the run is interrupted), exactly those are closed again in reverse order, and
the original error is re-raised. Rollback failures are attached to it (as
notes and ``rollback_failures``), never replacing it.

Lock: processes using a mountpoint or device that is about to close make the
lock fail with the PIDs listed. ``force`` only stops the volume's configured
services first; keyd never kills processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from keyd.config.model import CryptLayer, Volume
from keyd.engine.errors import DegradedRefused, Holder, KeyRejected, StorageError, VolumeBusy
from keyd.engine.keys import KeyfileSource
from keyd.engine.names import record_key
from keyd.engine.observe import Observer
from keyd.engine.observed import ObservedState
from keyd.engine.plan import (
    AssembleRaid,
    AttachLoop,
    CloseCrypt,
    DetachLoop,
    ExportPool,
    ImportPool,
    LayerRef,
    Mount,
    OnlineVdev,
    OpenCrypt,
    Plan,
    ReAddMember,
    Source,
    Step,
    StopRaid,
    Unmount,
    WaitForMembers,
    undo_step,
)
from keyd.engine.pool_records import MemoryRecords, PoolRecordPort
from keyd.engine.ports import HolderPort, ServicePort, Storage, ZfsPort
from keyd.errors import KeydError

log = logging.getLogger("keyd.engine")


class KeySource(Protocol):
    """Supplies the secret named ``name`` for a crypt layer of ``volume``."""

    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        """The key bytes; the executor wipes the buffer after use."""
        ...


class Progress(Protocol):
    """Shows progress of slow steps (key derivation, assembly, waiting)."""

    def started(self, text: str) -> None:
        """A slow step began."""
        ...

    def finished(self, text: str, seconds: float) -> None:
        """The slow step ended."""
        ...


class QuietProgress:
    """A :class:`Progress` that shows nothing."""

    def started(self, text: str) -> None:
        """Ignore."""

    def finished(self, text: str, seconds: float) -> None:
        """Ignore."""


@dataclass
class _Run:
    """What one unlock run has produced so far."""

    devices: dict[str, str]
    opened: list[tuple[Step, str | None]] = field(default_factory=list)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    plain_opened: set[str] = field(default_factory=set)


@dataclass
class Executor:
    """Executes plans; every effect goes through the injected adapters."""

    storage: Storage
    keys: KeySource
    observer: Observer
    holders: HolderPort
    services: ServicePort
    progress: Progress = field(default_factory=QuietProgress)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    records: PoolRecordPort = field(default_factory=MemoryRecords)
    # What the last unlock had to accept, e.g. a pool imported DEGRADED (said to the user).
    degraded: list[str] = field(default_factory=list)
    # The mirror sides the last unlock brought back into an open, degraded volume.
    mended: list[str] = field(default_factory=list)

    def unlock(self, volume: Volume, plan: Plan) -> dict[str, str]:
        """Run an unlock plan; return layer -> device (zfs: pool name) for every open layer."""
        self.degraded, self.mended = [], []
        run = _Run(devices=dict(plan.devices))
        try:
            for step in plan.steps:
                self._timed(step, partial(self._open, volume, step, run))
        except BaseException as error:
            self._rollback(run, error)
            raise
        self._autoclear(volume, run)
        return run.devices

    def _autoclear(self, volume: Volume, run: _Run) -> None:
        """Loop devices a file system of this run is mounted on go by themselves when it is
        unmounted (by keyd, or by systemd at power-off), so the file system holding the image
        can be unmounted next. Only those: the flag detaches a loop device at once if nothing
        holds it open (in the initramfs, the root's loop device waits for initramfs-tools)."""
        mounted = {_resolve(step.source, run) for step, _ in run.opened if isinstance(step, Mount)}
        for step, device in run.opened:
            if isinstance(step, AttachLoop) and device in mounted:
                self.storage.loops.autoclear(_label(volume.name, step.layer), device)

    def _timed(self, step: Step, action: Callable[[], None]) -> None:
        text = step.describe()
        log.info("%s", text)
        started = self.clock()
        if step.slow:
            self.progress.started(text)
        action()
        if step.slow:
            self.progress.finished(text, self.clock() - started)

    def _open(self, volume: Volume, step: Step, run: _Run) -> None:
        device: str | None = None
        label = _label(volume.name, _layer_name(step))
        if isinstance(step, WaitForMembers):
            run.members[step.layer] = self._wait(volume, step)
            return
        if isinstance(step, StopRaid):  # taking over an inactive array; nothing to undo
            self.storage.raid.stop(label, step.device)
            return
        if isinstance(step, AssembleRaid):
            members = run.members.get(step.layer, step.members)
            device = self.storage.raid.assemble(label, step.md_name, step.uuid, members,
                                                run=step.run)
            if step.run:
                self._note_degraded_array(volume, step, label)
        elif isinstance(step, OpenCrypt):
            device = self._open_crypt(volume, step, run)
        elif isinstance(step, AttachLoop):
            device = self.storage.loops.attach(label, step.image, read_only=step.read_only)
        elif isinstance(step, Mount):
            device = self._mount(volume, step, run, label)
        elif isinstance(step, ImportPool):
            self._import(step, run, label)
            return
        elif isinstance(step, OnlineVdev | ReAddMember):
            self._mend(step, run, label)
            return
        run.opened.append((step, device))
        run.devices[_layer_name(step)] = device or ""

    def _import(self, step: ImportPool, run: _Run, label: str) -> None:
        pool = _zfs(self.storage).import_pool(label, step.layer)
        self.records.save(record_key(step.volume, step.layer.name), pool.guid)
        run.opened.append((step, pool.name))  # from here on, rollback exports it
        run.devices[step.layer.name] = pool.name
        if pool.health == "ONLINE":
            return
        why = f"without {', '.join(step.missing)}" if step.missing else "a vdev failed to open"
        text = f"zfs pool {pool.name} of {label} was imported {pool.health} ({why})"
        if step.layer.degraded == "never":
            raise DegradedRefused(f"{text}; its degraded policy is never",
                                  fix="see `zpool status -P " + pool.name + "` before "
                                      "unlocking again, or set degraded = \"always\"")
        log.warning("%s", text)
        self.degraded.append(text)

    def _mend(self, step: OnlineVdev | ReAddMember, run: _Run, label: str) -> None:
        if isinstance(step, OnlineVdev):
            device = _resolve(step.source, run)
            _zfs(self.storage).online(label, step.pool, device)
            self.mended.append(f"{step.layer} ({device}) is back in zfs pool {step.pool}; "
                               "zfs resilvers it")
        else:
            self.storage.raid.re_add(label, step.device, step.member)
            self.mended.append(f"{step.member} was re-added to md array {step.device} of "
                               f"{label}")
        log.warning("%s", self.mended[-1])

    def _note_degraded_array(self, volume: Volume, step: AssembleRaid, label: str) -> None:
        """An array started with members missing (the policy allowed it) is reported degraded."""
        array = self.observer.observe([volume], members=False).md_with_uuid(step.uuid)
        if array is not None and array.degraded > 0:
            text = (f"md array {step.md_name} of {label} was started with "
                    f"{array.raid_disks - array.degraded} of {array.raid_disks} members")
            log.warning("%s", text)
            self.degraded.append(text)

    def _open_crypt(self, volume: Volume, step: OpenCrypt, run: _Run) -> str:
        source = _resolve(step.source, run)
        key = self.keys.key(volume.name, step.layer.key, step.layer)
        keyfiles = (self.keys.keyfiles(volume.name, step.layer.key)
                    if isinstance(self.keys, KeyfileSource) else [])
        try:
            device = self.storage.crypt.open(volume.name, step.layer, source, step.dm_name, key,
                                             keyfiles=keyfiles)
        finally:
            for secret in (key, *keyfiles):
                secret[:] = bytes(len(secret))  # wipe our copies of the secrets
        if step.layer.type == "plain":
            run.plain_opened.add(step.layer.name)
        return device

    def _mount(self, volume: Volume, step: Mount, run: _Run, label: str) -> str:
        source = _resolve(step.source, run)
        try:
            self.storage.mounts.mount(label, source, step.mountpoint, step.fstype, step.options)
        except StorageError as exc:
            # Plain dm-crypt cannot tell a wrong key: it shows up here as garbage.
            if isinstance(step.source, LayerRef) and step.source.layer in run.plain_opened:
                raise KeyRejected(
                    f"wrong key for volume {volume.name}? {step.layer} does not mount after "
                    f"plain layer {step.source.layer} was opened",
                    fix="plain mode cannot check keys: check the key and cipher, key_size, "
                        "hash, offset and skip in keyd.toml") from exc
            raise
        return source

    def _wait(self, volume: Volume, step: WaitForMembers) -> tuple[str, ...]:
        deadline = self.clock() + step.seconds
        while True:
            found = self.observer.observe([volume]).members_of(step.uuid)
            devices = found.devices if found is not None else ()
            if len(devices) >= step.expected or self.clock() >= deadline:
                return devices
            self.sleep(min(1.0, max(deadline - self.clock(), 0.0)))

    def _rollback(self, run: _Run, error: BaseException) -> None:
        failures: list[BaseException] = []
        for step, device in reversed(run.opened):
            undo = undo_step(step, device)
            if undo is None:
                continue
            try:
                self._close(undo, None)
            except Exception as exc:  # keep going: close as much as possible
                failures.append(exc)
                error.add_note(f"rollback: {undo.describe()} failed: {exc}")
        error.rollback_failures = failures  # type: ignore[attr-defined]

    def lock(self, volume: Volume, plan: Plan, observed: ObservedState, *,
             force: bool = False, quiesce: bool = False) -> None:
        """Run a lock plan after checking nothing holds the volume.

        ``quiesce`` (at shutdown): a busy volume's file systems are flushed and, where
        nothing writes, remounted read-only, top-down; nothing is closed under them.
        """
        if force:
            self.services.stop(volume.services)
        holders, reasons = self._busy(plan, observed)
        if holders or reasons:
            busy = VolumeBusy(volume.name, holders, reasons)
            if quiesce:
                busy.quiesced = tuple(
                    self.storage.mounts.quiesce(_label(volume.name, step.layer), step.mountpoint)
                    for step in plan.steps if isinstance(step, Unmount))
            raise busy
        for step in plan.steps:
            self._timed(step, partial(self._close, step, volume))

    def _busy(self, plan: Plan, observed: ObservedState) -> tuple[list[Holder], list[str]]:
        unmounting = {s.mountpoint for s in plan.steps if isinstance(s, Unmount)}
        unmounting |= {point for s in plan.steps if isinstance(s, ExportPool)
                       for point in pool_mountpoints(s.pool, observed)}
        reasons = [f"{m.source} is mounted at {m.mountpoint}, inside {point}"
                   for point in sorted(unmounting) for m in observed.mounts_below(point)
                   if m.mountpoint not in unmounting]
        reasons += _other_mounts(unmounting, observed)
        targets = dict(pair for step in plan.steps for pair in _targets(step, observed))
        found = self.holders.holders(list(targets))
        # A FUSE driver (ntfs-3g) holds its device until its mount goes; that is not "busy".
        fuse = {m.source_kname for m in observed.mounts
                if m.mountpoint in unmounting and m.fstype.startswith("fuse")}
        servers = {h.pid for h in self.holders.holders(["/dev/fuse"])} if fuse else set()
        holders = [h for h in found
                   if not (h.pid in servers and targets.get(h.path) in fuse)]
        return holders, reasons

    def _close(self, step: Step, volume: Volume | None) -> None:
        label = _label(volume.name if volume else "", _layer_name(step))
        if isinstance(step, Unmount):
            self.storage.mounts.unmount(label, step.mountpoint)
        elif isinstance(step, DetachLoop):
            self.storage.loops.detach(label, step.device)
        elif isinstance(step, CloseCrypt):
            self.storage.crypt.close(step.dm_name)
        elif isinstance(step, StopRaid):
            self.storage.raid.stop(label, step.device)
        elif isinstance(step, ExportPool):
            _zfs(self.storage).export_pool(label, step.pool)
            self.records.forget(record_key(step.volume, step.layer))
        else:
            raise KeydError(f"not a closing step: {step.describe()}")


def _layer_name(step: Step) -> str:
    return step.layer.name if isinstance(step, OpenCrypt | ImportPool) else step.layer


def _zfs(storage: Storage) -> ZfsPort:
    if storage.zfs is None:
        raise KeydError("this keyd was built without its zfs adapter",
                        fix="report a bug: Storage needs zfs=Zpool(runner)")
    return storage.zfs


def _label(volume: str, layer: str) -> str:
    return f"layer {layer} of volume {volume}" if volume else f"layer {layer}"


def _resolve(source: Source, run: _Run) -> str:
    if isinstance(source, LayerRef):
        return run.devices[source.layer]
    return source


def _targets(step: Step, observed: ObservedState) -> list[tuple[str, str]]:
    """(path, kernel name) pairs a closing step needs free; mountpoints have no kernel name."""
    if isinstance(step, Unmount):
        return [(step.mountpoint, "")]
    if isinstance(step, CloseCrypt):
        mapping = observed.dm_named(step.dm_name)
        kname = mapping.kname if mapping else ""
        pairs = [(f"/dev/mapper/{step.dm_name}", kname)]
        return pairs + ([(f"/dev/{kname}", kname)] if kname else [])
    if isinstance(step, DetachLoop | StopRaid):
        return [(step.device, step.device.rpartition("/")[2])]
    if isinstance(step, ExportPool):
        return [(point, "") for point in pool_mountpoints(step.pool, observed)]
    return []


def pool_mountpoints(pool: str, observed: ObservedState) -> list[str]:
    """Where the datasets of ``pool`` are mounted (``zpool export`` unmounts them all)."""
    return [m.mountpoint for m in observed.mounts
            if m.fstype == "zfs" and (m.source == pool or m.source.startswith(pool + "/"))]


def _other_mounts(unmounting: set[str], observed: ObservedState) -> list[str]:
    """The same file system mounted elsewhere too (a bind mount, a container's volume).

    Unmounting one place would succeed and leave the file system in use through the
    other, so the device under it could not be closed: the volume would be half locked.
    """
    reasons = []
    for point in sorted(unmounting):
        entry = observed.mount_at(point)
        if entry is None:
            continue
        reasons += [f"{entry.source} is also mounted at {m.mountpoint} (a bind mount)"
                    for m in observed.mounts if m.devno == entry.devno
                    and m.mountpoint not in unmounting and not m.mountpoint.startswith(
                        tuple(p.rstrip("/") + "/" for p in unmounting))]
    return reasons
