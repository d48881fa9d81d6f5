"""Pure planning: which steps bring a volume up (bottom-up) or down (top-down).

Layers already open are skipped, so unlocking twice plans nothing, except
that a mirror side missing when the volume was opened degraded is brought back
once its disk is there (a zfs vdev opened and onlined, an md member re-added):
unlocking an open volume mends it. Locking
plans to close only what keyd owns. A layer with something in its way (a
foreign mapping on its device, another filesystem on its mountpoint) stops the
unlock before anything is touched.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from keyd.config.model import (
    CryptLayer,
    Layer,
    LoopLayer,
    MountLayer,
    RaidLayer,
    Volume,
    ZfsLayer,
)
from keyd.engine.assess import LayerStatus, assess, image_path, vdev_layer
from keyd.engine.errors import DegradedRefused, DevicesMissing, StorageError
from keyd.engine.names import dm_name, md_name
from keyd.engine.observed import MdArray, ObservedState


@dataclass(frozen=True)
class LayerRef:
    """The device another layer of the same run provides (known once it is open)."""

    layer: str


Source = str | LayerRef


@dataclass(frozen=True)
class WaitForMembers:
    """Wait up to ``seconds`` for missing RAID members before starting degraded."""

    layer: str
    uuid: str
    expected: int
    seconds: float
    slow = True

    def describe(self) -> str:
        """One line for progress output."""
        return f"waiting up to {self.seconds:g} s for all {self.expected} members of {self.layer}"


@dataclass(frozen=True)
class AssembleRaid:
    """``mdadm --assemble`` the array by UUID; ``run`` allows starting it degraded."""

    layer: str
    uuid: str
    md_name: str
    members: tuple[str, ...]
    run: bool
    slow = True

    def describe(self) -> str:
        """One line for progress output."""
        mode = " (degraded allowed)" if self.run else ""
        return f"assembling {self.layer} as /dev/md/{self.md_name}{mode}"


@dataclass(frozen=True)
class _OnDevice:
    """A step acting on one existing device of a layer."""

    layer: str
    device: str
    slow = False
    verb = ""

    def describe(self) -> str:
        """One line for progress output."""
        return f"{self.verb} {self.layer} ({self.device})"


@dataclass(frozen=True)
class OpenCrypt:
    """``cryptsetup open`` the layer as ``dm_name``; the key is fetched at run time."""

    volume: str
    layer: CryptLayer
    dm_name: str
    source: Source
    slow = True

    def describe(self) -> str:
        """One line for progress output."""
        kdf = " (key derivation may take a while)" if self.layer.type != "plain" else ""
        return f"opening {self.layer.type} layer {self.layer.name} as {self.dm_name}{kdf}"


@dataclass(frozen=True)
class AttachLoop:
    """Attach a loop device to the image file."""

    layer: str
    image: str
    read_only: bool
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"attaching {self.image} to a loop device"


@dataclass(frozen=True)
class Mount:
    """Mount the source device at ``mountpoint``."""

    layer: str
    source: Source
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"mounting {self.layer} ({self.fstype}) at {self.mountpoint}"


@dataclass(frozen=True)
class Unmount:
    """Unmount ``mountpoint``."""

    layer: str
    mountpoint: str
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"unmounting {self.mountpoint}"


@dataclass(frozen=True)
class DetachLoop(_OnDevice):
    """Detach a loop device."""

    verb = "detaching"


@dataclass(frozen=True)
class CloseCrypt:
    """``cryptsetup close`` a mapping keyd owns."""

    layer: str
    dm_name: str
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"closing {self.dm_name}"


@dataclass(frozen=True)
class StopRaid(_OnDevice):
    """``mdadm --stop`` an array keyd assembled."""

    verb = "stopping"


@dataclass(frozen=True)
class ImportPool:
    """``zpool import`` the layer's pool from its crypt mappings; ``missing`` lowers stay shut."""

    volume: str
    layer: ZfsLayer
    missing: tuple[str, ...] = ()
    slow = True

    def describe(self) -> str:
        """One line for progress output."""
        degraded = f" DEGRADED, without {', '.join(self.missing)}" if self.missing else ""
        return f"importing zfs pool {self.layer.label} for {self.layer.name}{degraded}"


@dataclass(frozen=True)
class ExportPool:
    """``zpool export`` a pool keyd imported (zfs unmounts its datasets first)."""

    volume: str
    layer: str
    pool: str
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"exporting zfs pool {self.pool}"


