"""Which ZFS pools keyd imported: one small file per zfs layer under the run directory.

A crypt mapping or an md array carries a name keyd chose, so keyd recognises its
own after a restart by looking at the kernel. A pool keeps the name its owner
gave it and ZFS has no import-time label, so keyd writes the pool's GUID to
``<run_dir>/zfs/<volume>.<layer>`` after importing it and removes the file after
exporting it. The run directory is a tmpfs: the records survive a daemon restart
and vanish at reboot, as the imports do (keyd imports with ``cachefile=none``).
A pool counts as keyd's only when its record matches its GUID *and* its vdevs
are the layer's keyd mappings (:func:`keyd.engine.assess.vdev_layer`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from keyd.errors import KeydError


class PoolRecordPort(Protocol):
    """Remembers the GUID of each pool keyd imported, by ``<volume>/<layer>``."""

    def save(self, key: str, guid: str) -> None:
        """Record that keyd imported pool ``guid`` for ``key``."""
        ...

    def forget(self, key: str) -> None:
        """Drop the record (the pool was exported); a missing record is not an error."""
        ...

    def load(self) -> dict[str, str]:
        """Every record: key -> GUID."""
        ...


class PoolRecords:
    """The :class:`PoolRecordPort` keeping files in ``<run_dir>/zfs``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.directory = Path(run_dir) / "zfs"

    def _path(self, key: str) -> Path:
        # Volume and layer names are [a-z0-9_], so "." cannot occur in either.
        return self.directory / key.replace("/", ".")

    def save(self, key: str, guid: str) -> None:
        """See PoolRecordPort.save (written to a temporary name, then renamed)."""
        path = self._path(key)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary = path.with_suffix(".new")
            temporary.write_text(guid + "\n")
            os.replace(temporary, path)
        except OSError as exc:
            raise KeydError(f"cannot record the import of pool {guid} in {path}: "
                            f"{exc.strerror}", fix="check that the run directory is writable") \
                from exc

    def forget(self, key: str) -> None:
        """See PoolRecordPort.forget."""
        self._path(key).unlink(missing_ok=True)

    def load(self) -> dict[str, str]:
        """See PoolRecordPort.load; unreadable or malformed files are ignored."""
        records = {}
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return {}
        for name in names:
            volume, dot, layer = name.partition(".")
            try:
                guid = (self.directory / name).read_text().strip()
            except OSError:
                continue
            if dot and "." not in layer and guid.isdigit():
                records[f"{volume}/{layer}"] = guid
        return records


@dataclass
class MemoryRecords:
    """A :class:`PoolRecordPort` in memory (tests, and executors built without a run dir)."""

    records: dict[str, str] = field(default_factory=dict)

    def save(self, key: str, guid: str) -> None:
        """See PoolRecordPort.save."""
        self.records[key] = guid

    def forget(self, key: str) -> None:
        """See PoolRecordPort.forget."""
        self.records.pop(key, None)

    def load(self) -> dict[str, str]:
        """See PoolRecordPort.load."""
        return dict(self.records)
