"""``keydctl status``: each volume's state and layers, as a table or as JSON. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from keyd.config.model import Volume
from keyd.engine.assess import LayerStatus, assess
from keyd.engine.names import dm_name
from keyd.engine.observed import ObservedState, ZfsPool


@dataclass(frozen=True)
class VolumeReport:
    """A volume: ``unlocked`` (all layers open), ``locked`` (none), ``partial`` or ``conflict``."""

    name: str
    state: str
    layers: tuple[LayerStatus, ...]
    services: tuple[str, ...]

    @property
    def degraded(self) -> bool:
        """A layer lacks a side (an array's member, a pool's vdev): `` (degraded)`` in state."""
        return any(status.degraded for status in self.layers)


def report(volume: Volume, observed: ObservedState) -> VolumeReport:
    """Summarise ``volume`` in ``observed``; layers top-down, as people read a stack."""
    statuses = tuple(reversed(assess(volume, observed).values()))
    open_count = sum(status.open for status in statuses)
    # A vdev layer left shut under an imported (degraded) pool does not make it "partial".
    spared = sum(not status.open for status in statuses
                 if any(status.name in volume.layer(s.name).below
                        for s in statuses if s.kind == "zfs" and s.open))
    # A disk that is not there leaves the volume locked; only a clash is a conflict.
    if any(status.problem and not status.missing for status in statuses):
        state = "conflict"
    elif open_count + spared == len(statuses) and open_count:
        state = "unlocked"
    else:
        state = "locked" if open_count == 0 else "partial"
    summary = VolumeReport(volume.name, state, statuses, volume.services)
    return replace(summary, state=state + " (degraded)") if summary.degraded else summary


def _layer_state(status: LayerStatus) -> str:
    if status.missing:
        return "missing"
    if status.problem:
        return "conflict"
    if status.open:
        return "open" if status.owned else "open (not keyd's)"
    return "closed"


DaemonView = Mapping[str, tuple[str, str]]  # volume -> keyd's (state, detail), when keyd runs


def render_table(reports: Sequence[VolumeReport], daemon: DaemonView | None = None) -> str:
    """A readable table: volume, state, then each layer with device, flags and mountpoint;
    when keyd runs, a last row per volume with its own state (``daemon``)."""
    rows: list[tuple[str, ...]] = [
        ("VOLUME", "STATE", "LAYER", "KIND", "LAYER STATE", "DEVICE", "DETAIL")]
    for rep in reports:
        first = True
        for status in rep.layers:
            detail = ", ".join(filter(None, [status.mountpoint or "", status.detail,
                                             status.problem or ""]))
            rows.append((rep.name if first else "", rep.state if first else "", status.name,
                         status.kind, _layer_state(status), status.device or "-",
                         detail or "-"))
            rows.extend(_vdev_rows(rep.name, status.pool))
            first = False
        if daemon and rep.name in daemon:
            state, said = daemon[rep.name]
            rows.append(("", "", "(keyd)", "daemon", state, "-", said or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
             + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _vdev_layer(volume: str, path: str) -> str:
    """The layer a vdev path names when it is one of keyd's mappings ("vdev" otherwise)."""
    prefix = dm_name(volume, "")
    base = path.rpartition("/")[2].removeprefix("dm-name-")
    return base.removeprefix(prefix) if base.startswith(prefix) else "vdev"


def _vdev_rows(volume: str, pool: ZfsPool | None) -> list[tuple[str, ...]]:
    """One row per leaf vdev of a zfs layer's pool: its mapping, state and error counts."""
    if pool is None:
        return []
    return [("", "", f"  {_vdev_layer(volume, vdev.path)}", "vdev", vdev.state, vdev.path,
             f"errors (read write cksum): {vdev.errors}" if vdev.errors else "-")
            for vdev in pool.vdevs]


def _pool_json(volume: str, pool: ZfsPool | None) -> dict[str, Any] | None:
    if pool is None:
        return None
    return {"name": pool.name, "guid": pool.guid, "health": pool.health, "scan": pool.scan,
            "altroot": pool.altroot or None,
            "vdevs": [{"path": v.path, "layer": _vdev_layer(volume, v.path), "state": v.state,
                       "errors": v.errors} for v in pool.vdevs]}


def to_json(reports: Sequence[VolumeReport], daemon: DaemonView | None = None) -> dict[str, Any]:
    """The same information for programs (``status --json``); zfs layers add ``pool``, and
    ``daemon`` is keyd's own state and detail (null when keyd does not run)."""
    views = daemon or {}
    return {"volumes": [{
        "name": rep.name, "state": rep.state, "services": list(rep.services),
        "daemon": ({"state": views[rep.name][0], "detail": views[rep.name][1]}
                   if rep.name in views else None),
        "layers": [{"name": s.name, "kind": s.kind, "state": _layer_state(s),
                    "owned": s.owned, "device": s.device, "degraded": s.degraded,
                    "mountpoint": s.mountpoint, "detail": s.detail, "problem": s.problem,
                    **({"pool": _pool_json(rep.name, s.pool)} if s.kind == "zfs" else {})}
                   for s in rep.layers]} for rep in reports]}