@dataclass(frozen=True)
class OnlineVdev:
    """``zpool online`` a vdev whose crypt layer was shut when the pool was imported."""

    layer: str          # the vdev's crypt layer
    pool: str
    source: LayerRef
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"bringing {self.layer} back into zfs pool {self.pool}"


@dataclass(frozen=True)
class ReAddMember:
    """``mdadm --re-add`` a member that was missing when the array was started."""

    layer: str
    device: str         # the running array
    member: str
    slow = False

    def describe(self) -> str:
        """One line for progress output."""
        return f"re-adding {self.member} to {self.device} ({self.layer})"


Step = (WaitForMembers | AssembleRaid | OpenCrypt | AttachLoop | Mount
        | Unmount | DetachLoop | CloseCrypt | StopRaid | ImportPool | ExportPool
        | OnlineVdev | ReAddMember)


@dataclass(frozen=True)
class Plan:
    """Steps for one volume, plus the devices of layers that were already open."""

    volume: str
    steps: tuple[Step, ...]
    devices: Mapping[str, str] = field(default_factory=dict)


def plan_unlock(volume: Volume, observed: ObservedState,
                available: Collection[str] | None = None) -> Plan:
    """Steps that open every layer of ``volume`` that is not open yet, bottom-up.

    ``available`` names the keys the key source has (None: every key); a zfs layer's
    crypt layer without its key or device is left shut when its degraded policy allows.
    """
    statuses = assess(volume, observed)
    skipped = _zfs_skips(volume, statuses, observed, available)
    steps: list[Step] = []
    devices: dict[str, str] = {}
    for layer in volume.layers:
        status = statuses[layer.name]
        if layer.name in skipped:
            continue
        if status.problem is not None:
            error = DevicesMissing if status.missing else StorageError
            raise error(f"cannot unlock volume {volume.name}: layer {layer.name}: "
                        f"{status.problem}", fix=status.fix)
        if status.open and status.device is not None:
            _check_running_degraded(volume, layer, status)
            devices[layer.name] = status.device
            steps.extend(_mend_steps(layer, status, statuses, observed, skipped))
            continue
        steps.extend(_open_steps(volume, layer, status, observed, skipped))
    return Plan(volume.name, tuple(steps), devices)


def mend_only(plan: Plan) -> Plan:
    """Only the steps that bring late sides back, and none if anything else is shut.

    Mending never opens a volume: one that someone closed (even in part) stays so.
    """
    sides = {step.layer for step in plan.steps if isinstance(step, OnlineVdev)}
    mending = tuple(step for step in plan.steps if isinstance(step, OnlineVdev | ReAddMember)
                    or (isinstance(step, OpenCrypt) and step.layer.name in sides))
    return replace(plan, steps=mending if len(mending) == len(plan.steps) else ())


def _check_running_degraded(volume: Volume, layer: Layer, status: LayerStatus) -> None:
    """An array someone else started degraded (udev, Debian's mdadm-last-resort@.timer)."""
    if (isinstance(layer, RaidLayer) and status.degraded and not status.owned
            and layer.degraded.mode == "never"):
        raise DegradedRefused(
            f"cannot unlock volume {volume.name}: raid layer {layer.name} is already running "
            f"degraded ({status.detail}), started outside keyd, and its degraded policy is never",
            fix="re-add the missing member (mdadm --manage DEVICE --re-add MEMBER) or stop the "
                "array; `systemctl mask mdadm-last-resort@.timer` keeps Debian from starting "
                "arrays degraded")


def _mend_steps(layer: Layer, status: LayerStatus, statuses: Mapping[str, LayerStatus],
                observed: ObservedState, skipped: Mapping[str, str]) -> list[Step]:
    """Bring back the sides of an open, degraded layer whose devices are here now."""
    if not status.degraded:
        return []
    if isinstance(layer, ZfsLayer) and status.pool is not None:
        return [OnlineVdev(name, status.pool.name, LayerRef(name)) for name in layer.below
                if name not in skipped and not statuses[name].open]
    if isinstance(layer, RaidLayer) and status.device is not None:
        array = observed.md_with_uuid(layer.uuid)
        found = observed.members_of(layer.uuid)
        inside = set(array.members) if array is not None else set()
        return [ReAddMember(layer.name, status.device, path) for path in
                (found.devices if found is not None else ())
                if path.rpartition("/")[2] not in inside]
    return []


