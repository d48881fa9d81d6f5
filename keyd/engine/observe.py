"""Read the kernel's storage state from sysfs, procfs and mdadm into an ObservedState.

Everything is read below an injected ``root`` (``/`` in production, a temp tree
shaped like /sys, /proc, /dev and /run in unit tests):

- ``sys/class/block/<dev>/dev``: major:minor of every block device
- ``sys/class/block/dm-N/dm/{name,uuid}`` and ``slaves/``: device-mapper devices
- ``sys/class/block/mdN/md/{array_state,level,raid_disks,degraded,sync_action}``: md arrays,
  with their UUID and assembly name from ``run/mdadm/map`` (else ``mdadm --detail --export``)
- ``sys/class/block/loopN/loop/backing_file``: loop devices
- ``proc/self/mountinfo``: mounts (octal escapes such as ``\\040`` decoded)
- ``mdadm --examine --scan --verbose``: members of arrays not yet assembled
- ``zpool list`` / ``zpool status -P``: imported ZFS pools (only when a zfs layer is configured)
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from keyd.config.layers import normalize_uuid
from keyd.config.model import CryptLayer, MountLayer, RaidLayer, Volume, ZfsLayer
from keyd.engine.observed import (
    DmMapping,
    LoopDevice,
    MdArray,
    MountEntry,
    ObservedState,
    RaidMembers,
    ZfsPool,
)
from keyd.engine.zfs_output import LIST_COLUMNS, join_pools, parse_zpool_list, parse_zpool_status
from keyd.errors import ProgramError
from keyd.runner import Runner

_OCTAL = re.compile(r"\\([0-7]{3})")


class Observer(Protocol):
    """Takes a snapshot of the kernel state relevant to some volumes."""

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        """The current state; ``members`` also scans disks for RAID members (slower)."""
        ...


def unescape(text: str) -> str:
    """Decode the octal escapes the kernel uses in mountinfo (space is ``\\040``)."""
    return _OCTAL.sub(lambda match: chr(int(match.group(1), 8)), text)


def parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
    """Parse /proc/self/mountinfo text; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3 or not (fields[0].isdigit() and fields[1].isdigit()):
            continue
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]), devno=fields[2],
            root=unescape(fields[3]), mountpoint=unescape(fields[4]), options=fields[5],
            fstype=fields[sep + 1], source=unescape(fields[sep + 2])))
    return tuple(entries)


def parse_examine_scan(text: str) -> tuple[RaidMembers, ...]:
    """Parse ``mdadm --examine --scan --verbose``: ARRAY lines and their devices= lines."""
    found: list[RaidMembers] = []
    current: dict[str, str] | None = None
    for line in [*text.splitlines(), "ARRAY"]:
        words = line.split()
        if words[:1] == ["ARRAY"]:
            _finish_array(current, found)
            current = dict(word.split("=", 1) for word in words[1:] if "=" in word)
        elif current is not None and line.strip().startswith("devices="):
            current["devices"] = line.strip().partition("=")[2]
    return tuple(found)


def _finish_array(fields: dict[str, str] | None, found: list[RaidMembers]) -> None:
    if fields is None or "container" in fields:
        return
    uuid = normalize_uuid(fields.get("UUID", ""))
    expected = fields.get("num-devices", "0")
    if uuid is None or not expected.isdigit():
        return
    devices = tuple(d for d in fields.get("devices", "").split(",") if d)
    found.append(RaidMembers(uuid, int(expected), devices))


def parse_md_map(text: str) -> dict[str, tuple[str, str]]:
    """Parse mdadm's map file (``md127 1.2 <uuid> /dev/md/name``): kname -> (uuid, devname)."""
    arrays = {}
    for line in text.splitlines():
        words = line.split()
        uuid = normalize_uuid(words[2]) if len(words) >= 3 else None
        if uuid is not None:
            if words[1].startswith("1."):
                uuid = swap_uuid_words(uuid)
            arrays[words[0]] = (uuid, words[3] if len(words) > 3 else "")
    return arrays


def swap_uuid_words(uuid: str) -> str:
    """A 1.x array's UUID as mdadm's map file spells it, and back (the swap is its own inverse)."""
    # The map file prints the UUID as four host-order ints ("%08x"); for 1.x superblocks
    # MD_UUID prints its bytes in order, so on little-endian machines each word reads reversed
    # (lab-verified: map "eaef7d03:..." is MD_UUID "037defea:...").
    if sys.byteorder != "little":
        return uuid
    return "".join(uuid[i + j:i + j + 2] for i in range(0, 32, 8) for j in (6, 4, 2, 0))


