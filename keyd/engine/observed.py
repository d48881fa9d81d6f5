"""What the kernel has right now, as plain data (filled by :mod:`keyd.engine.observe`).

Planning reads only this snapshot, never memory of earlier runs, so keyd finds
its own mappings again after a crash or restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DmMapping:
    """A device-mapper device: ``name`` and ``uuid`` from /sys/block/dm-N/dm/."""

    kname: str
    name: str
    uuid: str
    slaves: tuple[str, ...] = ()


@dataclass(frozen=True)
class MdArray:
    """An md array; ``uuid`` is 32 hex digits, ``devname`` the name it was assembled under."""

    kname: str
    uuid: str
    devname: str = ""
    array_state: str = "clean"
    level: str = ""
    raid_disks: int = 0
    degraded: int = 0
    sync_action: str = "idle"
    sync_completed: str = "none"
    members: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """Started (readable); ``inactive`` arrays only hold their members."""
        return self.array_state not in ("inactive", "clear", "")


@dataclass(frozen=True)
class RaidMembers:
    """Members of an array found on disk (``mdadm --examine --scan``), assembled or not."""

    uuid: str
    expected: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device and the file behind it."""

    kname: str
    backing_file: str
    read_only: bool = False


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (escapes decoded); ``source_kname`` if a block device."""

    mount_id: int
    parent_id: int
    devno: str
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: str = ""
    source_kname: str = ""


@dataclass(frozen=True)
class PoolVdev:
    """A leaf vdev of an imported pool (``zpool status -P``): its path, state and errors."""

    path: str
    state: str
    errors: str = "0 0 0"  # READ WRITE CKSUM


@dataclass(frozen=True)
class ZfsPool:
    """An imported ZFS pool: ``zpool list`` (name, guid, health) joined with ``zpool status``."""

    name: str
    guid: str
    health: str
    vdevs: tuple[PoolVdev, ...] = ()
    scan: str = ""  # the last scrub or resilver, e.g. "scrub repaired 0B in ... with 0 errors"
    altroot: str = ""


@dataclass(frozen=True)
class ObservedState:
    """The kernel's storage state; ``paths`` maps configured device paths to kernel names."""

    dm: tuple[DmMapping, ...] = ()
    md: tuple[MdArray, ...] = ()
    loops: tuple[LoopDevice, ...] = ()
    mounts: tuple[MountEntry, ...] = ()
    raid_members: tuple[RaidMembers, ...] = ()
    paths: Mapping[str, str] = field(default_factory=dict)
    devnos: Mapping[str, str] = field(default_factory=dict)
    sector_sizes: Mapping[str, int] = field(default_factory=dict)
    pools: tuple[ZfsPool, ...] = ()
    # "<volume>/<layer>" -> GUID of the pool keyd imported for that layer (keyd's run records)
    keyd_pools: Mapping[str, str] = field(default_factory=dict)

    def dm_named(self, name: str) -> DmMapping | None:
        """The dm device called ``name``."""
        return next((m for m in self.dm if m.name == name), None)

    def md_with_uuid(self, uuid: str) -> MdArray | None:
        """The md array with this UUID (assembled or inactive)."""
        return next((a for a in self.md if a.uuid == uuid), None)

    def members_of(self, uuid: str) -> RaidMembers | None:
        """The on-disk members found for array ``uuid``."""
        return next((r for r in self.raid_members if r.uuid == uuid), None)

    def loop_for(self, backing_file: str) -> LoopDevice | None:
        """The loop device attached to ``backing_file``."""
        return next((lo for lo in self.loops if lo.backing_file == backing_file), None)

    def mount_at(self, mountpoint: str) -> MountEntry | None:
        """The visible (last) mount at ``mountpoint``."""
        found = [m for m in self.mounts if m.mountpoint == mountpoint]
        return found[-1] if found else None

    def mounts_of(self, kname: str) -> tuple[MountEntry, ...]:
        """Every mount of block device ``kname``."""
        devno = self.devnos.get(kname)
        return tuple(m for m in self.mounts
                     if m.source_kname == kname or (devno is not None and m.devno == devno))

    def mounts_below(self, mountpoint: str) -> tuple[MountEntry, ...]:
        """Mounts strictly inside ``mountpoint``."""
        prefix = mountpoint.rstrip("/") + "/"
        return tuple(m for m in self.mounts if m.mountpoint.startswith(prefix))

    def users_of(self, kname: str) -> tuple[str, ...]:
        """Kernel names of dm devices and md arrays built on ``kname``."""
        dms = [m.kname for m in self.dm if kname in m.slaves]
        mds = [a.kname for a in self.md if kname in a.members]
        return tuple(dms + mds)

    def dm_by_kname(self, kname: str) -> DmMapping | None:
        """The dm device whose kernel name is ``kname`` (dm-N)."""
        return next((m for m in self.dm if m.kname == kname), None)

    def pool(self, name: str | None, guid: str | None) -> ZfsPool | None:
        """The imported pool with this GUID (when given), else with this name."""
        if guid is not None:
            return next((p for p in self.pools if p.guid == guid), None)
        return next((p for p in self.pools if p.name == name), None)

    def md_by_kname(self, kname: str) -> MdArray | None:
        """The md array whose kernel name is ``kname`` (mdN)."""
        return next((a for a in self.md if a.kname == kname), None)
