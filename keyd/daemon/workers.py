"""The blocking work the daemon hands to worker threads, each turned into an event.

Each function catches everything (a worker must always report back) and maps
keyd's error tree onto the few failure kinds the daemon's facts know. Messages
use :func:`keyd.errors.user_message`, which never contains key bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from keyd.config.model import RaidLayer, Volume, ZfsLayer
from keyd.daemon import events as ev
from keyd.daemon.keystore import KeyStore
from keyd.daemon.ports import PassphraseAsker, UnitManager, VolumeEngine
from keyd.engine.errors import (
    DegradedRefused,
    DevicesMissing,
    KeyRejected,
    StorageError,
    VolumeBusy,
    VolumeLocked,
    WrongVolume,
)
from keyd.engine.keys import MappingKeys
from keyd.engine.status import VolumeReport
from keyd.errors import KeydError, ProgramError, user_message
from keyd.trust.errors import TrustError
from keyd.trust.secret import KeySet

log = logging.getLogger("keyd.daemon")

# How long a lock waits for the volume's services to stop (systemd's DefaultTimeoutStopSec).
SERVICE_STOP_WAIT = 90.0


def reason_code(error: BaseException) -> str:
    """A stable code for an engine failure (KEYD_REASON)."""
    if isinstance(error, TrustError):
        return error.reason.value
    for kind, code in ((DegradedRefused, "DEGRADED_REFUSED"), (WrongVolume, "WRONG_VOLUME"),
                       (KeyRejected, "WRONG_KEY"),
                       (VolumeBusy, "BUSY"), (VolumeLocked, "VOLUME_LOCKED"),
                       (ProgramError, "PROGRAM_FAILED"), (StorageError, "STORAGE_ERROR"),
                       (KeydError, "ERROR")):
        if isinstance(error, kind):
            return code
    return "INTERNAL_ERROR"


def observed(report: VolumeReport) -> ev.Observed:
    """The start-up event for one volume's report."""
    kind = observed_kind(report)
    return ev.Observed(kind, degraded=kind == "unlocked" and report.degraded)


def observed_kind(report: VolumeReport) -> ev.ObservedKind:
    """What is open of a volume, as far as keyd is concerned.

    Only layers keyd opened count towards a half-open stack (a crash to roll back): an
    array that udev's incremental assembly started at boot is simply there.
    """
    if report.state.startswith("unlocked"):
        return "unlocked"
    return "partial" if any(layer.open and layer.owned for layer in report.layers) else "locked"


def _keys(volume: Volume, store: KeyStore, ref: str | None) -> MappingKeys:
    """The keys behind ``ref`` by key name (a name's own secret, else the set's default)."""
    if ref is None:
        return MappingKeys({})
    held = store.get(ref)
    signed = [v.entry.volume_uuid for v in held.report.verdicts] if held.report else []
    return mapping_keys(volume, held.keys, next((uuid for uuid in signed if uuid), None))


def mapping_keys(volume: Volume, keys: KeySet, volume_uuid: str | None) -> MappingKeys:
    """``keys`` as the engine takes them: per key name of ``volume``, with its keyfiles."""
    return MappingKeys({name: secret.buffer for name in volume.key_names
                        if (secret := keys.get(name)) is not None},
                       volume_uuid,
                       {name: [keyfile.buffer for keyfile in files] for name in volume.key_names
                        if (files := keys.keyfiles_for(name))})


def still_degraded(engine: VolumeEngine, volume: Volume) -> bool:
    """Whether the open volume lacks a side now (only arrays and pools can)."""
    if not any(isinstance(layer, RaidLayer | ZfsLayer) for layer in volume.layers):
        return False
    try:
        return observed(engine.status([volume])[0]).degraded
    except Exception:  # cannot tell: assume so, a mend that finds nothing to do is harmless
        return True


