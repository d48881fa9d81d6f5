"""keydctl's side of the D-Bus API: talk to a running keyd, or say there is none.

``connect()`` returns None when no daemon owns ``org.keyd.Keyd1`` (or there is
no system bus), so keydctl falls back to direct mode. Keys go to the daemon in
a memfd passed as a UnixFD, never in the message body.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from gi.repository import Gio, GLib

from keyd.daemon.bus_names import BUS_NAME, INTERFACE, OBJECT_PATH
from keyd.errors import KeydError

BusFactory = Callable[[], Any]
FINAL_STATES = frozenset({"unlocked", "locked", "failed", "waiting-for-key",
                          "waiting-for-members"})
CALL_TIMEOUT_MS = 30_000
_REMOTE = "GDBus.Error:"


class DaemonError(KeydError):
    """keyd refused or failed a request; the message is the daemon's."""


class DaemonAccessDenied(DaemonError):
    """The caller may not change volume states (keyd or the bus policy said no)."""

    exit_code = 7


class DaemonNoSuchVolume(DaemonError):
    """The daemon has no such volume."""

    exit_code = 3


class DaemonBadRequest(DaemonError):
    """The request was malformed."""

    exit_code = 2


class DaemonKeyRejected(DaemonError):
    """The daemon tried the key and it did not open the volume."""

    exit_code = 6


class DaemonBusy(DaemonError):
    """The daemon could not lock the volume: processes still use it."""

    exit_code = 5


_BUS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"  # refused by the bus policy
_ERRORS: dict[str, type[DaemonError]] = {
    "org.keyd.Keyd1.Error.AccessDenied": DaemonAccessDenied,
    _BUS_DENIED: DaemonAccessDenied,
    "org.keyd.Keyd1.Error.NoSuchVolume": DaemonNoSuchVolume,
    "org.keyd.Keyd1.Error.BadRequest": DaemonBadRequest,
}


def system_bus() -> Any:
    """The system bus (pydbus)."""
    import pydbus  # noqa: PLC0415 (only when a bus is actually wanted)
    return pydbus.SystemBus()


def bus_at(address: str) -> BusFactory:
    """A bus factory for a private bus (tests, the lab)."""
    def factory() -> Any:
        import pydbus  # noqa: PLC0415
        return pydbus.connect(address)
    return factory


def translate_error(error: Exception, method: str = "") -> KeydError:
    """A D-Bus error ("GDBus.Error:NAME: message") as a KeydError with the daemon's message."""
    text = str(getattr(error, "message", None) or error)
    name = ""
    if text.startswith(_REMOTE):
        name, _, text = text[len(_REMOTE):].partition(": ")
    cls = _ERRORS.get(name, DaemonError)
    lines = text.splitlines() or ["keyd failed the request"]
    # keyd's errors travel as user_message() text: the first line, then "  fix: ...".
    fix = next((line.strip()[len("fix: "):] for line in lines[1:]
                if line.strip().startswith("fix: ")), None)
    first = lines[0]
    if name == _BUS_DENIED:  # the bus's own rejection reads "Rejected send message, ..."
        first = f"keyd's D-Bus policy does not let uid {os.getuid()} call {method or 'this'}"
    if cls is DaemonAccessDenied:
        fix = "run as root or as a member of keyd's admin group"
    return cls(first, fix=fix)


