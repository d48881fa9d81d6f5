"""The D-Bus API: org.keyd.Keyd1 at /org/keyd/Keyd1, interface org.keyd.Keyd1.Manager (pydbus).

State-changing methods check the caller's uid themselves (besides the bus
policy file): root, or a member of the configured admin group. Methods run in
the daemon's loop, so they call the core directly; Unlock and Lock return at
once with the new state (usually ``unlocking``/``locking``) and the outcome
follows as a StateChanged signal. See docs/dbus-api.md.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import pwd
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydbus.generic import signal

from keyd.audit.ids import AuditEvent
from keyd.daemon.bus_names import API_VERSION, BUS_NAME, INTERFACE, OBJECT_PATH
from keyd.daemon.key_fd import BadKeyFd, read_key_fd
from keyd.errors import KeydError
from keyd.trust.secret import KeySet, SecretBytes

if TYPE_CHECKING:  # the daemon passes itself in; clients of this module need not load it
    from keyd.daemon.core import Daemon

log = logging.getLogger("keyd.daemon")

INTROSPECTION = f"""
<node>
  <interface name="{INTERFACE}">
    <method name="ListVolumes">
      <arg type="a(sss)" name="volumes" direction="out"/>
    </method>
    <method name="GetVolume">
      <arg type="s" name="volume" direction="in"/>
      <arg type="a{{ss}}" name="properties" direction="out"/>
    </method>
    <method name="Unlock">
      <arg type="s" name="volume" direction="in"/>
      <arg type="h" name="key_fd" direction="in"/>
      <arg type="s" name="state" direction="out"/>
    </method>
    <method name="UnlockWithKeys">
      <arg type="s" name="volume" direction="in"/>
      <arg type="a{{sh}}" name="keys" direction="in"/>
      <arg type="s" name="state" direction="out"/>
    </method>
    <method name="UnlockWithPassphrase">
      <arg type="s" name="volume" direction="in"/>
      <arg type="s" name="passphrase" direction="in"/>
      <arg type="s" name="state" direction="out"/>
    </method>
    <method name="Lock">
      <arg type="s" name="volume" direction="in"/>
      <arg type="s" name="state" direction="out"/>
    </method>
    <method name="PrepareShutdown">
      <arg type="as" name="locking" direction="out"/>
    </method>
    <signal name="StateChanged">
      <arg type="s" name="volume"/>
      <arg type="s" name="state"/>
      <arg type="s" name="detail"/>
    </signal>
    <property name="Version" type="s" access="read"/>
  </interface>
</node>
"""


class AccessDenied(KeydError):
    """The caller may not change volume states."""


class NoSuchVolume(KeydError):
    """The volume is not configured."""


class BadRequest(KeydError):
    """The request cannot be served (no file descriptor, or one that cannot carry a key)."""


# pydbus sends an exception's class name as the D-Bus error name.
AccessDenied.__name__ = "org.keyd.Keyd1.Error.AccessDenied"
NoSuchVolume.__name__ = "org.keyd.Keyd1.Error.NoSuchVolume"
BadRequest.__name__ = "org.keyd.Keyd1.Error.BadRequest"


def may_change(uid: int, admin_group: str | None,
               groups_of: Callable[[int], set[str]]) -> bool:
    """Root may; others only as members of ``admin_group``. Pure but for ``groups_of``."""
    if uid == 0:
        return True
    return admin_group is not None and admin_group in groups_of(uid)


def unix_groups(uid: int) -> set[str]:
    """Names of the groups of user ``uid`` (primary and supplementary)."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    names = {g.gr_name for g in grp.getgrall() if user.pw_name in g.gr_mem}
    with contextlib.suppress(KeyError):
        names.add(grp.getgrgid(user.pw_gid).gr_name)
    return names


