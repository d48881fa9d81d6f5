"""What verifying a stick decided: one :class:`Verdict` per key, gathered in a :class:`StickReport`.

Plain data, apart from :mod:`keyd.trust.verify` (which makes them) so that the
daemon's core can hold and pass reports around without loading the verification
pipeline (gpg, bundle reading, manifests) before the first stick appears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyd.trust.errors import Reason
from keyd.trust.secret import KeySet, SecretBytes, WipeOnExit

if TYPE_CHECKING:
    from keyd.trust.manifest import KeyEntry, Manifest


@dataclass
class HeldShare(WipeOnExit):
    """An accepted share of a k-of-n enrollment and the sealed keys its bundle carries."""

    share: SecretBytes
    sealed: dict[str | None, bytes]

    def wipe(self) -> None:
        """Zero the share (the sealed keys are no secret without enough shares)."""
        self.share.wipe()


@dataclass
class Verdict:
    """The outcome for one bundle of the manifest; when accepted, ``keys`` holds its keys, or
    ``share`` its share (a k-of-n bundle, whose keys open only with k shares)."""

    entry: KeyEntry
    reason: Reason | None
    message: str
    keys: KeySet | None = None
    share: HeldShare | None = None

    @property
    def accepted(self) -> bool:
        """True if this key may be used."""
        return self.reason is None


@dataclass
class StickReport(WipeOnExit):
    """The outcome for a whole stick: a stick-wide refusal, or one verdict per key."""

    reason: Reason | None
    message: str
    signer: str | None = None
    manifest: Manifest | None = None
    verdicts: tuple[Verdict, ...] = ()

    @property
    def accepted(self) -> tuple[Verdict, ...]:
        """The keys that passed every check."""
        return tuple(v for v in self.verdicts if v.accepted)

    def wipe(self) -> None:
        """Zero every key buffer handed out."""
        for verdict in self.verdicts:
            if verdict.keys is not None:
                verdict.keys.wipe()
            if verdict.share is not None:
                verdict.share.wipe()
