"""Shares of k-of-n enrollments, held in memory until enough have come or they expire.

A share is useless alone, but k of them open the volume, so keyd keeps each one only
in memory (never on disk), for at most the volume's ``share_timeout`` after it was
read, and zeroes it when it is combined, expires or the daemon stops. Shares are kept
per split, (volume, enrollment id, generation): shares of different volumes,
enrollments or generations are never combined. The same share read again (a stick
re-inserted) counts once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keyd.trust.report import HeldShare, StickReport
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.shares import ShareSet, combine, unseal

SplitKey = tuple[str, str, int]  # volume, enrollment id, generation


@dataclass
class _Split:
    shares: ShareSet
    sealed: dict[str | None, bytes]
    held: dict[int, tuple[SecretBytes, float]] = field(default_factory=dict)  # index -> share
    report: StickReport | None = None  # the newest share's, committed when the keys are used

    def wipe(self) -> None:
        for share, _ in self.held.values():
            share.wipe()
        self.held.clear()


@dataclass(frozen=True)
class Progress:
    """Where a split stands after a share came: ``keys`` once ``threshold`` shares combined."""

    shares: ShareSet
    have: int
    keys: KeySet | None = None
    report: StickReport | None = None


class ShareBox:
    """The shares on hand, by split; used from the daemon's loop only."""

    def __init__(self) -> None:
        self._splits: dict[SplitKey, _Split] = {}

    def add(self, shares: ShareSet, index: int, held: HeldShare, report: StickReport,
            now: float) -> Progress:
        """Keep a copy of the share; combine once there are enough (BundleRejected if they
        do not open the sealed keys: every share of the split is dropped then)."""
        key = (shares.volume, shares.set_id, shares.generation)
        split = self._splits.setdefault(key, _Split(shares, dict(held.sealed)))
        old = split.held.pop(index, None)
        if old is not None:
            old[0].wipe()
        split.held[index] = (SecretBytes(held.share.buffer), now)
        split.report = report
        if len(split.held) < split.shares.threshold:
            return Progress(split.shares, len(split.held))
        del self._splits[key]
        try:
            with combine([(i, share.buffer) for i, (share, _) in split.held.items()]) as master:
                keys = unseal(master, split.shares, split.sealed)
        finally:
            split.wipe()
        return Progress(split.shares, split.shares.threshold, keys, split.report)

    def expire(self, volume: str, read_before: float) -> int:
        """Drop (zero) the volume's shares read before ``read_before``; how many went."""
        gone = 0
        for key, split in list(self._splits.items()):
            if key[0] != volume:
                continue
            for index, (share, at) in list(split.held.items()):
                if at < read_before:
                    share.wipe()
                    del split.held[index]
                    gone += 1
            if not split.held:
                del self._splits[key]
        return gone

    def waiting(self, volume: str) -> tuple[int, int] | None:
        """(shares on hand, shares needed) of the volume's most complete split, if any."""
        splits = [s for key, s in self._splits.items() if key[0] == volume]
        if not splits:
            return None
        best = max(splits, key=lambda s: len(s.held) / s.shares.threshold)
        return len(best.held), best.shares.threshold

    def wipe_all(self) -> None:
        """Zero every share (at shutdown)."""
        for split in self._splits.values():
            split.wipe()
        self._splits.clear()
