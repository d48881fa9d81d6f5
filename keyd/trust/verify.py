"""Full verification of a bundle read from a stick: signature, manifest, then each key.

Order: the manifest signature must be a good one by a pinned signer (decided
from gpg status lines); then the manifest is parsed; then stick-wide
revocations (signer, stick serial); then, per key: revoked bundle id, the key
file (present and safely read), its SHA-256, the validity window, the stick
binding and the generation. A key that passes is handed out in a
:class:`~keyd.trust.secret.SecretBytes` (decrypted first when encrypted).

The checks are pure functions over values; :class:`Verifier` wires them to
the gpg adapter, and :func:`commit` records what an accepted bundle teaches
(generations, revocations) in the state directory.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from keyd.trust.errors import BundleRejected, Reason, SignatureRejected, TrustError, UnsafeStickError
from keyd.trust.generations import GenerationStore
from keyd.trust.gpg import KeyDecryptor, SignatureChecker
from keyd.trust.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    KeyEntry,
    KeyFile,
    Manifest,
    ShareFile,
    parse_manifest,
)
from keyd.trust.report import HeldShare, StickReport, Verdict
from keyd.trust.revocation import Revocations, load_revocations, near_cap, save_revocations
from keyd.trust.safe_read import RawBundle, read_bundle
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.settings import Limits, TrustSettings
from keyd.trust.status import judge_output

LEARNED_REVOCATIONS = "revoked-learned.toml"


@dataclass(frozen=True)
class StickIdentity:
    """What the stick is, as reported by udev (USB serial) and blkid (filesystem UUID)."""

    serial: str | None = None
    fs_uuid: str | None = None


@dataclass(frozen=True)
class TrustState:
    """keyd's memory: last accepted generations and everything revoked so far."""

    generations: Mapping[str, int] = field(default_factory=dict)
    revocations: Revocations = field(default_factory=Revocations)


def _fold(value: str | None) -> str | None:
    return value.strip().lower() if value is not None else None


def check_stick(signer: str, stick: StickIdentity, revoked: Revocations) -> None:
    """Refuse a whole stick whose signer or serial is revoked."""
    if signer in revoked.signers:
        raise SignatureRejected(Reason.REVOKED_SIGNER, f"signer {signer} is on the revocation list",
                                subject=signer)
    if stick.serial is not None and stick.serial in revoked.serials:
        raise UnsafeStickError(Reason.REVOKED_STICK, f"stick serial {stick.serial} is revoked",
                               subject=stick.serial)


def check_window(entry: KeyEntry, now: datetime) -> None:
    """Refuse a key outside its not_before / not_after window."""
    if now < entry.not_before:
        raise BundleRejected(Reason.NOT_YET_VALID, f"volume {entry.volume}: bundle "
                          f"{entry.bundle_id} is valid only from {entry.not_before.isoformat()}",
                          subject=entry.volume)
    if entry.not_after is not None and now >= entry.not_after:
        raise BundleRejected(Reason.EXPIRED_BUNDLE, f"volume {entry.volume}: bundle "
                          f"{entry.bundle_id} expired at {entry.not_after.isoformat()}",
                          subject=entry.volume, fix="enroll a new key with keydctl enroll")


def check_binding(entry: KeyEntry, stick: StickIdentity) -> None:
    """Refuse a key found on a stick other than the one it was bound to."""
    serial_ok = entry.bind_serial is None or entry.bind_serial == stick.serial
    uuid_ok = entry.bind_fs_uuid is None or _fold(entry.bind_fs_uuid) == _fold(stick.fs_uuid)
    if not (serial_ok and uuid_ok):
        raise BundleRejected(Reason.WRONG_STICK, f"volume {entry.volume}: bundle {entry.bundle_id} is "
                          f"bound to another stick (serial {entry.bind_serial or '-'}, filesystem "
                          f"{entry.bind_fs_uuid or '-'}; this one is {stick.serial or '-'}, "
                          f"{stick.fs_uuid or '-'})", subject=entry.volume)