def parse_export(text: str) -> dict[str, str]:
    """Parse KEY=VALUE lines (``mdadm --detail --export``)."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


class KernelObserver:
    """The production :class:`Observer`, reading below ``root`` and running mdadm via ``runner``."""

    def __init__(self, runner: Runner, root: str | Path = "/") -> None:
        self.runner = runner
        self.root = Path(root)

    def _read(self, *parts: str, default: str = "") -> str:
        try:
            return self.root.joinpath(*parts).read_text(errors="surrogateescape").strip()
        except OSError:
            return default

    def _list(self, *parts: str) -> tuple[str, ...]:
        try:
            return tuple(sorted(os.listdir(self.root.joinpath(*parts))))
        except OSError:
            return ()

    def block_devices(self) -> dict[str, str]:
        """Every block device's kernel name -> major:minor."""
        names = self._list("sys", "class", "block")
        return {name: self._read("sys", "class", "block", name, "dev") for name in names}

    def resolve(self, path: str) -> str | None:
        """The kernel name a /dev path (or symlink chain) leads to, if it exists."""
        current = path
        for _ in range(40):
            real = self.root / current.lstrip("/")
            if not real.is_symlink():
                break
            target = os.readlink(real)
            current = target if target.startswith("/") else \
                os.path.normpath(os.path.join(os.path.dirname(current), target))
        real = self.root / current.lstrip("/")
        if not current.startswith("/dev/") or not real.exists():
            return None
        name = os.path.basename(current)
        if (self.root / "sys" / "class" / "block" / name).exists():
            return name
        return self._by_device_number(real)

    def _by_device_number(self, node: Path) -> str | None:
        # Without udev, /dev/mapper/NAME is a device node rather than a link to ../dm-N.
        info = node.stat()
        if not stat.S_ISBLK(info.st_mode):
            return None
        devno = f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
        return next((k for k, d in self.block_devices().items() if d == devno), None)

    def sector_size(self, kname: str) -> int | None:
        """Logical block size of ``kname`` (a partition inherits its disk's)."""
        base = self.root / "sys" / "class" / "block" / kname
        for directory in (base, base.resolve().parent):
            text = self._read(str(directory.relative_to(self.root)), "queue",
                              "logical_block_size")
            if text.isdigit():
                return int(text)
        return None

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        """See :class:`Observer`."""
        devnos = self.block_devices()
        paths = {path: kname for path in _configured_paths(volumes)
                 if (kname := self.resolve(path)) is not None}
        mounts = tuple(self._with_kname(m, devnos) for m in self._mounts())
        scan = members and any(isinstance(layer, RaidLayer)
                               for volume in volumes for layer in volume.layers)
        sizes = {kname: size for kname in paths.values()
                 if (size := self.sector_size(kname)) is not None}
        pools = any(isinstance(layer, ZfsLayer) for volume in volumes for layer in volume.layers)
        return ObservedState(
            dm=self._dm(devnos), md=self._md(devnos), loops=self._loops(devnos),
            mounts=mounts, raid_members=self._examine() if scan else (), paths=paths,
            devnos=devnos, sector_sizes=sizes, pools=self._pools() if pools else ())

    def _pools(self) -> tuple[ZfsPool, ...]:
        # Without zpool (or without the zfs module) no pool can be imported: report none,
        # and let the import step (or `keydctl doctor`) say what is missing.
        try:
            listed = self.runner.run(["zpool", "list", "-H", "-p", "-o", LIST_COLUMNS],
                                     timeout=30).stdout
            status = self.runner.run(["zpool", "status", "-P"], timeout=30).stdout
        except ProgramError:
            return ()
        return join_pools(parse_zpool_list(listed), parse_zpool_status(status))

    def _dm(self, devnos: dict[str, str]) -> tuple[DmMapping, ...]:
        return tuple(DmMapping(kname, self._read("sys/class/block", kname, "dm", "name"),
                               self._read("sys/class/block", kname, "dm", "uuid"),
                               self._list("sys/class/block", kname, "slaves"))
                     for kname in devnos if kname.startswith("dm-"))

    def _md(self, devnos: dict[str, str]) -> tuple[MdArray, ...]:
        known = parse_md_map(self._read("run", "mdadm", "map"))
        arrays = []
        for kname in devnos:
            if not (self.root / "sys/class/block" / kname / "md").is_dir():
                continue
            uuid, devname = known.get(kname) or self._detail(kname)
            attrs = {attr: self._read("sys/class/block", kname, "md", attr) for attr in
                     ("array_state", "level", "raid_disks", "degraded", "sync_action",
                      "sync_completed")}
            arrays.append(MdArray(
                kname, uuid, devname, attrs["array_state"], attrs["level"],
                _int(attrs["raid_disks"]), _int(attrs["degraded"]),
                attrs["sync_action"] or "idle", attrs["sync_completed"] or "none",
                self._list("sys/class/block", kname, "slaves")))
        return tuple(arrays)

    def _detail(self, kname: str) -> tuple[str, str]:
        try:
            done = self.runner.run(["mdadm", "--detail", "--export", f"/dev/{kname}"],
                                   timeout=15)
        except ProgramError:
            return "", ""
        fields = parse_export(done.stdout)
        return normalize_uuid(fields.get("MD_UUID", "")) or "", fields.get("MD_DEVNAME", "")

    def _loops(self, devnos: dict[str, str]) -> tuple[LoopDevice, ...]:
        loops = []
        for kname in devnos:
            backing = self._read("sys/class/block", kname, "loop", "backing_file")
            if kname.startswith("loop") and backing:
                backing = backing.removesuffix(" (deleted)")
                loops.append(LoopDevice(kname, backing,
                                        self._read("sys/class/block", kname, "ro") == "1"))
        return tuple(loops)

    def _mounts(self) -> tuple[MountEntry, ...]:
        return parse_mountinfo(self._read("proc", "self", "mountinfo"))

    def _with_kname(self, mount: MountEntry, devnos: dict[str, str]) -> MountEntry:
        kname = self.resolve(mount.source) if mount.source.startswith("/dev/") else None
        if kname is None:
            kname = next((k for k, devno in devnos.items() if devno == mount.devno), "")
        return replace(mount, source_kname=kname)

    def _examine(self) -> tuple[RaidMembers, ...]:
        try:
            done = self.runner.run(["mdadm", "--examine", "--scan", "--verbose"],
                                   timeout=30, ok_codes=(0, 1))
        except ProgramError:
            return ()
        return parse_examine_scan(done.stdout)


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _configured_paths(volumes: Iterable[Volume]) -> set[str]:
    paths: set[str] = set()
    for volume in volumes:
        for layer in volume.layers:
            if isinstance(layer, CryptLayer | MountLayer) and layer.device is not None:
                paths.add(layer.device)
            if isinstance(layer, RaidLayer):
                paths.update(layer.devices)
    return paths