def unlock(engine: VolumeEngine, volume: Volume, store: KeyStore, ref: str) -> ev.Event:
    """Open ``volume`` with the key behind ``ref``."""
    started = time.monotonic()
    try:
        outcome = engine.unlock(volume, _keys(volume, store, ref))
    except DevicesMissing as exc:  # disks still appearing at boot: wait for them like members
        return ev.UnlockFailed("members", "DEVICE_MISSING", user_message(exc))
    except DegradedRefused as exc:
        return ev.UnlockFailed("members", reason_code(exc), user_message(exc))
    except StorageError as exc:
        return ev.UnlockFailed("error", reason_code(exc), user_message(exc))
    except KeyRejected as exc:
        return ev.UnlockFailed("key", reason_code(exc), user_message(exc))
    except Exception as exc:  # a worker must always report back
        if not isinstance(exc, KeydError):
            log.exception("unlock of %s failed unexpectedly", volume.name)
        return ev.UnlockFailed("error", reason_code(exc), user_message(exc))
    return ev.UnlockSucceeded(time.monotonic() - started, outcome.changed, outcome.degraded,
                              outcome.mended, still_degraded(engine, volume))


def mend(engine: VolumeEngine, volume: Volume, store: KeyStore, ref: str | None) -> ev.Event:
    """Bring back what the open, degraded ``volume`` lacks and can get now."""
    try:
        outcome = engine.mend(volume, _keys(volume, store, ref))
    except Exception as exc:  # a worker must always report back
        if not isinstance(exc, KeydError):
            log.exception("mending %s failed unexpectedly", volume.name)
        return ev.MendFailed(reason_code(exc), user_message(exc))
    return ev.Mended(outcome.mended, still_degraded(engine, volume))


def lock(engine: VolumeEngine, volume: Volume, units: UnitManager,
         services: Sequence[str] = (), *, quiesce: bool = False) -> ev.Event:
    """Stop ``services`` and wait for them, then close ``volume``; busy is its own event.

    Nothing is ever killed. After any other failure the kernel is read again, so the
    daemon knows what is still open. ``quiesce``: see Engine.lock.
    """
    started = time.monotonic()
    try:
        stop_services(units, services)
        outcome = engine.lock(volume, quiesce=quiesce)
    except VolumeBusy as exc:
        holders = ", ".join(str(h) for h in exc.holders[:5]) or "; ".join(exc.reasons[:3])
        return ev.LockBusy(holders or "in use", "; ".join(exc.quiesced))
    except Exception as exc:  # a worker must always report back
        if not isinstance(exc, KeydError):
            log.exception("lock of %s failed unexpectedly", volume.name)
        return ev.LockFailed(reason_code(exc), user_message(exc), _still_open(engine, volume))
    return ev.LockSucceeded(time.monotonic() - started, outcome.changed)


def stop_services(units: UnitManager, services: Sequence[str]) -> None:
    """Stop each unit and wait until it is down: the unmount must not race its last writes."""
    deadline = time.monotonic() + SERVICE_STOP_WAIT
    for unit in services:
        try:
            units.stop(unit)
        except KeydError as exc:  # unknown or masked: nothing of it runs on the volume
            log.warning("cannot stop %s: %s", unit, user_message(exc))
            continue
        if not units.wait_stopped(unit, max(deadline - time.monotonic(), 0.0)):
            log.warning("%s is still stopping after %.0f s; locking anyway", unit,
                        SERVICE_STOP_WAIT)


def _still_open(engine: VolumeEngine, volume: Volume) -> ev.ObservedKind:
    try:
        return observed_kind(engine.status([volume])[0])
    except Exception:  # cannot tell: assume something is open, so a lock is retried
        return "partial"


def ask(asker: PassphraseAsker, store: KeyStore, volume: Volume, timeout: float) -> ev.Event:
    """Ask for the passphrase of each key name; the replies become one key handle."""
    try:
        keys = asker.ask(volume.name, volume.key_names, timeout)
    except Exception as exc:  # a worker must always report back
        return ev.PassphraseUnavailable(user_message(exc).splitlines()[0])
    if keys is None:
        return ev.PassphraseUnavailable("no answer")
    return ev.KeyArrived(store.put(keys), "passphrase")
