"""Why a key stick or a bundle was refused: one reason code per rejection.

Every refusal in :mod:`keyd.trust` is a :class:`TrustError` (a
:class:`~keyd.errors.KeydError`) carrying a :class:`Reason`. The codes are
stable strings: the audit log and ``keydctl verify --json`` print them, so a
code is never renamed or reused for a different meaning.

Messages never contain key bytes: they name files, volumes, fingerprints and
bundle ids only.
"""

from __future__ import annotations

import enum

from keyd.errors import KeydError


class Reason(enum.StrEnum):
    """A distinct, stable code for each way a stick or a bundle is refused."""

    # The stick as a whole.
    NO_BUNDLE = "NO_BUNDLE"
    NO_SIGNATURE = "NO_SIGNATURE"
    UNSAFE_FILE = "UNSAFE_FILE"
    TOO_LARGE = "TOO_LARGE"
    TOO_MANY_FILES = "TOO_MANY_FILES"
    UNSUPPORTED_FILESYSTEM = "UNSUPPORTED_FILESYSTEM"
    MOUNT_FAILED = "MOUNT_FAILED"
    UNMOUNT_FAILED = "UNMOUNT_FAILED"
    # The signature over the manifest.
    BAD_SIGNATURE = "BAD_SIGNATURE"
    SIGNATURE_ERROR = "SIGNATURE_ERROR"
    NO_PUBKEY = "NO_PUBKEY"
    UNKNOWN_SIGNER = "UNKNOWN_SIGNER"
    EXPIRED_SIGNER = "EXPIRED_SIGNER"
    REVOKED_SIGNER = "REVOKED_SIGNER"
    EXPIRED_SIGNATURE = "EXPIRED_SIGNATURE"
    WEAK_SIGNATURE_HASH = "WEAK_SIGNATURE_HASH"
    MALFORMED_STATUS = "MALFORMED_STATUS"
    # The manifest.
    MALFORMED_MANIFEST = "MALFORMED_MANIFEST"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    REVOKED_STICK = "REVOKED_STICK"
    # One key of the manifest.
    MISSING_KEY_FILE = "MISSING_KEY_FILE"
    HASH_MISMATCH = "HASH_MISMATCH"
    NOT_YET_VALID = "NOT_YET_VALID"
    EXPIRED_BUNDLE = "EXPIRED_BUNDLE"
    WRONG_STICK = "WRONG_STICK"
    REPLAYED_GENERATION = "REPLAYED_GENERATION"
    REVOKED_BUNDLE = "REVOKED_BUNDLE"
    DECRYPT_FAILED = "DECRYPT_FAILED"
    SHARES_DO_NOT_COMBINE = "SHARES_DO_NOT_COMBINE"
    # keyd's own state.
    STATE_ERROR = "STATE_ERROR"
    UNSAFE_GNUPGHOME = "UNSAFE_GNUPGHOME"
    UNSAFE_REVOCATIONS = "UNSAFE_REVOCATIONS"


class TrustError(KeydError):
    """A stick, manifest, signature or key was refused; ``reason`` says why.

    ``subject`` names what was refused (a file on the stick, a volume, a
    device) so the audit can log it next to the code.
    """

    exit_code = 6

    def __init__(self, reason: Reason, message: str, *, subject: str = "",
                 fix: str | None = None) -> None:
        super().__init__(f"{reason.value}: {message}", fix=fix)
        self.reason = reason
        self.subject = subject


class SignatureRejected(TrustError):
    """The manifest signature is missing, bad, or not by a pinned, valid signer."""


class ManifestError(TrustError):
    """The manifest is not a valid keyd manifest (encoding, syntax or content)."""


class UnsafeStickError(TrustError):
    """The stick's ``keyd/`` directory holds something keyd refuses to read."""


class BundleRejected(TrustError):
    """One bundle entry of an otherwise valid manifest fails its checks (expired, replayed...)."""


class StickMountError(TrustError):
    """The stick could not be mounted or unmounted safely."""

    exit_code = 1


class TrustStateError(TrustError):
    """keyd's own trust state (generations, revocations) cannot be read or written."""

    exit_code = 1
