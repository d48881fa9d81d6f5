"""The key of a plain dm-crypt volume, as cryptsetup makes it from the bytes it reads.

Plain mode stores nothing on disk, so the key must come out exactly as cryptsetup's
(lib/crypt_plain.c, crypt_plain_hash): without a hash (keyd's "raw key", cryptsetup's
``--hash plain``) it is the first ``key_size`` bytes read; with ``--hash NAME`` it is
NAME(passphrase), and when the key is longer than the digest, NAME("A" + passphrase),
NAME("AA" + passphrase)... appended until it is long enough (a trick from hashalot to
avoid zero bytes); ``NAME:N`` hashes only N bytes and pads the rest of the key with
zeros. Which bytes are "read" (one line of a passphrase, a key file's first bytes after
``keyfile_offset``) is the caller's business: keyd.adapters.cryptsetup.shape_key.
The key is returned in a bytearray for the caller to zero; hashlib's digests are
immutable bytes that Python frees but cannot zero (best effort).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from Cryptodome.Hash import RIPEMD160

from keyd.crypto.errors import PassphraseRejected, UnsupportedHash

RAW = "plain"  # cryptsetup's name for "no hash"
# cryptsetup's names (its crypto backend's) where hashlib spells them differently
_HASHLIB_NAMES = {"sha3-224": "sha3_224", "sha3-256": "sha3_256", "sha3-384": "sha3_384",
                  "sha3-512": "sha3_512", "blake2b-512": "blake2b", "blake2s-256": "blake2s"}


class _Hash(Protocol):
    def update(self, data: bytes | bytearray, /) -> object: ...

    def digest(self) -> bytes: ...


def plain_key(secret: bytes | bytearray, key_size: int, hash_name: str | None) -> bytearray:
    """The ``key_size``-byte volume key from ``secret``: its first bytes when ``hash_name``
    is None or "plain", else cryptsetup's ``--hash`` of it (``"sha256"``, ``"sha256:16"``)."""
    name, _, length = (hash_name or RAW).partition(":")
    size = _hashed_size(hash_name or RAW, length, key_size)
    if name == RAW:
        if len(secret) < size:
            raise PassphraseRejected(f"the raw key is {len(secret)} bytes, {size} needed",
                                     subject="plain key",
                                     fix="supply the original key (its first bytes are the key)")
        key = bytearray(secret[:size])
    else:
        key = hashed(name, secret, size)
    key.extend(bytes(key_size - size))
    return key


def _hashed_size(hash_name: str, length: str, key_size: int) -> int:
    if not length:
        return key_size
    if not length.isdigit() or int(length) > key_size:
        raise UnsupportedHash(hash_name, f"the length after ':' must be a number of bytes up "
                                         f"to the key size ({key_size})", fix=None)
    return int(length)


def hashed(name: str, secret: bytes | bytearray, size: int) -> bytearray:
    """``size`` bytes of NAME(secret) || NAME("A" + secret) || NAME("AA" + secret)..."""
    key = bytearray()
    rounds = 0
    while len(key) < size:
        digest = new_hash(name)
        digest.update(b"A" * rounds)
        digest.update(secret)
        key += digest.digest()[:size - len(key)]
        rounds += 1
    return key


def new_hash(name: str) -> _Hash:
    """A fresh hash object for a cryptsetup hash name; RIPEMD-160 also where OpenSSL lacks it."""
    lowered = name.lower()
    try:
        return hashlib.new(_HASHLIB_NAMES.get(lowered, lowered))
    except ValueError:
        # OpenSSL 3.0.0-3.0.6 keep RIPEMD-160 in the legacy provider, unloaded by default.
        if lowered == "ripemd160":
            return RIPEMD160.new()
    raise UnsupportedHash(name, "neither hashlib nor Cryptodome provides this hash here")
