"""Accepted keys, held in memory between verification and use, behind opaque handles.

The daemon's facts and D-Bus only ever see the handle (``ref``); the bytes stay
in a :class:`~keyd.trust.secret.KeySet` (secrets by key name) that is wiped when the handle is
discarded (and all of them when the daemon stops).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from keyd.trust.report import StickReport
from keyd.trust.secret import KeySet


@dataclass
class HeldKey:
    """Keys by key name and where they came from (``report`` for committing trust state)."""

    keys: KeySet
    report: StickReport | None = None


class KeyStore:
    """Handles -> keys; thread-safe (workers read, the loop adds and discards)."""

    def __init__(self) -> None:
        self._keys: dict[str, HeldKey] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def put(self, keys: KeySet, report: StickReport | None = None) -> str:
        """Take ownership of ``keys``; return their handle."""
        with self._lock:
            ref = f"key-{next(self._ids)}"
            self._keys[ref] = HeldKey(keys, report)
        return ref

    def get(self, ref: str) -> HeldKey:
        """The key behind ``ref`` (KeyError if it was discarded)."""
        with self._lock:
            return self._keys[ref]

    def discard(self, ref: str) -> None:
        """Wipe and forget the key; unknown handles are ignored."""
        with self._lock:
            held = self._keys.pop(ref, None)
        if held is not None:
            held.keys.wipe()

    def wipe_all(self) -> None:
        """Wipe every key (at shutdown)."""
        with self._lock:
            refs = list(self._keys)
        for ref in refs:
            self.discard(ref)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)