def vdev_keys(volume: Volume) -> set[str]:
    """Keys of the crypt layers under zfs layers: their absence is the planner's to judge."""
    return {lower.key for layer in volume.layers if isinstance(layer, ZfsLayer)
            for name in layer.below
            if isinstance(lower := volume.layer(name), CryptLayer)}


def _zfs_skips(volume: Volume, statuses: Mapping[str, LayerStatus], observed: ObservedState,
               available: Collection[str] | None) -> dict[str, str]:
    """Lower layers of zfs layers that cannot open (layer -> why); refused unless allowed."""
    skips: dict[str, str] = {}
    for layer in volume.layers:
        if not isinstance(layer, ZfsLayer):
            continue
        if statuses[layer.name].open:  # imported degraded earlier: mended if they can open now
            skips.update(_late_sides_shut(volume, layer, statuses, observed, available))
            continue
        missing = {name: why for name in layer.below
                   if (why := _unavailable(volume.layer(name), statuses[name], observed,
                                           available))}
        if missing and (layer.degraded == "never" or len(missing) == len(layer.below)):
            raise _degraded_refused(volume, layer, missing)
        skips.update(missing)
    return skips


def _late_sides_shut(volume: Volume, layer: ZfsLayer, statuses: Mapping[str, LayerStatus],
                     observed: ObservedState, available: Collection[str] | None) -> dict[str, str]:
    """Shut lower layers of an imported pool that stay shut now (layer -> why).

    zfs knows a missing vdev by the path it last had: only a side keyd had open before
    (its mapping's path) can be onlined into a pool keyd imported; one missing since the
    pool was made is found again by the next import (lock, then unlock).
    """
    status = statuses[layer.name]
    known = {vdev_layer(volume, layer, vdev.path, observed)
             for vdev in (status.pool.vdevs if status.pool else ())}
    shut: dict[str, str] = {}
    for name in layer.below:
        if statuses[name].open:
            continue
        why = ("the pool is imported without it" if not status.owned or name not in known
               else _unavailable(volume.layer(name), statuses[name], observed, available))
        if why:
            shut[name] = why
    return shut


def _unavailable(lower: Layer, status: LayerStatus, observed: ObservedState,
                 available: Collection[str] | None) -> str | None:
    if status.open or not isinstance(lower, CryptLayer):
        return None
    if lower.device is not None and lower.device not in observed.paths:
        return f"device {lower.device} is not present"
    if available is not None and lower.key not in available:
        return f"no key {lower.key!r} was given"
    return None


def _degraded_refused(volume: Volume, layer: ZfsLayer, missing: Mapping[str, str]) -> StorageError:
    why = "; ".join(f"{name}: {reason}" for name, reason in missing.items())
    if len(missing) == len(layer.below):
        return DegradedRefused(f"cannot unlock volume {volume.name}: no vdev layer of zfs layer "
                               f"{layer.name} (pool {layer.label}) can be opened ({why})",
                               fix="give the keys and connect the disks of its crypt layers")
    return DegradedRefused(
        f"cannot unlock volume {volume.name}: zfs layer {layer.name} (pool {layer.label}) would "
        f"be imported without {', '.join(missing)} ({why}) and its degraded policy is never",
        fix="give every key and connect every disk, or set degraded = \"always\" for this "
            "layer in keyd.toml")


def _source(layer: CryptLayer | MountLayer) -> Source:
    return layer.device if layer.device is not None else LayerRef(layer.below[0])


def _open_steps(volume: Volume, layer: Layer, status: LayerStatus,
                observed: ObservedState, skipped: Mapping[str, str]) -> list[Step]:
    if isinstance(layer, ZfsLayer):
        return [ImportPool(volume.name, layer, tuple(n for n in layer.below if n in skipped))]
    if isinstance(layer, RaidLayer):
        return _raid_steps(volume, layer, status, observed)
    if isinstance(layer, CryptLayer):
        return [OpenCrypt(volume.name, layer, dm_name(volume.name, layer.name), _source(layer))]
    if isinstance(layer, LoopLayer):
        return [AttachLoop(layer.name, image_path(volume, layer), layer.read_only)]
    return [Mount(layer.name, _source(layer), layer.mountpoint, layer.fstype, layer.options)]


