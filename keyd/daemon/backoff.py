"""Per-stick exponential backoff after rejected bundles or wrong keys. Pure: time is passed in.

After the n-th failure in a row a stick is ignored for ``base * 2**(n-1)``
seconds (capped at ``maximum``); a success forgets it. Sticks are keyed by a
string the daemon chooses (USB serial, else filesystem UUID, else device).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class StickFailures:
    """How often a stick failed in a row, and until when it is ignored (monotonic seconds)."""

    count: int = 0
    until: float = 0.0


@dataclass(frozen=True)
class Backoff:
    """The backoff book of every stick that failed recently."""

    base: float = 2.0
    maximum: float = 600.0
    sticks: Mapping[str, StickFailures] = field(default_factory=dict)

    def delay(self, count: int) -> float:
        """Seconds to ignore a stick after ``count`` failures in a row."""
        if count <= 0:
            return 0.0
        return float(min(self.maximum, self.base * 2 ** min(count - 1, 62)))

    def failed(self, stick: str, now: float) -> Backoff:
        """The book after ``stick`` failed at ``now``."""
        count = self.sticks.get(stick, StickFailures()).count + 1
        entry = StickFailures(count, now + self.delay(count))
        return replace(self, sticks={**self.sticks, stick: entry})

    def succeeded(self, stick: str) -> Backoff:
        """The book after ``stick`` unlocked something: its failures are forgotten."""
        return replace(self, sticks={k: v for k, v in self.sticks.items() if k != stick})

    def wait(self, stick: str, now: float) -> float:
        """Seconds until ``stick`` may be tried again (0: now)."""
        entry = self.sticks.get(stick)
        return max(0.0, entry.until - now) if entry is not None else 0.0

    def failures(self, stick: str) -> int:
        """Failures in a row of ``stick``."""
        entry = self.sticks.get(stick)
        return entry.count if entry is not None else 0
