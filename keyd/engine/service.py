"""The engine's front door: unlock, lock and status of configured volumes.

keydctl's direct mode uses it today; the daemon (D-Bus) will use the same
object. Each unlock/lock holds the volume's lock file for its whole run,
observes the kernel, plans, and executes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from keyd.config.model import CryptLayer, Volume
from keyd.engine.errors import WrongVolume
from keyd.engine.executor import Executor, KeySource, Progress, QuietProgress
from keyd.engine.keys import KeyInventory, NoKeys, SignedFor
from keyd.engine.lockfile import DEFAULT_RUN_DIR, VolumeLock
from keyd.engine.observe import Observer
from keyd.engine.observed import ObservedState
from keyd.engine.plan import Plan, mend_only, plan_lock, plan_unlock
from keyd.engine.pool_records import PoolRecords
from keyd.engine.ports import HolderPort, ServicePort, Storage
from keyd.engine.status import VolumeReport, report
from keyd.engine.volume_uuid import wrong_volume


@dataclass(frozen=True)
class Outcome:
    """What an unlock or lock did: ``changed`` is False when there was nothing to do.

    ``degraded`` says what an unlock accepted (a zfs pool imported DEGRADED), one line each;
    ``mended`` what it brought back into a volume that was open degraded.
    """

    volume: str
    changed: bool
    devices: Mapping[str, str] = field(default_factory=dict)
    degraded: tuple[str, ...] = ()
    mended: tuple[str, ...] = ()


@dataclass
class Engine:
    """Unlocks, locks and reports volumes through the injected observer and adapters."""

    observer: Observer
    storage: Storage
    holders: HolderPort
    services: ServicePort
    run_dir: str = DEFAULT_RUN_DIR
    lock_timeout: float = 30.0
    progress: Progress = field(default_factory=QuietProgress)
    sleep: Callable[[float], None] = time.sleep

    def _executor(self, keys: KeySource) -> Executor:
        return Executor(self.storage, keys, self.observer, self.holders, self.services,
                        self.progress, sleep=self.sleep, records=PoolRecords(self.run_dir))

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        """The kernel's state plus keyd's records of the pools it imported."""
        observed = self.observer.observe(volumes, members=members)
        if not observed.pools:
            return observed
        return replace(observed, keyd_pools=PoolRecords(self.run_dir).load())

    def unlock(self, volume: Volume, keys: KeySource, *,
               start_services: bool = False) -> Outcome:
        """Open what is not open yet; on failure everything this run opened is closed again."""
        with VolumeLock(self.run_dir, volume.name, timeout=self.lock_timeout):
            plan = plan_unlock(volume, self.observe([volume]), _available(volume, keys))
            outcome = self._run(volume, plan, keys)
            if outcome.changed and isinstance(keys, SignedFor) and keys.volume_uuid:
                self._check_volume(volume, keys.volume_uuid)
            if start_services:
                self.services.start(volume.services)
        return outcome

    def _check_volume(self, volume: Volume, claimed: str) -> None:
        """Close the volume again, before anything uses it, if it is not the one the key's
        bundle was signed for."""
        observed = self.observe([volume], members=False)
        why = wrong_volume(claimed, volume, observed)
        if why is None:
            return
        self._executor(NoKeys()).lock(volume, plan_lock(volume, observed), observed)
        raise WrongVolume(f"{why}: closed it again", fix="use the stick made for this volume, "
                          "or re-enroll its bundle (keydctl enroll --device)")

    def mend(self, volume: Volume, keys: KeySource) -> Outcome:
        """Bring back the sides an open, degraded volume lacks whose disks are here now
        (``keys`` for their crypt layers); never opens anything else."""
        with VolumeLock(self.run_dir, volume.name, timeout=self.lock_timeout):
            plan = plan_unlock(volume, self.observe([volume]), _available(volume, keys))
            return self._run(volume, mend_only(plan), keys)

    def _run(self, volume: Volume, plan: Plan, keys: KeySource) -> Outcome:
        """Execute ``plan``; ``changed`` only if it opened more than the missing sides."""
        if not plan.steps:
            return Outcome(volume.name, False, dict(plan.devices))
        executor = self._executor(keys)
        devices = executor.unlock(volume, plan)
        return Outcome(volume.name, mend_only(plan).steps != plan.steps, devices,
                       tuple(executor.degraded), tuple(executor.mended))

    def lock(self, volume: Volume, *, force: bool = False, quiesce: bool = False) -> Outcome:
        """Close what keyd opened, unless something still uses it (``force`` stops services;
        ``quiesce``, at shutdown, flushes a busy volume's file systems: Executor.lock)."""
        with VolumeLock(self.run_dir, volume.name, timeout=self.lock_timeout):
            observed = self.observe([volume], members=False)
            plan = plan_lock(volume, observed)
            if plan.steps:
                self._executor(NoKeys()).lock(volume, plan, observed, force=force,
                                              quiesce=quiesce)
        return Outcome(volume.name, bool(plan.steps))

    def status(self, volumes: Sequence[Volume]) -> list[VolumeReport]:
        """Each volume's state, read from the kernel now."""
        observed = self.observe(volumes, members=False)
        return [report(volume, observed) for volume in volumes]


def _available(volume: Volume, keys: KeySource) -> set[str] | None:
    """The key names ``keys`` has, when it can tell (None: assume every key)."""
    if not isinstance(keys, KeyInventory):
        return None
    return {layer.key for layer in volume.layers
            if isinstance(layer, CryptLayer) and keys.has(layer.key)}