def check_generation(entry: KeyEntry, last: int | None) -> None:
    """Refuse a key older than the last one accepted for its volume (a replayed stick)."""
    if last is not None and entry.generation < last:
        raise BundleRejected(Reason.REPLAYED_GENERATION, f"volume {entry.volume}: generation "
                          f"{entry.generation} is older than the accepted generation {last}",
                          subject=entry.volume, fix="use the stick with the current key")


def check_key_file(entry: KeyEntry, secret: KeyFile, raw: RawBundle) -> bytearray:
    """Return a key file's bytes if present, safely read and matching the manifest hash."""
    if secret.file in raw.problems:
        problem = raw.problems[secret.file]
        raise BundleRejected(problem.reason, f"volume {entry.volume}: {problem.message}",
                          subject=entry.volume)
    data = raw.files.get(secret.file)
    if data is None:
        raise BundleRejected(Reason.MISSING_KEY_FILE, f"volume {entry.volume}: key file "
                          f"keyd/{secret.file} is not on the stick", subject=entry.volume)
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), secret.sha256):
        raise BundleRejected(Reason.HASH_MISMATCH, f"volume {entry.volume}: keyd/{secret.file} "
                          "does not match the SHA-256 in the signed manifest", subject=entry.volume)
    return data


@dataclass(frozen=True)
class Checks:
    """Everything a key is checked against besides its own manifest entry."""

    stick: StickIdentity
    now: datetime
    generations: Mapping[str, int]
    revoked: Revocations


