"""Plain dm-crypt keys as cryptsetup makes them (lib/crypt_plain.c)."""

from __future__ import annotations

import hashlib

import pytest
from Cryptodome.Hash import RIPEMD160

from keyd.crypto.errors import PassphraseRejected, UnsupportedHash
from keyd.crypto.plain import plain_key


def test_cryptsetups_own_known_answer() -> None:
    # tests/api-test.c, AddDevicePlain: "blabla" hashed with sha256 for a 256-bit key.
    key = plain_key(b"blabla", 32, "sha256")
    assert key.hex() == "ccadd99b16cd3d200c22d6db45d8b6630ef3d936767127347ec8a76ab992c2ea"


def test_a_key_longer_than_the_digest_continues_with_a_prefixed_passphrase() -> None:
    # Seed 004: `cryptsetup -c aes -h ripemd160 create` with a 256-bit key.
    first = hashlib.new("ripemd160", b"my secret").digest()
    second = hashlib.new("ripemd160", b"Amy secret").digest()
    assert plain_key(b"my secret", 32, "ripemd160") == first + second[:12]
    third = hashlib.sha256(b"AAx").digest()
    expected = hashlib.sha256(b"x").digest() + hashlib.sha256(b"Ax").digest() + third[:8]
    assert plain_key(b"x", 72, "sha256") == expected


def test_a_hash_length_hashes_that_many_bytes_and_zero_pads() -> None:
    assert plain_key(b"x", 32, "sha256:16") == hashlib.sha256(b"x").digest()[:16] + bytes(16)


@pytest.mark.parametrize("raw", [None, "plain"])
def test_without_a_hash_the_key_is_the_first_bytes(raw: str | None) -> None:
    key = plain_key(b"0123456789abcdefXYZ", 16, raw)
    assert key == bytearray(b"0123456789abcdef")
    with pytest.raises(PassphraseRejected, match="8 bytes, 16 needed"):
        plain_key(b"01234567", 16, raw)


@pytest.mark.parametrize(("name", "hashlib_name"), [
    ("sha3-256", "sha3_256"), ("blake2b-512", "blake2b"), ("SHA512", "sha512")])
def test_cryptsetup_hash_names_map_to_hashlib(name: str, hashlib_name: str) -> None:
    assert plain_key(b"pw", 16, name) == hashlib.new(hashlib_name, b"pw").digest()[:16]


# (Not whirlpool: Debian's shared OpenSSL has it once cryptography loads the legacy provider.)
@pytest.mark.parametrize("name", ["md17", "stribog512", "sha256:x", "sha256:33"])
def test_hashes_that_are_missing_or_malformed_are_refused(name: str) -> None:
    with pytest.raises(UnsupportedHash):
        plain_key(b"pw", 32, name)


def test_ripemd160_falls_back_to_cryptodome(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_hash(name: str, *args: object) -> object:
        raise ValueError(f"unsupported hash type {name}")

    monkeypatch.setattr(hashlib, "new", no_such_hash)
    assert plain_key(b"pw", 20, "ripemd160") == RIPEMD160.new(b"pw").digest()
