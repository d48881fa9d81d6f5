"""The blocking work the daemon hands to worker threads, each turned into a machine event.

Each function catches everything (a worker must always report back) and maps
keyd's error tree onto the machine's few failure kinds. Messages use
:func:`keyd.errors.user_message`, which never contains key bytes.
"""

from __future__ import annotations

import logging
import time

from keyd.config.model import CryptLayer, Volume
from keyd.daemon import events as ev
from keyd.daemon.keystore import KeyStore
from keyd.daemon.ports import PassphraseAsker, VolumeEngine
from keyd.engine.errors import DegradedRefused, KeyRejected, StorageError, VolumeBusy, VolumeLocked
from keyd.engine.keys import MappingKeys
from keyd.errors import KeydError, ProgramError, user_message
from keyd.trust.errors import TrustError

log = logging.getLogger("keyd.daemon")


def reason_code(error: BaseException) -> str:
    """A stable code for an engine failure (KEYD_REASON)."""
    if isinstance(error, TrustError):
        return error.reason.value
    for kind, code in ((DegradedRefused, "DEGRADED_REFUSED"), (KeyRejected, "WRONG_KEY"),
                       (VolumeBusy, "BUSY"), (VolumeLocked, "VOLUME_LOCKED"),
                       (ProgramError, "PROGRAM_FAILED"), (StorageError, "STORAGE_ERROR"),
                       (KeydError, "ERROR")):
        if isinstance(error, kind):
            return code
    return "INTERNAL_ERROR"


def device_missing(error: StorageError) -> bool:
    """True when the stack cannot open because a configured device is not there (yet).

    The engine says so only in its message ("device ... is not present"); a dedicated
    error class in keyd.engine would be sturdier.
    """
    return "is not present" in error.message


def key_names(volume: Volume) -> list[str]:
    """The key names the volume's crypt layers ask for."""
    return list(dict.fromkeys(layer.key for layer in volume.layers
                              if isinstance(layer, CryptLayer)))


def unlock(engine: VolumeEngine, volume: Volume, store: KeyStore, ref: str) -> ev.Event:
    """Open ``volume`` with the key behind ``ref`` (one bundle key serves each key name)."""
    started = time.monotonic()
    try:
        secret = store.get(ref).secret
        keys = MappingKeys({name: secret.buffer for name in key_names(volume)})
        outcome = engine.unlock(volume, keys)
    except DegradedRefused as exc:
        return ev.UnlockFailed("members", reason_code(exc), user_message(exc))
    except StorageError as exc:
        if device_missing(exc):  # disks still appearing at boot: wait for them like members
            return ev.UnlockFailed("members", "DEVICE_MISSING", user_message(exc))
        return ev.UnlockFailed("error", reason_code(exc), user_message(exc))
    except KeyRejected as exc:
        return ev.UnlockFailed("key", reason_code(exc), user_message(exc))
    except Exception as exc:  # a worker must always report back
        if not isinstance(exc, KeydError):
            log.exception("unlock of %s failed unexpectedly", volume.name)
        return ev.UnlockFailed("error", reason_code(exc), user_message(exc))
    return ev.UnlockSucceeded(time.monotonic() - started, outcome.changed, outcome.degraded)


def lock(engine: VolumeEngine, volume: Volume) -> ev.Event:
    """Close ``volume``; busy is its own event (nothing is ever killed)."""
    started = time.monotonic()
    try:
        engine.lock(volume)
    except VolumeBusy as exc:
        holders = ", ".join(str(h) for h in exc.holders[:5]) or "; ".join(exc.reasons[:3])
        return ev.LockBusy(holders or "in use")
    except Exception as exc:  # a worker must always report back
        if not isinstance(exc, KeydError):
            log.exception("lock of %s failed unexpectedly", volume.name)
        return ev.LockFailed(reason_code(exc), user_message(exc))
    return ev.LockSucceeded(time.monotonic() - started)


def ask(asker: PassphraseAsker, store: KeyStore, volume: str, timeout: float) -> ev.Event:
    """Ask for the passphrase; a reply becomes a key handle."""
    try:
        secret = asker.ask(volume, timeout)
    except Exception as exc:  # a worker must always report back
        return ev.PassphraseUnavailable(user_message(exc).splitlines()[0])
    if secret is None:
        return ev.PassphraseUnavailable("no answer")
    return ev.KeyArrived(store.put(secret), "passphrase")
