"""Throwaway GnuPG homes and fast keys, for tests, the benchmark and demos.

Keys are ed25519 (signing) / cv25519 (encryption) without passphrase, made
with ``gpg --quick-gen-key`` in seconds. ``--faked-system-time`` makes keys
that expired long ago, deterministically. Never point this at a real home:
everything here is unprotected.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from keyd.runner import Runner

_BATCH = ("--batch", "--no-tty", "--passphrase", "", "--pinentry-mode", "loopback")


def make_home(path: Path) -> Path:
    """Create an empty GnuPG home (mode 0700) at ``path``."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _gpg(home: Path, *args: str) -> list[str]:
    return ["gpg", "--homedir", str(home), *_BATCH, *args]


def primary_fingerprint(runner: Runner, home: Path, uid: str) -> str:
    """The primary fingerprint of the first key matching ``uid`` in ``home``."""
    out = runner.run(_gpg(home, "--with-colons", "--list-keys", uid)).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def new_key(runner: Runner, home: Path, uid: str, *, usage: str = "sign",
            expire: str = "0", faked_time: str | None = None) -> str:
    """Generate an ed25519 key ``uid`` (usage ``sign`` or ``cert``); return its fingerprint.

    ``faked_time`` (``YYYYMMDDTHHMMSS``) backdates creation, so with a short
    ``expire`` the key is already expired today.
    """
    fake = ["--faked-system-time", f"{faked_time}!"] if faked_time else []
    runner.run(_gpg(home, *fake, "--quick-gen-key", uid, "ed25519", usage, expire))
    return primary_fingerprint(runner, home, uid)


def add_encryption_subkey(runner: Runner, home: Path, fpr: str) -> None:
    """Give key ``fpr`` a cv25519 encryption subkey (a host key for encrypted key files)."""
    runner.run(_gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "0"))


def copy_public(runner: Runner, source: Path, target: Path, fpr: str) -> None:
    """Import the public key ``fpr`` from home ``source`` into home ``target``."""
    armored = runner.run(_gpg(source, "--armor", "--export", fpr)).stdout
    _import_text(runner, target, armored)


def copy_secret(runner: Runner, source: Path, target: Path, fpr: str) -> None:
    """Import the (unprotected) secret key ``fpr`` from ``source`` into ``target``."""
    armored = runner.run(_gpg(source, "--armor", "--export-secret-keys", fpr)).stdout
    _import_text(runner, target, armored)


def revoke_in(runner: Runner, home_with_cert: Path, target: Path, fpr: str) -> None:
    """Import the revocation certificate gpg made for ``fpr`` into ``target``."""
    cert = (home_with_cert / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
    # gpg stores it with a ':' before the armor line so it is not imported by accident.
    _import_text(runner, target, cert.replace(":-----BEGIN PGP PUBLIC KEY BLOCK",
                                              "-----BEGIN PGP PUBLIC KEY BLOCK"))


def _import_text(runner: Runner, home: Path, armored: str) -> None:
    fd, name = tempfile.mkstemp(prefix="import-", dir=home)
    try:
        os.write(fd, armored.encode())
        os.close(fd)
        runner.run(_gpg(home, "--import", name))
    finally:
        os.unlink(name)


def sign(runner: Runner, home: Path, fpr: str, data: bytes,
         faked_time: str | None = None) -> bytes:
    """A binary detached signature over ``data`` by ``fpr`` (optionally at a faked time)."""
    fake = ["--faked-system-time", f"{faked_time}!"] if faked_time else []
    with tempfile.TemporaryDirectory(prefix="sign-", dir=home) as scratch:
        source, target = Path(scratch, "data"), Path(scratch, "data.sig")
        source.write_bytes(data)
        runner.run(_gpg(home, *fake, "--local-user", f"{fpr}!", "--detach-sign",
                        "--output", str(target), str(source)))
        return target.read_bytes()


def stop_agent(runner: Runner, home: Path) -> None:
    """Stop every gpg daemon started for ``home`` so none outlives the test."""
    runner.run(["gpgconf", "--homedir", str(home), "--kill", "all"], ok_codes=(0, 1, 2))
