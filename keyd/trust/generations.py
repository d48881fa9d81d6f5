"""The last accepted key generation per volume, so an older (re-keyed) stick is refused.

Stored as JSON in ``<state_dir>/generations.json`` and replaced atomically
(temporary file, fsync, rename). Generations only move up: recording a
lower one than stored is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from keyd.trust.atomic import write_atomic
from keyd.trust.errors import Reason, TrustStateError

FILE_NAME = "generations.json"
MAX_BYTES = 1 << 20


class GenerationStore:
    """Reads and records the highest accepted generation of each volume."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME

    def load(self) -> dict[str, int]:
        """All recorded generations; an absent file means none yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise self._error(f"cannot read it: {exc.strerror}") from None
        return self._parse(data)

    def check_writable(self) -> None:
        """Prove a generation could be recorded now (write, fsync and remove a probe file);
        TrustStateError naming the directory and the fix if not (read-only, full, missing)."""
        probe = self.path.parent / ".keyd-write-probe"
        try:
            write_atomic(probe, b"\n", mode=0o600)
            probe.unlink()
        except OSError as exc:
            raise TrustStateError(
                Reason.STATE_ERROR, f"cannot record accepted generations in {self.path.parent}: "
                f"{exc.strerror or exc}", subject=str(self.path.parent),
                fix=f"make {self.path.parent} a writable directory for root (keydctl doctor "
                    "checks it); keyd refuses stick keys until then, so that a retired stick "
                    "is never accepted again") from None

    def last(self, volume: str) -> int | None:
        """The last accepted generation of ``volume``, or None if it was never unlocked."""
        return self.load().get(volume)

    def record(self, accepted: Mapping[str, int]) -> None:
        """Raise the stored generation of each volume to the accepted one."""
        current = self.load()
        merged = dict(current)
        for volume, generation in accepted.items():
            merged[volume] = max(generation, current.get(volume, 0))
        if merged == current:
            return
        text = json.dumps({"format": 1, "volumes": dict(sorted(merged.items()))}, indent=2)
        try:
            write_atomic(self.path, text.encode() + b"\n", mode=0o600)
        except OSError as exc:
            raise self._error(f"cannot write it: {exc.strerror}") from None

    def _parse(self, data: bytes) -> dict[str, int]:
        if len(data) > MAX_BYTES:
            raise self._error("it is too large")
        try:
            table = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise self._error("it is not valid JSON") from None
        volumes = table.get("volumes") if isinstance(table, dict) else None
        if not isinstance(volumes, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in volumes.items()):
            raise self._error('it must be {"format": 1, "volumes": {"NAME": GENERATION}}')
        return dict(volumes)

    def _error(self, problem: str) -> TrustStateError:
        return TrustStateError(Reason.STATE_ERROR, f"generation store {self.path}: {problem}",
                               subject=str(self.path),
                               fix="restore it from backup; deleting it re-allows old sticks")
