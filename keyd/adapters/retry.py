"""Retry a closing command that fails only because a device is busy for a moment.

After the layer above is closed, udev probes the freed device and a FUSE
driver (ntfs-3g) may still be exiting, so ``cryptsetup close`` or
``mdadm --stop`` can see "busy" for a fraction of a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from keyd.errors import ProgramError

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """How often and how long to retry when ``busy(error)`` says the failure is transient."""

    attempts: int = 10
    delay: float = 0.3
    sleep: Callable[[float], None] = time.sleep

    def run(self, action: Callable[[], T], busy: Callable[[ProgramError], bool]) -> T:
        """Run ``action``; on a busy ProgramError wait and try again, up to ``attempts`` times."""
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except ProgramError as exc:
                if attempt == self.attempts or not busy(exc):
                    raise
            self.sleep(self.delay)
        raise AssertionError("unreachable")  # pragma: no cover
