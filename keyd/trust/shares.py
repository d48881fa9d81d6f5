"""k-of-n key sticks: a random master secret split into shares; keys sealed under it.

An enrollment with ``--shares n --threshold k`` draws a 16-byte master secret and
splits it with Shamir's scheme over GF(2^128) (pycryptodome's
``Cryptodome.Protocol.SecretSharing.Shamir``, Debian's python3-pycryptodome):
any k shares give the master back, fewer give nothing about it. Each share goes
to one stick, in a bundle bound to that stick. The volume's keys themselves are
not split: they are sealed (AES-256-GCM) under a key derived from the master with
HKDF-SHA256, and every share stick carries the same sealed copies. So an existing
volume keeps its keyslot or passphrase (the key is wrapped, not replaced), and
combining shares of another enrollment, volume or generation cannot unseal
anything: the derivation binds the enrollment id (``set``), the volume and the
generation, and GCM refuses a wrong key outright.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keyd.trust.errors import BundleRejected, Reason
from keyd.trust.secret import KeySet, SecretBytes

MASTER_BYTES = 16  # what pycryptodome's Shamir splits: one GF(2^128) element
MAX_SHARES = 16
NONCE_BYTES = 12
_INFO = b"keyd k-of-n key wrap v1"


@dataclass(frozen=True)
class ShareSet:
    """Which split a share belongs to: only shares with equal sets ever combine."""

    volume: str
    set_id: str       # the enrollment's id, written on every share of one split
    generation: int
    threshold: int
    count: int


def new_master() -> SecretBytes:
    """A fresh random master secret."""
    return SecretBytes.adopt(bytearray(os.urandom(MASTER_BYTES)))


def split(master: SecretBytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """``count`` shares (index, 16 bytes) of which any ``threshold`` give ``master`` back."""
    from Cryptodome.Protocol.SecretSharing import Shamir  # noqa: PLC0415 (only enroll splits)

    if not 2 <= threshold <= count <= MAX_SHARES:
        raise ValueError(f"need 2 <= threshold <= count <= {MAX_SHARES}")
    return [(int(index), bytes(share))
            for index, share in Shamir.split(threshold, count, bytes(master.buffer), ssss=False)]


def combine(shares: Sequence[tuple[int, bytes | bytearray]]) -> SecretBytes:
    """The master secret from ``threshold`` shares (a wrong mix gives a wrong master)."""
    from Cryptodome.Protocol.SecretSharing import Shamir  # noqa: PLC0415 (first combination)

    return SecretBytes(Shamir.combine([(index, bytes(share)) for index, share in shares],
                                      ssss=False))


def _wrapping_key(master: SecretBytes, shares: ShareSet) -> bytes:
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 (see _aead)
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: PLC0415

    context = b"\0".join([_INFO, shares.volume.encode(), str(shares.generation).encode()])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=shares.set_id.encode(),
                info=context).derive(bytes(master.buffer))


def _aead(master: SecretBytes, shares: ShareSet) -> Any:
    """AES-256-GCM under the split's key. cryptography is loaded here, on the first share,
    not when keyd starts (the daemon imports this module for its data types)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    return AESGCM(_wrapping_key(master, shares))


def _aad(name: str | None) -> bytes:
    return b"key name:" + (name.encode() if name is not None else b"*")


def seal(master: SecretBytes, shares: ShareSet, keys: KeySet) -> dict[str | None, bytes]:
    """Each key sealed under the master: nonce || AES-256-GCM ciphertext, by key name."""
    aead = _aead(master, shares)
    sealed = {}
    for name, secret in keys.items():
        nonce = os.urandom(NONCE_BYTES)
        sealed[name] = nonce + aead.encrypt(nonce, bytes(secret.buffer), _aad(name))
    return sealed


def unseal(master: SecretBytes, shares: ShareSet,
           sealed: Mapping[str | None, bytes | bytearray]) -> KeySet:
    """The keys sealed by :func:`seal`; BundleRejected if the master does not open them."""
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415 (see _aead)

    aead = _aead(master, shares)
    opened: dict[str | None, SecretBytes] = {}
    for name, blob in sealed.items():
        try:
            plain = aead.decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), _aad(name))
        except (InvalidTag, ValueError):
            KeySet(opened).wipe()
            raise BundleRejected(Reason.SHARES_DO_NOT_COMBINE, f"volume {shares.volume}: the "
                                 f"{shares.threshold} shares of set {shares.set_id} do not open "
                                 "its sealed keys", subject=shares.volume,
                                 fix="re-enroll the share sticks together (keydctl enroll "
                                     "--shares)") from None
        opened[name] = SecretBytes.adopt(bytearray(plain))
    return KeySet(opened)