def check_entry(entry: KeyEntry, raw: RawBundle, checks: Checks) -> list[bytearray]:
    """Run every per-key check; return each secret's (still possibly encrypted) file bytes.

    The entry is one unit: if any of its files fails, none of its secrets is used.
    """
    if entry.bundle_id in checks.revoked.bundle_ids:
        raise BundleRejected(Reason.REVOKED_BUNDLE, f"volume {entry.volume}: bundle "
                          f"{entry.bundle_id} is revoked", subject=entry.volume)
    files = [check_key_file(entry, secret, raw) for secret in entry.files]
    check_window(entry, checks.now)
    check_binding(entry, checks.stick)
    check_generation(entry, checks.generations.get(entry.volume))
    return files


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Verifier:
    """Verifies raw bundles against pinned signers with injected gpg and clock."""

    def __init__(self, checker: SignatureChecker, signers: tuple[str, ...],
                 decryptor: KeyDecryptor | None = None,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.checker = checker
        self.signers = signers
        self.decryptor = decryptor
        self.clock = clock

    def verify(self, raw: RawBundle, stick: StickIdentity, state: TrustState) -> StickReport:
        """Verify everything; stick-wide refusals come back as a report with a reason."""
        try:
            signer, manifest = self._authentic_manifest(raw)
            revoked = state.revocations.union(manifest.revocations)
            check_stick(signer, stick, revoked)
        except TrustError as exc:
            return refused(exc)
        checks = Checks(stick, self.clock(), state.generations, revoked)
        verdicts = tuple(self._verdict(entry, raw, checks) for entry in manifest.keys)
        count = sum(v.accepted for v in verdicts)
        return StickReport(None, f"{count} of {len(verdicts)} keys accepted", signer, manifest,
                           verdicts)

    def _authentic_manifest(self, raw: RawBundle) -> tuple[str, Manifest]:
        for name, reason in ((MANIFEST_NAME, Reason.NO_BUNDLE), (SIGNATURE_NAME,
                                                                 Reason.NO_SIGNATURE)):
            if name in raw.problems:
                raise raw.problems[name]
            if name not in raw.files:
                raise UnsafeStickError(reason, f"keyd/{name} is missing", subject=f"keyd/{name}")
        data, signature = raw.files[MANIFEST_NAME], raw.files[SIGNATURE_NAME]
        output = self.checker.check(data, signature)
        signer = judge_output(output.status, output.returncode, self.signers)
        return signer, parse_manifest(bytes(data))

    def _verdict(self, entry: KeyEntry, raw: RawBundle, checks: Checks) -> Verdict:
        try:
            files = check_entry(entry, raw, checks)
            if entry.share is not None:
                return self._share(entry, entry.share, files)
            keys = self._keys(entry, files)
        except TrustError as exc:
            return Verdict(entry, exc.reason, exc.message)
        return Verdict(entry, None, f"volume {entry.volume}: accepted (generation "
                       f"{entry.generation}, bundle {entry.bundle_id}{_named(entry)})", keys)

    def _keys(self, entry: KeyEntry, files: list[bytearray]) -> KeySet:
        """The entry's secrets and keyfiles, decrypted where stored encrypted."""
        opened: dict[str | None, SecretBytes] = {}
        keyfiles: dict[str | None, list[SecretBytes]] = {}
        try:
            for secret, data in zip(entry.secrets, files, strict=True):
                plain = self._plaintext(entry, secret, data)
                if secret.kind == "keyfile":
                    keyfiles.setdefault(secret.name, []).append(plain)
                else:
                    opened[secret.name] = plain
        except TrustError:
            KeySet(opened, keyfiles).wipe()
            raise
        return KeySet(opened, keyfiles)

    def _share(self, entry: KeyEntry, share: ShareFile, files: list[bytearray]) -> Verdict:
        *secrets, share_data = files  # entry.files: the sealed secrets, then the share
        sealed = {secret.name: bytes(data)
                  for secret, data in zip(entry.secrets, secrets, strict=True)}
        held = HeldShare(self._plaintext(entry, share.file, share_data), sealed)
        return Verdict(entry, None, f"volume {entry.volume}: share {share.index} of "
                       f"{share.count} accepted ({share.threshold} needed; set {share.set_id}, "
                       f"generation {entry.generation}, bundle {entry.bundle_id})", share=held)

    def _plaintext(self, entry: KeyEntry, secret: KeyFile, data: bytearray) -> SecretBytes:
        if not secret.encrypted:
            return SecretBytes(data)
        if self.decryptor is None:
            raise BundleRejected(Reason.DECRYPT_FAILED, f"volume {entry.volume}: key is encrypted "
                              "but no decryptor was given", subject=entry.volume)
        return self.decryptor.decrypt(data)


def _named(entry: KeyEntry) -> str:
    return f", keys {', '.join(entry.key_names)}" if entry.key_names else ""


def refused(error: TrustError) -> StickReport:
    """The report for a stick refused as a whole."""
    return StickReport(error.reason, error.message + (f"; fix: {error.fix}" if error.fix else ""))


def recordable(report: StickReport, settings: TrustSettings) -> StickReport:
    """``report``, or a refusal (its keys wiped) when keyd could not record what using its
    keys teaches: the replay guard would stop advancing, so keyd fails closed."""
    if not report.accepted:
        return report
    try:
        GenerationStore(settings.state_path).check_writable()
    except TrustError as exc:
        report.wipe()
        return refused(exc)
    return report


def verify_directory(root: Path, verifier: Verifier, stick: StickIdentity, state: TrustState,
                     limits: Limits | None = None) -> StickReport:
    """Safely read ``root/keyd`` and verify it; an unreadable stick becomes a refusal report."""
    try:
        raw = read_bundle(root, limits)
    except TrustError as exc:
        return refused(exc)
    with raw:
        return verifier.verify(raw, stick, state)


def load_state(settings: TrustSettings) -> TrustState:
    """Read generations and every revocation list (admin's file and learned ones)."""
    generations = GenerationStore(settings.state_path).load()
    revoked = load_revocations(Path(settings.revocations_file)).union(
        load_revocations(settings.state_path / LEARNED_REVOCATIONS))
    return TrustState(generations, revoked)


def commit(report: StickReport, settings: TrustSettings) -> str | None:
    """Remember what an authentic manifest says: accepted generations and its revocations.

    Returns a warning when the learned revocations near what keyd reads back.
    """
    if report.manifest is None:
        return None
    # Generations first: the replay guard must advance even if the revocations cannot grow.
    GenerationStore(settings.state_path).record(
        {v.entry.volume: v.entry.generation for v in report.accepted})
    learned_path = settings.state_path / LEARNED_REVOCATIONS
    learned = load_revocations(learned_path)
    if not learned.covers(report.manifest.revocations):
        learned = learned.union(report.manifest.revocations)
        save_revocations(learned_path, learned)
    return near_cap(learned_path, learned)
