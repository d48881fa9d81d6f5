"""The GnuPG adapter: python-gnupg in keyd's own GnuPG home, never root's ``~/.gnupg``.

It only runs gpg and hands back raw status output (``--status-fd``) and
data; the trust decision is made by :mod:`keyd.trust.status`. gpg's human
log goes to ``/dev/null`` during verification so the status stream holds
nothing but ``[GNUPG:]`` lines, and the web of trust is switched off
(``--trust-model always``): keyd pins signers itself. Expired and revoked
keys are still reported by gpg in that mode (EXPKEYSIG, REVKEYSIG).

gpg runs as root and reads its home's configuration (``gpg.conf`` can name
programs for gpg to run, ``gpg-agent.conf`` a pinentry): a home, or a file in
it, that anyone but root could write is refused before gpg ever starts, and
gpg is told to read no option file (``--no-options``).
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gnupg

from keyd.trust.errors import BundleRejected, Reason, TrustError
from keyd.trust.secret import SecretBytes

GPG_OPTIONS = ["--no-options", "--trust-model", "always", "--no-auto-key-retrieve",
               "--no-greeting"]


@dataclass(frozen=True)
class GpgOutput:
    """What a gpg run printed on its status channel, and its exit code."""

    status: str
    returncode: int


class SignatureChecker(Protocol):
    """Checks a detached signature; the verifier takes one so tests can pass real gpg homes."""

    def check(self, data: bytes | bytearray, signature: bytes | bytearray) -> GpgOutput:
        """Run the signature check; return gpg's status output, never judge it."""
        ...


class KeyDecryptor(Protocol):
    """Decrypts an encrypted key file with the host key."""

    def decrypt(self, ciphertext: bytes | bytearray) -> SecretBytes:
        """Return the plaintext in a zeroable buffer, or raise BundleRejected(DECRYPT_FAILED)."""
        ...


def check_home_safe(home: Path, euid: int | None = None) -> None:
    """Refuse a GnuPG home that someone other than us (root) could change.

    The home itself and every file directly in it (the configuration and the key rings)
    must be owned by us and not writable by group or others.
    """
    me = os.geteuid() if euid is None else euid
    for path in [home, *sorted(home.iterdir())]:
        info = path.lstat()
        if info.st_uid != me or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise TrustError(Reason.UNSAFE_GNUPGHOME,
                             f"keyd's GnuPG home is not safe: {path} is owned by uid "
                             f"{info.st_uid} with mode {stat.filemode(info.st_mode)}; gpg runs "
                             "as root and would read it", subject=str(path),
                             fix=f"chown -R {me}:{me} {home} && chmod -R go-w {home}")


class GnuPG:
    """gpg operations in one GnuPG home (verify, decrypt, and for enrollment sign/encrypt)."""

    def __init__(self, gnupghome: str) -> None:
        home = Path(gnupghome)
        if not home.is_dir():
            raise TrustError(Reason.STATE_ERROR, f"GnuPG home {home} does not exist",
                             subject=str(home),
                             fix=f"mkdir -m 0700 {home} and import the signers' public keys "
                                 f"with gpg --homedir {home} --import")
        check_home_safe(home)
        self.home = str(home)
        # gpg inherits the caller's environment (Debian 12's python-gnupg 0.4.9 cannot set
        # one): --homedir, which python-gnupg always passes, picks the home and its agent
        # socket whatever GNUPGHOME says, and status lines are not localised.
        self._gpg: Any = gnupg.GPG(gnupghome=self.home, options=list(GPG_OPTIONS))

    def check(self, data: bytes | bytearray, signature: bytes | bytearray) -> GpgOutput:
        """Verify ``signature`` (detached) over ``data``; see :class:`SignatureChecker`."""
        # python-gnupg wants the signature as a file; it is public, so a temp file is fine.
        with tempfile.TemporaryDirectory(prefix="keyd-sig-") as workdir:
            path = Path(workdir, "manifest.sig")
            path.write_bytes(bytes(signature))
            result = self._gpg.verify_data(str(path), bytes(data),
                                           extra_args=["--logger-file", "/dev/null"])
        return GpgOutput(str(result.stderr or ""), int(result.returncode or 0))

    def decrypt(self, ciphertext: bytes | bytearray) -> SecretBytes:
        """Decrypt with the host's secret key; the plaintext is copied into a SecretBytes."""
        result = self._gpg.decrypt(bytes(ciphertext))
        plain = result.data
        result.data = b""  # drop python-gnupg's reference; the bytes object itself cannot be wiped
        if not result.ok:
            status = result.status or "no status"
            raise BundleRejected(Reason.DECRYPT_FAILED,
                              f"gpg could not decrypt the key file ({status})",
                              fix=f"encrypt key files to a key whose secret part is in {self.home}")
        return SecretBytes(plain)

    def sign_detached(self, data: bytes, keyid: str) -> bytes:
        """A binary detached signature over ``data`` by ``keyid`` (enrollment only)."""
        result = self._gpg.sign(data, keyid=keyid, detach=True, binary=True, clearsign=False)
        if not result.data:
            raise TrustError(Reason.BAD_SIGNATURE, f"gpg could not sign with {keyid}: "
                             f"{result.status or 'no status'}", subject=keyid,
                             fix=f"make sure the secret key {keyid} is in {self.home} "
                                 "(and unlocked in gpg-agent if it has a passphrase)")
        return bytes(result.data)

    def encrypt(self, plain: bytes | bytearray, recipient: str) -> bytes:
        """Encrypt a key to ``recipient`` (binary OpenPGP), for enrollment."""
        result = self._gpg.encrypt(bytes(plain), [recipient], armor=False, always_trust=True)
        if not result.ok:
            raise TrustError(Reason.DECRYPT_FAILED, f"gpg could not encrypt to {recipient}: "
                             f"{result.status or 'no status'}", subject=recipient,
                             fix=f"import the host's public key into {self.home}")
        return bytes(result.data)
