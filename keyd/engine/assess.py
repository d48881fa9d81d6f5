"""Where each layer of a volume stands in an observed kernel state. Pure.

For every layer: is it open, does keyd own what is open, which device does it
provide, and is something in the way (a foreign mapping on its device, another
filesystem on its mountpoint, a missing disk)? Planning and ``status`` both
start from this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from keyd.config.model import (
    CryptLayer,
    Layer,
    LoopLayer,
    MountLayer,
    RaidLayer,
    Volume,
    ZfsLayer,
)
from keyd.engine.names import (
    SERVED_FILE,
    dm_name,
    is_helper_of,
    md_name,
    owns_mapping,
    record_key,
    served_dir,
)
from keyd.engine.observed import DmMapping, LoopDevice, MdArray, ObservedState, ZfsPool


@dataclass(frozen=True)
class LayerStatus:
    """One layer's state; ``device`` is the block device it provides (mounts: the mounted one)."""

    name: str
    kind: str
    open: bool = False
    owned: bool = False
    device: str | None = None
    kname: str | None = None
    mountpoint: str | None = None
    degraded: bool = False
    detail: str = ""
    problem: str | None = None
    fix: str | None = None
    pool: ZfsPool | None = None  # zfs layers: the imported pool, with health and vdevs
    missing: bool = False  # its device is not there (yet): it cannot open, but nothing clashes


def assess(volume: Volume, observed: ObservedState) -> dict[str, LayerStatus]:
    """The status of every layer of ``volume``, bottom-up."""
    statuses: dict[str, LayerStatus] = {}
    for layer in volume.layers:
        lower = statuses[layer.below[0]] if layer.below else None
        statuses[layer.name] = _ASSESSORS[layer.kind](volume, layer, observed, lower)
    return statuses


def lower_kname(layer: CryptLayer | MountLayer, observed: ObservedState,
                lower: LayerStatus | None) -> str | None:
    """Kernel name of the device under ``layer``: its configured device or the lower layer's."""
    if layer.device is not None:
        return observed.paths.get(layer.device)
    return lower.kname if lower is not None and lower.open else None


def _raid(volume: Volume, layer: Layer, observed: ObservedState,
          lower: LayerStatus | None) -> LayerStatus:
    assert isinstance(layer, RaidLayer)
    array = observed.md_with_uuid(layer.uuid)
    if array is None:
        found = observed.members_of(layer.uuid)
        detail = f"{len(found.devices)} of {found.expected} members present" if found else ""
        return LayerStatus(layer.name, "raid", detail=detail)
    owned = array.devname.rpartition("/")[2] == md_name(volume.name, layer.name)
    return LayerStatus(layer.name, "raid", open=array.active, owned=owned,
                       device=f"/dev/{array.kname}", kname=array.kname,
                       degraded=array.active and array.degraded > 0, detail=_raid_detail(array))


def _raid_detail(array: MdArray) -> str:
    present = len(array.members)
    if not array.active:
        return f"assembled but not started ({present} of {array.raid_disks} members)"
    parts = [array.level] if array.level else []
    if array.degraded:
        parts.append(f"degraded ({array.raid_disks - array.degraded} of {array.raid_disks})")
    if array.sync_action not in ("idle", ""):
        verb = {"recover": "recovering", "resync": "resyncing"}.get(array.sync_action,
                                                                    array.sync_action)
        parts.append(f"{verb} {_percent(array.sync_completed)}".rstrip())
    return ", ".join(parts)


def _percent(completed: str) -> str:
    done, _, total = completed.partition("/")
    try:
        return f"{100 * int(done) / int(total):.0f}%"
    except (ValueError, ZeroDivisionError):
        return ""