def _raid_steps(volume: Volume, layer: RaidLayer, status: LayerStatus,
                observed: ObservedState) -> list[Step]:
    array = observed.md_with_uuid(layer.uuid)
    present, expected, devices = _members(layer, observed, array)
    if present == 0:
        raise DevicesMissing(f"cannot unlock volume {volume.name}: no member of raid layer "
                           f"{layer.name} (md UUID {layer.uuid}) was found",
                           fix="connect the disks; `mdadm --examine --scan` lists what is found")
    missing = expected > present
    # An inactive array is what udev's `mdadm --incremental` gathered from hot-plugged
    # members. keyd stops it and assembles the members under its own name, so that it owns
    # the array: rollback and lock stop it again (a started foreign array is left alone).
    take_over: list[Step] = [StopRaid(layer.name, f"/dev/{array.kname}")] if array else []
    start: list[Step] = [*take_over, AssembleRaid(
        layer.name, layer.uuid, md_name(volume.name, layer.name), devices,
        run=missing and layer.degraded.mode != "never")]
    if not missing or layer.degraded.mode == "always":
        return start
    if layer.degraded.mode == "never":
        raise DegradedRefused(
            f"cannot unlock volume {volume.name}: raid layer {layer.name} has {present} of "
            f"{expected} members and its degraded policy is never", fix=(
                "connect the missing disk, or set degraded = \"always\" or "
                "\"after=SECONDS\" for this layer in keyd.toml"))
    return [WaitForMembers(layer.name, layer.uuid, expected, layer.degraded.seconds), *start]


def _members(layer: RaidLayer, observed: ObservedState,
             array: MdArray | None) -> tuple[int, int, tuple[str, ...]]:
    """(present, expected, member paths) for an array, assembled-but-inactive or not."""
    found = observed.members_of(layer.uuid)
    if array is not None:
        present = len(array.members)
        paths = tuple(f"/dev/{member}" for member in array.members)
        return present, array.raid_disks or (found.expected if found else present), paths
    if layer.devices:
        paths = tuple(path for path in layer.devices if path in observed.paths)
        return len(paths), found.expected if found else len(layer.devices), paths
    if found is None:
        return 0, 0, ()
    return len(found.devices), found.expected, found.devices


def plan_lock(volume: Volume, observed: ObservedState) -> Plan:
    """Steps that close, top-down, every open layer of ``volume`` that keyd owns."""
    statuses = assess(volume, observed)
    steps: list[Step] = []
    for layer in reversed(volume.layers):
        status = statuses[layer.name]
        if status.open and status.owned:
            steps.append(_close_step(volume, layer, status))
        elif status.open and isinstance(layer, ZfsLayer) and status.pool is not None:
            # Its vdevs are keyd's mappings, but someone else imported it: keyd never exports
            # a pool it did not import, and cannot close the mappings while it is imported.
            raise StorageError(
                f"cannot lock volume {volume.name}: pool {status.pool.name} on zfs layer "
                f"{layer.name} was not imported by keyd, so keyd does not export it",
                fix=f"export it yourself (zpool export {status.pool.name}), then lock again")
    return Plan(volume.name, tuple(steps))


def _close_step(volume: Volume, layer: Layer, status: LayerStatus) -> Step:
    if isinstance(layer, ZfsLayer):
        return ExportPool(volume.name, layer.name,
                          status.pool.name if status.pool else layer.label)
    if isinstance(layer, MountLayer):
        return Unmount(layer.name, layer.mountpoint)
    if isinstance(layer, LoopLayer):
        return DetachLoop(layer.name, status.device or "")
    if isinstance(layer, CryptLayer):
        return CloseCrypt(layer.name, dm_name(volume.name, layer.name))
    return StopRaid(layer.name, status.device or "")


def undo_step(step: Step, device: str | None) -> Step | None:
    """The step that reverses ``step`` (run during rollback), given the device it produced."""
    if isinstance(step, AssembleRaid):
        return StopRaid(step.layer, device or f"/dev/md/{step.md_name}")
    if isinstance(step, OpenCrypt):
        return CloseCrypt(step.layer.name, step.dm_name)
    if isinstance(step, AttachLoop) and device is not None:
        return DetachLoop(step.layer, device)
    if isinstance(step, Mount):
        return Unmount(step.layer, step.mountpoint)
    if isinstance(step, ImportPool):
        return ExportPool(step.volume, step.layer.name, device or step.layer.label)
    # Waiting changes nothing; a started array that udev had assembled is left running;
    # a side brought back stays (the rollback closes its crypt layer, which zfs then faults).
    return None
