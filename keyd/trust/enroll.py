"""Enrollment: write (or extend) a signed key bundle in ``DIR/keyd/``.

The new key goes into ``keyd/<volume>.key`` (raw) or ``keyd/<volume>.key.gpg``
(encrypted to the host key), a key for one key name into ``keyd/<volume>.<name>.key``;
the manifest gains or replaces the volume's entry, the replaced entry's bundle id is
added to the manifest's ``[revoke]`` list and its key files leave the stick; then the
manifest is signed again. An existing manifest is
only extended if its signature verifies against the pinned signers or the
signing key, so enrollment never re-signs (launders) a tampered bundle.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from keyd.fingerprint import normalize_fingerprint
from keyd.trust import shares
from keyd.trust.atomic import write_atomic
from keyd.trust.errors import ManifestError, Reason, TrustError
from keyd.trust.gpg import GnuPG
from keyd.trust.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    KeyEntry,
    KeyFile,
    Manifest,
    ShareFile,
    parse_manifest,
    render_manifest,
)
from keyd.trust.revocation import Revocations
from keyd.trust.safe_read import BUNDLE_DIR, read_bundle
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.shares import ShareSet
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


def file_name(volume: str, name: str | None, suffix: str, encrypted: bool = False) -> str:
    """A file's name inside ``keyd/``: ``VOLUME[.NAME].SUFFIX[.gpg]``."""
    stem = f"{volume}.{name}" if name is not None else volume
    return f"{stem}.{suffix}" + (".gpg" if encrypted else "")


def recorded(file: str, stored: bytes, *, encrypted: bool = False, name: str | None = None,
             kind: str = "key") -> KeyFile:
    """The manifest's record of a file as written to the stick (``stored`` bytes)."""
    return KeyFile(file, hashlib.sha256(stored).hexdigest(), encrypted, name, kind)


def next_generation(existing: Manifest | None, volume: str, last_accepted: int | None) -> int:
    """One above both the host's last accepted generation and the stick's current entry."""
    on_stick = [k.generation for k in existing.keys if k.volume == volume] if existing else []
    return max([last_accepted or 0, *on_stick]) + 1


def new_entry(request: EnrollRequest, stored: Mapping[str | None, bytes],
              generation: int) -> KeyEntry:
    """The manifest entry for ``stored`` (each key file's bytes as written to the stick)."""
    encrypted = request.encrypt_to is not None
    return KeyEntry(
        volume=request.volume, bundle_id=request.bundle_id or str(uuid.uuid4()),
        secrets=tuple(recorded(file_name(request.volume, name, "key", encrypted), data,
                               encrypted=encrypted, name=name)
                      for name, data in stored.items()),
        generation=generation,
        not_before=request.not_before.replace(microsecond=0),
        not_after=request.not_after.replace(microsecond=0) if request.not_after else None,
        volume_uuid=request.volume_uuid, bind_serial=request.bind_serial,
        bind_fs_uuid=request.bind_fs_uuid)


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