def _crypt(volume: Volume, layer: Layer, observed: ObservedState,
           lower: LayerStatus | None) -> LayerStatus:
    assert isinstance(layer, CryptLayer)
    name = dm_name(volume.name, layer.name)
    base = lower_kname(layer, observed, lower)
    mapping = observed.dm_named(name)
    if mapping is not None:
        return _existing_mapping(layer, name, mapping, observed, base)
    served = observed.loop_for(f"{served_dir(name)}/{SERVED_FILE}")
    if served is not None:
        return _served(layer, name, served, observed, base)
    if layer.device is not None and base is None:
        return LayerStatus(layer.name, "crypt", problem=f"device {layer.device} is not present",
                           fix="connect the disk, or correct device in keyd.toml", missing=True)
    problem = _device_taken(observed, base, name) if base else None
    return LayerStatus(layer.name, "crypt", problem=problem, fix=None if problem is None else
                       "close or unmount it yourself (keyd only touches what it created), "
                       "or fix the layer's device in keyd.toml")


def _existing_mapping(layer: CryptLayer, name: str, mapping: DmMapping,
                      observed: ObservedState, base: str | None) -> LayerStatus:
    if not owns_mapping(mapping, name, layer.type):
        return LayerStatus(layer.name, "crypt", kname=mapping.kname, problem=(
            f"a device-mapper device named {name} exists but was not made by cryptsetup "
            f"for a {layer.type} layer (dm uuid {mapping.uuid or 'empty'})"),
            fix=f"remove it yourself (dmsetup info {name}) or rename the layer")
    status = LayerStatus(layer.name, "crypt", open=True, owned=True, device=f"/dev/mapper/{name}",
                         kname=mapping.kname, detail=layer.type)
    if base is not None and base not in _base_devices(observed, mapping, name):
        return replace(status, problem=f"{name} is open on another device than /dev/{base}",
                       fix=f"lock the volume (or cryptsetup close {name}) and unlock again")
    return status


def _served(layer: CryptLayer, name: str, loop: LoopDevice, observed: ObservedState,
            base: str | None) -> LayerStatus:
    """A layer keyd's userspace crypto serves: its loop device stands for the mapping."""
    status = LayerStatus(layer.name, "crypt", open=True, owned=True, device=f"/dev/{loop.kname}",
                         kname=loop.kname, detail=f"{layer.type}, userspace crypto")
    mount = observed.mount_at(served_dir(name))
    if base is not None and mount is not None and mount.source_kname != base:
        return replace(status, problem=f"{name} is served from another device than /dev/{base}",
                       fix="lock the volume and unlock again")
    return status


def _base_devices(observed: ObservedState, mapping: DmMapping, name: str) -> set[str]:
    found: set[str] = set()
    for slave in mapping.slaves:
        helper = observed.dm_by_kname(slave)
        if helper is not None and is_helper_of(helper, name):
            found |= _base_devices(observed, helper, name)
        else:
            found.add(slave)
    return found


def _device_taken(observed: ObservedState, kname: str, name: str) -> str | None:
    for user in observed.users_of(kname):
        mapping = observed.dm_by_kname(user)
        label = f"device-mapper device {mapping.name}" if mapping else f"md array {user}"
        if mapping is not None and is_helper_of(mapping, name):
            label = f"leftover helper mapping {mapping.name}"
        return f"/dev/{kname} is already in use by {label}, which keyd did not create"
    mounts = observed.mounts_of(kname)
    if mounts:
        return f"/dev/{kname} is mounted at {mounts[0].mountpoint}"
    return None


def _loop(volume: Volume, layer: Layer, observed: ObservedState,
          lower: LayerStatus | None) -> LayerStatus:
    assert isinstance(layer, LoopLayer)
    image = image_path(volume, layer)
    loop = observed.loop_for(image)
    if loop is None:
        return LayerStatus(layer.name, "loop", detail=image)
    return LayerStatus(layer.name, "loop", open=True, owned=True, device=f"/dev/{loop.kname}",
                       kname=loop.kname, detail=image)


