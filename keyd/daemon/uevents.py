"""Raw udev block events -> the closed set of keyd events. Pure (a dict of properties in).

- a stick: a USB (``ID_BUS=usb``) disk or partition carrying a filesystem
  (``ID_FS_USAGE=filesystem`` and an ``ID_FS_TYPE``); added or changed to
  carry one -> :class:`StickAdded`; removed, or changed to carry none ->
  :class:`StickGone`;
- noise, ignored: device-mapper, md, loop, ram/zram, nbd and optical devices,
  and anything not a disk or partition (keyd's own mappings are dm/md/loop, so
  thousands of loop events around an insertion change nothing);
- everything else that appears or goes is a possible member of a volume:
  :class:`MemberAdded` / :class:`MemberRemoved` (they only make volumes
  waiting for RAID members try again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NOISE_PREFIXES = ("dm-", "md", "loop", "ram", "zram", "nbd", "sr", "zd")
_DEVTYPES = ("disk", "partition")


@dataclass(frozen=True)
class StickInfo:
    """A candidate key stick as udev describes it."""

    devnode: str
    fstype: str
    serial: str | None = None
    fs_uuid: str | None = None
    label: str | None = None

    @property
    def key(self) -> str:
        """The identity the backoff and audit use: serial, else filesystem UUID, else device."""
        if self.serial:
            return self.serial
        return f"fs:{self.fs_uuid}" if self.fs_uuid else self.devnode


@dataclass(frozen=True)
class StickAdded:
    """A candidate key stick appeared (or gained a filesystem)."""

    stick: StickInfo


@dataclass(frozen=True)
class StickGone:
    """A stick (or the medium in it) went away."""

    devnode: str
    serial: str | None = None


@dataclass(frozen=True)
class MemberAdded:
    """A block device that may belong to a volume appeared."""

    devnode: str


@dataclass(frozen=True)
class MemberRemoved:
    """A block device that may belong to a volume went away."""

    devnode: str


UEvent = StickAdded | StickGone | MemberAdded | MemberRemoved


def is_noise(props: Mapping[str, str]) -> bool:
    """True for events keyd never acts on (its own dm/md/loop devices among them)."""
    if props.get("SUBSYSTEM", "block") != "block" or props.get("DEVTYPE") not in _DEVTYPES:
        return True
    name = props.get("DEVNAME", "").rpartition("/")[2]
    if not name or name.startswith(NOISE_PREFIXES):
        return True
    return bool(props.get("DM_NAME") or props.get("MD_LEVEL") or props.get("DM_UUID"))


def _stick(props: Mapping[str, str]) -> StickInfo | None:
    if props.get("ID_BUS") != "usb":
        return None
    fstype = props.get("ID_FS_TYPE", "")
    if props.get("ID_FS_USAGE") != "filesystem" or not fstype:
        return None
    return StickInfo(devnode=props["DEVNAME"], fstype=fstype,
                     serial=props.get("ID_SERIAL_SHORT") or props.get("ID_SERIAL") or None,
                     fs_uuid=props.get("ID_FS_UUID") or None,
                     label=props.get("ID_FS_LABEL") or None)


def translate(action: str, props: Mapping[str, str]) -> UEvent | None:
    """The keyd event for one udev event (``action`` add/change/remove...), or None."""
    if is_noise(props):
        return None
    devnode = props["DEVNAME"]
    serial = props.get("ID_SERIAL_SHORT") or props.get("ID_SERIAL") or None
    stick = _stick(props)
    if action in ("add", "change") and stick is not None:
        return StickAdded(stick)
    if action == "remove":
        return StickGone(devnode, serial) if props.get("ID_BUS") == "usb" else MemberRemoved(devnode)
    if action == "change" and props.get("ID_BUS") == "usb":
        return StickGone(devnode, serial)  # the medium went away, or lost its filesystem
    return MemberAdded(devnode) if action in ("add", "change") else None