class ManagerService:
    """The published object; pydbus calls its methods in the daemon's loop."""

    dbus = INTROSPECTION
    StateChanged = signal()

    def __init__(self, daemon: Daemon, groups_of: Callable[[int], set[str]] = unix_groups) -> None:
        self.daemon = daemon
        self.groups_of = groups_of

    @property
    def Version(self) -> str:
        """The API version."""
        return API_VERSION

    def ListVolumes(self) -> list[tuple[str, str, str]]:
        """(name, state, detail) of every configured volume."""
        return [(name, *self.daemon.shown[name]) for name in self.daemon.volumes]

    def GetVolume(self, volume: str) -> dict[str, str]:
        """The daemon's view of one volume."""
        self._volume(volume)
        return self.daemon.volume_info(volume)

    def Unlock(self, volume: str, key_fd: int, dbus_context: Any = None) -> str:
        """Unlock with the key read from the passed file descriptor (for every key name)."""
        return self.UnlockWithKeys(volume, {"": key_fd}, dbus_context)

    def UnlockWithKeys(self, volume: str, keys: dict[str, int], dbus_context: Any = None) -> str:
        """Unlock with one key per key name, each read from its file descriptor.

        The name "" stands for every key name not given one of its own.
        """
        uid = self._authorize(dbus_context, volume)
        names = self.daemon.volumes[volume].key_names
        unknown = sorted(name for name in keys if name and name not in names)
        if not keys or unknown:
            raise BadRequest(f"volume {volume} has no key named {unknown[0]!r}" if unknown
                             else "no key came with the call",
                             fix=f"its key names are: {', '.join(names) or 'none'}")
        fd_list = dbus_context._mi.get_message().get_unix_fd_list()
        read: dict[str | None, SecretBytes] = {}
        try:
            for name, index in sorted(keys.items()):
                read[name or None] = _read_fd(fd_list, index)
        except BaseException:
            KeySet(read).wipe()
            raise
        return self.daemon.request_unlock(volume, KeySet(read), f"D-Bus request by uid {uid}")

    def UnlockWithPassphrase(self, volume: str, passphrase: str,
                             dbus_context: Any = None) -> str:
        """Unlock with a passphrase."""
        uid = self._authorize(dbus_context, volume)
        return self.daemon.request_unlock(
            volume, KeySet.single(SecretBytes(passphrase.encode("utf-8"))),
            f"D-Bus request by uid {uid}")

    def Lock(self, volume: str, dbus_context: Any = None) -> str:
        """Lock the volume (services are stopped first; busy volumes stay unlocked)."""
        uid = self._authorize(dbus_context, volume)
        return self.daemon.request_lock(volume, f"D-Bus request by uid {uid}")

    def PrepareShutdown(self, dbus_context: Any = None) -> list[str]:
        """The system goes down: lock every open volume and open nothing any more (root only,
        keyd-shutdown.service); returns the volumes being locked."""
        uid = int(dbus_context.bus.dbus.GetConnectionUnixUser(dbus_context.sender))
        if uid != 0:
            self.daemon.audit(None, AuditEvent.DBUS_DENIED,
                              f"PrepareShutdown by uid {uid} denied", result="denied",
                              reason=f"uid {uid}")
            raise AccessDenied(f"uid {uid} may not call PrepareShutdown",
                               fix="only root (keyd-shutdown.service) prepares the shutdown")
        return self.daemon.request_shutdown(f"system shutdown (uid {uid})")

    def state_changed(self, volume: str, state: str, detail: str) -> None:
        """The core's Announcer: emit StateChanged."""
        self.StateChanged(volume, state, detail)

    def _volume(self, volume: str) -> None:
        if volume not in self.daemon.volumes:
            known = ", ".join(self.daemon.volumes) or "none"
            raise NoSuchVolume(f"no volume named {volume!r} (configured: {known})")

    def _authorize(self, context: Any, volume: str) -> int:
        self._volume(volume)
        uid = int(context.bus.dbus.GetConnectionUnixUser(context.sender))
        if not may_change(uid, self.daemon.settings.admin_group, self.groups_of):
            self.daemon.audit(volume, AuditEvent.DBUS_DENIED,
                              f"{context.method_name} by uid {uid} denied",
                              result="denied", reason=f"uid {uid}")
            raise AccessDenied(f"uid {uid} may not {context.method_name} volumes",
                               fix="run as root or as a member of the keyd admin group")
        return uid


def _read_fd(fd_list: Any, index: int) -> SecretBytes:
    """The key in the call's file descriptor number ``index``."""
    if fd_list is None or not 0 <= index < fd_list.get_length():
        raise BadRequest("a key's file descriptor did not come with the call",
                         fix="pass each key as a UnixFD (type h) with the call")
    try:
        return read_key_fd(fd_list.get(index))
    except BadKeyFd as exc:
        raise BadRequest(exc.message, fix=exc.fix) from None


def publish(bus: Any, service: ManagerService) -> Any:
    """Own BUS_NAME on ``bus`` and export ``service`` at OBJECT_PATH; returns the publication."""
    return bus.publish(BUS_NAME, (OBJECT_PATH, service))