def image_path(volume: Volume, layer: LoopLayer) -> str:
    """Absolute path of a loop layer's image (inside the mount layer below it)."""
    lower = volume.layer(layer.below[0])
    assert isinstance(lower, MountLayer)
    return f"{lower.mountpoint}/{layer.image.strip('/')}"


def _mount(volume: Volume, layer: Layer, observed: ObservedState,
           lower: LayerStatus | None) -> LayerStatus:
    assert isinstance(layer, MountLayer)
    base = lower_kname(layer, observed, lower)
    status = LayerStatus(layer.name, "mount", mountpoint=layer.mountpoint)
    if layer.device is not None and base is None:
        return replace(status, problem=f"device {layer.device} is not present",
                       fix="connect the disk, or correct device in keyd.toml", missing=True)
    mounted = observed.mount_at(layer.mountpoint)
    if mounted is not None and base is not None and mounted in observed.mounts_of(base):
        return replace(status, open=True, owned=True, device=f"/dev/{base}", kname=base,
                        detail=mounted.fstype)
    if mounted is not None:
        return replace(status, problem=(f"{layer.mountpoint} already has {mounted.source} "
                                         f"({mounted.fstype}) mounted on it"),
                        fix=f"unmount it yourself (umount {layer.mountpoint}) or pick "
                            "another mountpoint")
    elsewhere = observed.mounts_of(base) if base else ()
    if elsewhere:
        return replace(status, problem=f"/dev/{base} is already mounted at "
                                        f"{elsewhere[0].mountpoint}",
                        fix=f"unmount {elsewhere[0].mountpoint} first")
    return status


def _zfs(volume: Volume, layer: Layer, observed: ObservedState,
         lower: LayerStatus | None) -> LayerStatus:
    assert isinstance(layer, ZfsLayer)
    pool = observed.pool(layer.pool, layer.guid)
    if pool is None:
        return LayerStatus(layer.name, "zfs", detail=f"pool {layer.label} not imported")
    # A side missing since the pool was made (its old path, UNAVAIL) is absent, not foreign.
    foreign = [v.path for v in pool.vdevs if vdev_layer(volume, layer, v.path, observed) is None
               and v.state not in ABSENT_VDEV_STATES]
    if foreign or not pool.vdevs:
        return LayerStatus(layer.name, "zfs", pool=pool, problem=(
            f"a pool {pool.name} (guid {pool.guid}) is imported from devices that are not this "
            f"layer's mappings: {', '.join(foreign) or 'none listed'}"),
            fix=f"export it yourself (zpool export {pool.name}), or set guid = \"...\" in "
                "keyd.toml to name this volume's pool")
    owned = observed.keyd_pools.get(record_key(volume.name, layer.name)) == pool.guid
    scan = f", last scan: {pool.scan}" if pool.scan else ""
    # A pool is no block device: its name stands in (as it does in the unlock's results).
    return LayerStatus(layer.name, "zfs", open=True, owned=owned, device=pool.name,
                       mountpoint=pool.altroot or None,
                       degraded=pool.health != "ONLINE", pool=pool,
                       detail=f"pool {pool.name} {pool.health}{scan}")


# Leaf vdev states of a side zfs cannot use: it is missing, not someone else's device.
ABSENT_VDEV_STATES = ("UNAVAIL", "REMOVED", "FAULTED", "OFFLINE")


def vdev_layer(volume: Volume, layer: ZfsLayer, path: str, observed: ObservedState) -> str | None:
    """The lower layer whose keyd mapping a vdev path names (any /dev spelling), or None."""
    base = path.rpartition("/")[2]
    for name in layer.below:
        mapping = dm_name(volume.name, name)
        found = observed.dm_named(mapping)
        if base in (mapping, f"dm-name-{mapping}") or (found and base == found.kname):
            return name
    return None


_ASSESSORS: Mapping[str, Callable[[Volume, Layer, ObservedState, LayerStatus | None],
                                  LayerStatus]] = {
    "raid": _raid, "crypt": _crypt, "loop": _loop, "mount": _mount, "zfs": _zfs}
