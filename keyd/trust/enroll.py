"""Enrollment: write (or extend) a signed key bundle in ``DIR/keyd/``.

The new key goes into ``keyd/<volume>.key`` (raw) or ``keyd/<volume>.key.gpg``
(encrypted to the host key); the manifest gains or replaces the volume's
entry, and the replaced entry's bundle id is added to the manifest's
``[revoke]`` list; then the manifest is signed again. An existing manifest is
only extended if its signature verifies against the pinned signers or the
signing key, so enrollment never re-signs (launders) a tampered bundle.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from keyd.fingerprint import normalize_fingerprint
from keyd.trust.atomic import write_atomic
from keyd.trust.errors import ManifestError, Reason, TrustError
from keyd.trust.gpg import GnuPG
from keyd.trust.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    KeyEntry,
    Manifest,
    parse_manifest,
    render_manifest,
)
from keyd.trust.revocation import Revocations
from keyd.trust.safe_read import BUNDLE_DIR, read_bundle
from keyd.trust.secret import SecretBytes
from keyd.trust.status import judge_output


@dataclass(frozen=True)
class EnrollRequest:
    """Everything that goes into one manifest entry besides the key bytes."""

    volume: str
    signing_key: str
    output: Path
    not_before: datetime
    generation: int | None = None
    not_after: datetime | None = None
    bind_serial: str | None = None
    bind_fs_uuid: str | None = None
    volume_uuid: str | None = None
    encrypt_to: str | None = None
    bundle_id: str | None = None


def key_file_name(volume: str, encrypted: bool) -> str:
    """The file name of a volume's key inside ``keyd/``."""
    return f"{volume}.key.gpg" if encrypted else f"{volume}.key"


def next_generation(existing: Manifest | None, volume: str, last_accepted: int | None) -> int:
    """One above both the host's last accepted generation and the stick's current entry."""
    on_stick = [k.generation for k in existing.keys if k.volume == volume] if existing else []
    return max([last_accepted or 0, *on_stick]) + 1


def new_entry(request: EnrollRequest, stored: bytes, generation: int) -> KeyEntry:
    """The manifest entry for ``stored`` (the key file bytes as written to the stick)."""
    encrypted = request.encrypt_to is not None
    return KeyEntry(
        volume=request.volume, bundle_id=request.bundle_id or str(uuid.uuid4()),
        file=key_file_name(request.volume, encrypted),
        sha256=hashlib.sha256(stored).hexdigest(), generation=generation,
        not_before=request.not_before.replace(microsecond=0),
        not_after=request.not_after.replace(microsecond=0) if request.not_after else None,
        volume_uuid=request.volume_uuid, bind_serial=request.bind_serial,
        bind_fs_uuid=request.bind_fs_uuid, encrypted=encrypted)


def merge(existing: Manifest | None, entry: KeyEntry, created: datetime) -> Manifest:
    """Add ``entry``, replacing (and revoking) any previous entry for the same volume."""
    if existing is None:
        return Manifest((entry,), Revocations(), created.replace(microsecond=0))
    previous = [k for k in existing.keys if k.volume == entry.volume]
    kept = tuple(k for k in existing.keys if k.volume != entry.volume)
    revoked = existing.revocations.union(
        Revocations(bundle_ids=frozenset(k.bundle_id for k in previous)))
    return replace(existing, keys=(*kept, entry), revocations=revoked,
                   created=created.replace(microsecond=0))


def readable(directory: Path, manifest: bytes) -> None:
    """Refuse to write a manifest every keyd would refuse (too large, too many revocations).

    Each enrollment carries the replaced bundles' ids forward as revocations, so a bundle
    directory re-enrolled for years outgrows what keyd reads from a stick.
    """
    try:
        parse_manifest(manifest)
    except ManifestError as exc:
        raise TrustError(exc.reason, f"the manifest in {directory} would be refused by keyd: "
                         f"{exc}", subject=str(directory),
                         fix=f"start a new bundle: move {directory}/{MANIFEST_NAME}* away (keyd "
                             "already refuses the retired bundles by their generation once it "
                             "has seen a newer one; revoke lost sticks by serial)") from exc


class Enroller:
    """Writes bundles with a GnuPG home that holds the signing key."""

    def __init__(self, gpg: GnuPG, signers: tuple[str, ...]) -> None:
        self.gpg = gpg
        self.signers = signers

    def enroll(self, request: EnrollRequest, key: SecretBytes, now: datetime,
               last_accepted: int | None = None) -> KeyEntry:
        """Write the key file, the merged manifest and its signature; return the new entry.

        Without an explicit generation the next one is used (see :func:`next_generation`).
        """
        directory = request.output / BUNDLE_DIR
        existing = self.existing_manifest(request)
        generation = request.generation or next_generation(existing, request.volume,
                                                           last_accepted)
        stored = (self.gpg.encrypt(key.buffer, request.encrypt_to) if request.encrypt_to
                  else bytes(key.buffer))
        entry = new_entry(request, stored, generation)
        manifest_bytes = render_manifest(merge(existing, entry, now))
        readable(directory, manifest_bytes)
        signature = self.gpg.sign_detached(manifest_bytes, request.signing_key)
        # Key first, signature last: a crash leaves a bundle that fails verification, not a
        # bundle that verifies with a stale key.
        write_atomic(directory / entry.file, stored, mode=0o600)
        write_atomic(directory / MANIFEST_NAME, manifest_bytes, mode=0o644)
        write_atomic(directory / SIGNATURE_NAME, signature, mode=0o644)
        return entry

    def existing_manifest(self, request: EnrollRequest) -> Manifest | None:
        """The manifest already in ``DIR/keyd``, if any, after checking its signature."""
        directory = request.output / BUNDLE_DIR
        if not (directory / MANIFEST_NAME).exists():
            return None
        trusted = tuple(self.signers) + tuple(
            f for f in (normalize_fingerprint(request.signing_key),) if f)
        with read_bundle(request.output) as raw:
            if MANIFEST_NAME not in raw.files or SIGNATURE_NAME not in raw.files:
                raise self._refuse(directory, "has a manifest without a readable signature")
            output = self.gpg.check(raw.files[MANIFEST_NAME], raw.files[SIGNATURE_NAME])
            try:
                judge_output(output.status, output.returncode, trusted)
            except TrustError as exc:
                raise self._refuse(directory, f"has a manifest keyd cannot trust "
                                   f"({exc.reason.value})") from exc
            return parse_manifest(bytes(raw.files[MANIFEST_NAME]))

    @staticmethod
    def _refuse(directory: Path, problem: str) -> TrustError:
        return TrustError(Reason.BAD_SIGNATURE, f"{directory} {problem}; refusing to re-sign it",
                          subject=str(directory),
                          fix=f"move {directory}/{MANIFEST_NAME}* away to start a new bundle")
