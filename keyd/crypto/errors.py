"""Errors of keyd's userspace crypto; all derive from :class:`keyd.errors.KeydError`.

Each carries the thing it is about (``subject``: a cipher spec, a PRF, a device), says
why in its message and what to do in ``fix``. The engine tells them apart by type:
:class:`PassphraseRejected` is "the key did not open it" (what cryptsetup's exit 2 means),
the ``Unsupported*`` errors are "this backend cannot open it, the kernel's can", and
:class:`HeaderUnreadable` / :class:`HeaderDamaged` are faults of the device.
Messages never contain key bytes.
"""

from __future__ import annotations

from keyd.errors import KeydError

# Where a volume that this code refuses can still be opened: dm-crypt through cryptsetup.
KERNEL_FIX = 'set backend = "kernel" for this layer and use a kernel with dm-crypt'


class CryptoError(KeydError):
    """Base of the userspace crypto errors; ``subject`` names what was refused."""

    def __init__(self, message: str, *, subject: str = "", fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.subject = subject


class UnsupportedCipher(CryptoError):
    """A cipher spec, mode, IV generator or key size the userspace backend does not implement."""

    def __init__(self, spec: str, problem: str, *, fix: str | None = KERNEL_FIX) -> None:
        super().__init__(f"cipher {spec!r}: {problem}", subject=spec, fix=fix)


class UnsupportedHash(CryptoError):
    """A hash or PBKDF2 PRF that neither hashlib, cryptography nor Cryptodome provides here."""

    def __init__(self, name: str, problem: str, *, fix: str | None = KERNEL_FIX) -> None:
        super().__init__(f"hash {name!r}: {problem}", subject=name, fix=fix)


class UnsupportedVolume(CryptoError):
    """A TrueCrypt/VeraCrypt feature the userspace backend refuses (system encryption, keyfiles)."""


class PassphraseRejected(CryptoError):
    """No header decrypted with this passphrase: the wrong key, or not such a volume.

    ``tried`` lists the PRFs tried, ``not_tried`` those cryptsetup would also try but this
    backend cannot; the engine treats this error as a rejected key, like cryptsetup's exit 2.
    """

    exit_code = 6

    def __init__(self, message: str, *, subject: str, tried: tuple[str, ...] = (),
                 not_tried: tuple[str, ...] = (), fix: str | None = None) -> None:
        super().__init__(message, subject=subject, fix=fix)
        self.tried = tried
        self.not_tried = not_tried


class HeaderUnreadable(CryptoError):
    """The header bytes could not be read (I/O error, or the device is too small to hold one)."""


class HeaderDamaged(CryptoError):
    """A header decrypted but is inconsistent (CRC mismatch, a data area past the device's end)."""