def replaced_files(existing: Manifest | None, entry: KeyEntry) -> list[str]:
    """Key files of the volume's replaced entry that the new entry does not reuse."""
    if existing is None:
        return []
    kept = {secret.file for secret in entry.files}
    return sorted({secret.file for old in existing.keys if old.volume == entry.volume
                   for secret in old.files} - kept)


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

    def enroll(self, request: EnrollRequest, keys: KeySet, now: datetime,
               last_accepted: int | None = None) -> KeyEntry:
        """Write the key files, the merged manifest and its signature; return the new entry.

        Without an explicit generation the next one is used (see :func:`next_generation`).
        """
        existing = self.existing_manifest(request)
        generation = request.generation or next_generation(existing, request.volume,
                                                           last_accepted)
        stored = {name: self._stored(request, secret) for name, secret in keys.items()}
        entry = new_entry(request, stored, generation)
        files = {secret.file: stored[secret.name] for secret in entry.secrets}
        keyfiles = self._keyfiles(request, keys)
        files.update({record.file: data for record, data in keyfiles})
        entry = replace(entry, secrets=entry.secrets + tuple(record for record, _ in keyfiles))
        return self.write(request, entry, files, existing, now)

    def _keyfiles(self, request: EnrollRequest, keys: KeySet) -> list[tuple[KeyFile, bytes]]:
        """The TrueCrypt/VeraCrypt keyfiles of ``keys``, as stored, with their records."""
        encrypted = request.encrypt_to is not None
        records = []
        for name, keyfiles in keys.keyfile_items():
            for number, keyfile in enumerate(keyfiles, 1):
                data = self._stored(request, keyfile)
                file = file_name(request.volume, name, f"keyfile{number}", encrypted)
                records.append((recorded(file, data, encrypted=encrypted, name=name,
                                         kind="keyfile"), data))
        return records

    def enroll_shares(self, requests: Sequence[EnrollRequest], keys: KeySet, threshold: int,
                      now: datetime, last_accepted: int | None = None) -> list[KeyEntry]:
        """Write one share bundle per request (one per stick): any ``threshold`` of them
        together open ``keys``; fewer open nothing (see :mod:`keyd.trust.shares`)."""
        existing = [self.existing_manifest(request) for request in requests]
        first = requests[0]
        generation = first.generation or max(next_generation(manifest, first.volume,
                                                             last_accepted)
                                             for manifest in existing)
        split = ShareSet(first.volume, str(uuid.uuid4()), generation, threshold, len(requests))
        with shares.new_master() as master:
            pieces = shares.split(master, threshold, len(requests))
            sealed = shares.seal(master, split, keys)
        entries = []
        for (index, piece), request, manifest in zip(pieces, requests, existing, strict=True):
            entry, files = self._share_entry(request, split, index, piece, sealed)
            entries.append(self.write(request, replace(entry, generation=generation), files,
                                      manifest, now))
        return entries

    def _share_entry(self, request: EnrollRequest, split: ShareSet, index: int, piece: bytes,
                     sealed: Mapping[str | None, bytes]) -> tuple[KeyEntry, dict[str, bytes]]:
        encrypted = request.encrypt_to is not None
        share = self._stored(request, SecretBytes(piece))
        share_file = recorded(file_name(request.volume, None, "share", encrypted), share,
                              encrypted=encrypted)
        secrets = tuple(recorded(file_name(request.volume, name, "sealed"), blob, name=name)
                        for name, blob in sealed.items())
        entry = replace(new_entry(request, {}, split.generation), secrets=secrets,
                        share=ShareFile(split.set_id, index, split.threshold, split.count,
                                        share_file))
        files = {secret.file: sealed[secret.name] for secret in secrets}
        return entry, {**files, share_file.file: share}

    def _stored(self, request: EnrollRequest, secret: SecretBytes) -> bytes:
        if request.encrypt_to:
            return self.gpg.encrypt(secret.buffer, request.encrypt_to)
        return bytes(secret.buffer)

    def write(self, request: EnrollRequest, entry: KeyEntry, files: Mapping[str, bytes],
              existing: Manifest | None, now: datetime) -> KeyEntry:
        """Write ``entry``'s files (by file name), the manifest merged with it, the signature."""
        directory = request.output / BUNDLE_DIR
        manifest_bytes = render_manifest(merge(existing, entry, now))
        readable(directory, manifest_bytes)
        signature = self.gpg.sign_detached(manifest_bytes, request.signing_key)
        # Keys first, signature last: a crash leaves a bundle that fails verification, not a
        # bundle that verifies with a stale key.
        for secret in entry.files:
            write_atomic(directory / secret.file, files[secret.file], mode=0o600)
        write_atomic(directory / MANIFEST_NAME, manifest_bytes, mode=0o644)
        write_atomic(directory / SIGNATURE_NAME, signature, mode=0o644)
        for name in replaced_files(existing, entry):
            (directory / name).unlink(missing_ok=True)  # the retired key leaves the stick
        return entry

    def backup(self, request: EnrollRequest, source: Path, now: datetime) -> KeyEntry:
        """Copy the volume's bundle in ``source`` to another stick, at the same generation.

        The copy is a bundle of its own (new id, bound to its own stick): using either stick
        never retires the other, and a lost one is revoked by its bundle id or serial alone.
        """
        original = self._source_entry(request, source)
        if original.share is not None:
            raise TrustError(Reason.MALFORMED_MANIFEST, f"{source} holds a share of volume "
                             f"{request.volume}; a copy would be the same share again",
                             subject=str(source), fix="enroll the shares anew with --shares "
                             "(one stick more for a spare)")
        with read_bundle(source) as raw:
            stored = {secret.file: bytes(raw.files[secret.file]) for secret in original.secrets
                      if secret.file in raw.files}
        if len(stored) != len(original.secrets):
            raise TrustError(Reason.MISSING_KEY_FILE, f"{source}/{BUNDLE_DIR} lacks a key file "
                             f"of volume {request.volume}", subject=str(source),
                             fix="back up from the complete primary stick")
        entry = replace(original, bundle_id=request.bundle_id or str(uuid.uuid4()),
                        bind_serial=request.bind_serial, bind_fs_uuid=request.bind_fs_uuid,
                        not_after=request.not_after or original.not_after)
        return self.write(request, entry, stored, self.existing_manifest(request), now)

    def _source_entry(self, request: EnrollRequest, source: Path) -> KeyEntry:
        manifest = self.existing_manifest(replace(request, output=source))
        entry = next((k for k in manifest.keys if k.volume == request.volume), None) \
            if manifest else None
        if entry is None:
            raise TrustError(Reason.NO_BUNDLE, f"{source} holds no bundle for volume "
                             f"{request.volume}", subject=str(source),
                             fix="point --backup-of at the primary stick's mount point")
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