def _memfd_with(key: bytes | bytearray) -> int:
    """A memfd holding ``key``, sealed so that it cannot change while keyd reads it."""
    fd = os.memfd_create("keyd-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(key)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class KeydClient:
    """A connection to the running daemon."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.proxy = bus.get(BUS_NAME, OBJECT_PATH)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.proxy, method)(*args)
        except GLib.Error as exc:
            raise translate_error(exc, method) from None

    def list_volumes(self) -> list[tuple[str, str, str]]:
        """(name, state, detail) per volume."""
        return [(str(a), str(b), str(c)) for a, b, c in self._call("ListVolumes")]

    def get_volume(self, volume: str) -> dict[str, str]:
        """The daemon's properties of one volume."""
        return dict(self._call("GetVolume", volume))

    def lock(self, volume: str) -> str:
        """Ask for a lock; returns the state right after (see :meth:`wait`)."""
        return str(self._call("Lock", volume))

    def prepare_shutdown(self) -> list[str]:
        """Have keyd lock every open volume for the shutdown; the volumes it is locking."""
        return [str(name) for name in self._call("PrepareShutdown")]

    def unlock_passphrase(self, volume: str, passphrase: str) -> str:
        """Unlock with a passphrase."""
        return str(self._call("UnlockWithPassphrase", volume, passphrase))

    def unlock_key(self, volume: str, key: bytes | bytearray) -> str:
        """Unlock with one key for every key name (see :meth:`unlock_keys`)."""
        return self.unlock_keys(volume, {"": key})

    def unlock_keys(self, volume: str, keys: Mapping[str, bytes | bytearray]) -> str:
        """Unlock with key bytes by key name ("" for every other name), each handed over in a
        sealed memfd (UnixFD), never in the message."""
        names = sorted(keys)
        fds: list[int] = []
        try:
            for name in names:
                fds.append(_memfd_with(keys[name]))
            fd_list = Gio.UnixFDList.new_from_array([os.dup(fd) for fd in fds])
            argument = GLib.Variant("(sa{sh})", (volume, {n: i for i, n in enumerate(names)}))
            reply, _ = self.bus.con.call_with_unix_fd_list_sync(
                BUS_NAME, OBJECT_PATH, INTERFACE, "UnlockWithKeys", argument,
                GLib.VariantType.new("(s)"), Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, fd_list,
                None)
        except GLib.Error as exc:
            raise translate_error(exc, "UnlockWithKeys") from None
        finally:
            for fd in fds:
                os.close(fd)
        return str(reply.unpack()[0])

    def wait(self, volume: str, *, until: Iterable[str] = FINAL_STATES,
             timeout: float = 300.0,
             done: Callable[[str, str], bool] | None = None) -> tuple[str, str]:
        """Wait until the volume's (state, detail) is in ``until`` (or ``done`` says so)."""
        wanted = set(until)
        finished = done or (lambda state, _detail: state in wanted)
        seen: list[tuple[str, str]] = []
        subscription = self.proxy.StateChanged.connect(
            lambda name, state, detail: seen.append((state, detail)) if name == volume else None)
        try:
            last = self._current(volume)
            deadline = time.monotonic() + timeout
            context = GLib.MainContext.default()
            while not finished(*last):
                if seen:
                    last = seen.pop(0)
                    continue
                if time.monotonic() >= deadline:
                    raise DaemonError(f"volume {volume} is still {last[0]} after {timeout:g} s",
                                      fix=f"see `keydctl audit --volume {volume}`")
                _iterate(context, deadline)
            return last
        finally:
            subscription.disconnect()

    def _current(self, volume: str) -> tuple[str, str]:
        info = self.get_volume(volume)
        detail = info.get("detail", "")
        if info.get("key_timed_out") == "true" and not detail.startswith("key-timeout"):
            detail = f"key-timeout: dependents {info.get('dependents', 'skip')}"
        return info["state"], detail


def _iterate(context: Any, deadline: float) -> None:
    """Run the main context once, waking up by the deadline at the latest."""
    wake = GLib.timeout_add(max(1, int((deadline - time.monotonic()) * 1000)), lambda: False)
    context.iteration(True)
    source = context.find_source_by_id(wake)
    if source is not None and not source.is_destroyed():
        source.destroy()


def connect(bus_factory: BusFactory = system_bus) -> KeydClient | None:
    """A client if keyd is running; None if it is not (or there is no bus): use direct mode."""
    try:
        bus = bus_factory()
        if not bus.dbus.NameHasOwner(BUS_NAME):
            return None
        return KeydClient(bus)
    except GLib.Error:
        return None


def choose(direct: bool, bus_factory: BusFactory = system_bus) -> KeydClient | None:
    """The daemon to go through, or None for direct mode (``--direct``, or no keyd running)."""
    return None if direct else connect(bus_factory)


def unlock_outcome(volume: str, state: str, detail: str) -> str:
    """keydctl's verdict on where an unlock through the daemon ended; raises on failure."""
    if state == "unlocked":
        return f"volume {volume} unlocked"
    if detail == "wrong key":
        raise DaemonKeyRejected(f"wrong key for volume {volume}",
                                fix=f"see `keydctl audit --volume {volume}`")
    if state == "waiting-for-members":
        raise DaemonError(f"volume {volume}: RAID members or devices are missing; keyd keeps "
                          "the key and unlocks when they appear",
                          fix="connect the missing disks (see `keydctl status`)")
    raise DaemonError(f"volume {volume} was not unlocked ({state}): {detail or 'no reason given'}",
                      fix=f"see `keydctl audit --volume {volume}`")


def lock_outcome(volume: str, state: str, detail: str) -> str:
    """keydctl's verdict on where a lock through the daemon ended; raises on failure."""
    if state == "locked":
        return f"volume {volume} locked"
    if state == "unlocked" and "busy" in detail:
        raise DaemonBusy(f"volume {volume} is busy: {detail}",
                         fix="stop those processes; keyd never kills processes")
    raise DaemonError(f"volume {volume} was not locked ({state}): {detail or 'no reason given'}",
                      fix=f"see `keydctl audit --volume {volume}`")


class DaemonLink(Protocol):
    """What keydctl needs of a connection to keyd (:class:`KeydClient`; test doubles in unit tests)."""

    def get_volume(self, volume: str) -> dict[str, str]:
        """See KeydClient."""

    def lock(self, volume: str) -> str:
        """See KeydClient."""

    def prepare_shutdown(self) -> list[str]:
        """See KeydClient."""

    def unlock_keys(self, volume: str, keys: Mapping[str, bytes | bytearray]) -> str:
        """See KeydClient."""

    def wait(self, volume: str, *, until: Iterable[str] = FINAL_STATES,
             timeout: float = 300.0,
             done: Callable[[str, str], bool] | None = None) -> tuple[str, str]:
        """See KeydClient."""


def remote_unlock(client: DaemonLink, volume: str, keys: Mapping[str, bytes | bytearray], *,
                  timeout: float = 300.0) -> str:
    """Unlock through the daemon with keys by key name ("" for every other name) and wait
    for the outcome; returns the message to print."""
    if not keys:
        raise DaemonError("no key given", fix="pass --key-file or --passphrase")
    client.unlock_keys(volume, keys)
    return unlock_outcome(volume, *client.wait(volume, timeout=timeout, until=FINAL_STATES))


def remote_lock(client: DaemonLink, volume: str, *, timeout: float = 300.0) -> str:
    """Lock through the daemon and wait for the outcome; returns the message to print."""
    client.lock(volume)
    return lock_outcome(volume, *client.wait(volume, timeout=timeout,
                                             until={"locked", "unlocked", "failed"}))
