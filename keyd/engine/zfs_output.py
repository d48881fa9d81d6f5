"""Pure parsers for zpool's output (OpenZFS 2.1), joined into :class:`ZfsPool` records.

- ``zpool list -H -p -o name,guid,health,altroot``: one tab-separated line per pool
- ``zpool status -P``: per pool a ``pool:``/``state:``/``scan:`` header and a ``config:``
  tree; leaf vdevs are printed with their full path (``-P``); a missing leaf is printed
  as its GUID followed by ``was /dev/...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from keyd.engine.observed import PoolVdev, ZfsPool

LIST_COLUMNS = "name,guid,health,altroot"
# Words that start a section of the config tree instead of naming a vdev.
_SECTIONS = ("logs", "cache", "spares", "special", "dedup")


def parse_zpool_list(text: str) -> tuple[ZfsPool, ...]:
    """Parse ``zpool list -H -p -o name,guid,health,altroot``; other lines are skipped."""
    pools = []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) != 4 or not cells[1].isdigit():
            continue  # e.g. "no pools available"
        name, guid, health, altroot = cells
        pools.append(ZfsPool(name, guid, health, altroot="" if altroot == "-" else altroot))
    return tuple(pools)


@dataclass
class _Status:
    """What ``zpool status`` says about one pool while its block is being read."""

    name: str
    state: str = ""
    scan: str = ""
    vdevs: list[PoolVdev] = field(default_factory=list)
    in_config: bool = False


def parse_zpool_status(text: str) -> dict[str, tuple[str, str, tuple[PoolVdev, ...]]]:
    """Parse ``zpool status -P``: pool name -> (state, first scan line, leaf vdevs)."""
    found: list[_Status] = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "pool" and not line.startswith("\t"):
            found.append(_Status(value.strip()))
        elif found:
            _status_line(found[-1], line, key, value.strip())
    return {s.name: (s.state, s.scan, tuple(s.vdevs)) for s in found}


def _status_line(status: _Status, line: str, key: str, value: str) -> None:
    if line.strip() == "config:":
        status.in_config = True
    elif line.startswith("errors:"):
        status.in_config = False
    elif not status.in_config and key == "state":
        status.state = value
    elif not status.in_config and key == "scan":
        status.scan = value
    elif status.in_config:
        leaf = _leaf(line.split())
        if leaf is not None:
            status.vdevs.append(leaf)


def _leaf(words: Sequence[str]) -> PoolVdev | None:
    """A leaf vdev row (a path, or a GUID with ``was PATH``); None for headers and groups."""
    if len(words) < 2 or words[0] in _SECTIONS or words[0] == "NAME":
        return None
    errors = " ".join(words[2:5]) if len(words) >= 5 else ""
    if "was" in words[:-1]:
        return PoolVdev(words[words.index("was") + 1], words[1], errors)
    if words[0].startswith("/"):
        return PoolVdev(words[0], words[1], errors)
    return None


def join_pools(listed: Sequence[ZfsPool],
               status: dict[str, tuple[str, str, tuple[PoolVdev, ...]]]) -> tuple[ZfsPool, ...]:
    """Each listed pool with its vdevs and scan line from ``zpool status``."""
    joined = []
    for pool in listed:
        _state, scan, vdevs = status.get(pool.name, (pool.health, "", ()))
        joined.append(replace(pool, scan=scan, vdevs=vdevs))
    return tuple(joined)
