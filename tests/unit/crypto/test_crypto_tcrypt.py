"""The TrueCrypt/VeraCrypt reader: PBKDF2 plans, refusals, and round trips through the
header writer that the VM tests use (tests/support/veracrypt.py), which encrypts its data
area without keyd's code. PIMs and TrueCrypt's counts keep PBKDF2 to milliseconds."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from keyd.crypto import tcrypt
from keyd.crypto.errors import (
    HeaderDamaged,
    HeaderUnreadable,
    PassphraseRejected,
    UnsupportedHash,
    UnsupportedVolume,
)
from keyd.crypto.tcrypt import Kdf, TcryptOptions, data_cipher, kdf_plan, read_volume
from tests.support import veracrypt

SIZE = 512 * 1024
PASSPHRASE = b"correct horse battery staple"
HIDDEN_PASSPHRASE = b"the other one"
PAYLOAD = os.urandom(8 * 4096)


def read_data(path: Path, options: TcryptOptions, passphrase: bytes, length: int) -> bytes:
    found, key = read_volume(path, passphrase, options)
    raw = path.read_bytes()[found.data_offset:found.data_offset + length]
    return data_cipher(found, key).decrypt(0, raw)


@pytest.fixture
def vera(tmp_path: Path) -> Path:
    """A VeraCrypt volume (sha256, PIM 1) with a hidden one (sha512, PIM 2) inside."""
    image = tmp_path / "vera.img"
    hidden = veracrypt.Hidden(HIDDEN_PASSPHRASE, 64 * 1024, PAYLOAD[::-1], pim=2)
    veracrypt.write_volume(image, SIZE, PASSPHRASE, prf="sha256", pim=1, data=PAYLOAD,
                           hidden=hidden)
    return image


@pytest.mark.parametrize("backup", [False, True])
def test_veracrypt_volume_with_pim_round_trips(vera: Path, backup: bool) -> None:
    options = TcryptOptions(pim=1, backup_header=backup)
    found, key = read_volume(vera, PASSPHRASE, options)
    assert (found.magic, found.prf, found.iterations) == ("VERA", "sha256", 16000)
    assert found.header_offset == (SIZE - 131072 if backup else 0)
    assert (found.data_offset, found.size, found.iv_offset) == (131072, SIZE - 262144, 256)
    assert read_data(vera, options, PASSPHRASE, len(PAYLOAD)) == PAYLOAD
    key[:] = bytes(len(key))  # the caller's to wipe


@pytest.mark.parametrize("backup", [False, True])
def test_hidden_veracrypt_volume_round_trips(vera: Path, backup: bool) -> None:
    options = TcryptOptions(hidden=True, backup_header=backup, pim=2, hash="sha512")
    found, _ = read_volume(vera, HIDDEN_PASSPHRASE, options)
    assert found.hidden and found.size == 64 * 1024
    assert found.data_offset == SIZE - 131072 - 64 * 1024
    assert found.header_offset == (SIZE - 65536 if backup else 65536)
    assert read_data(vera, options, HIDDEN_PASSPHRASE, len(PAYLOAD)) == PAYLOAD[::-1]


@pytest.mark.parametrize("prf", ["sha512", "ripemd160"])
def test_truecrypt_volume_round_trips_in_both_modes(tmp_path: Path, prf: str) -> None:
    image = tmp_path / "tc.img"
    veracrypt.write_volume(image, SIZE, PASSPHRASE, prf=prf, truecrypt=True, data=PAYLOAD)
    for options in (TcryptOptions(veracrypt=False), TcryptOptions(hash=prf)):
        found, _ = read_volume(image, PASSPHRASE, options)
        assert (found.magic, found.prf) == ("TRUE", prf)
        assert read_data(image, options, PASSPHRASE, len(PAYLOAD)) == PAYLOAD


def test_a_4k_sector_volume_still_encrypts_in_512_byte_units(tmp_path: Path) -> None:
    image = tmp_path / "4k.img"
    veracrypt.write_volume(image, SIZE, PASSPHRASE, pim=1, data=PAYLOAD, sector_size=4096)
    found, key = read_volume(image, PASSPHRASE, TcryptOptions(pim=1, hash="sha512"))
    assert found.sector_size == 4096
    assert data_cipher(found, key).sector_size == 512
    assert read_data(image, TcryptOptions(pim=1), PASSPHRASE, len(PAYLOAD)) == PAYLOAD


def test_a_damaged_header_is_told_apart_and_the_backup_opens(tmp_path: Path) -> None:
    image = tmp_path / "damaged.img"
    veracrypt.write_volume(image, SIZE, PASSPHRASE, truecrypt=True)
    with open(image, "r+b") as volume:
        volume.seek(64 + 3 * 16)  # an encrypted block of the header fields, not the magic's
        volume.write(bytes(16))
    options = TcryptOptions(veracrypt=False)
    with pytest.raises(HeaderDamaged, match="CRC-32") as caught:
        read_volume(image, PASSPHRASE, options)
    assert caught.value.fix is not None and "backup" in caught.value.fix
    found, _ = read_volume(image, PASSPHRASE, TcryptOptions(veracrypt=False,
                                                            backup_header=True))
    assert found.header_offset == SIZE - 131072


def test_a_data_area_past_the_end_of_the_device_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "cut.img"
    veracrypt.write_volume(image, SIZE, PASSPHRASE, truecrypt=True, backup=False)
    os.truncate(image, SIZE - 131072 - 4096)  # into the data area
    with pytest.raises(HeaderDamaged, match="cannot hold"):
        read_volume(image, PASSPHRASE, TcryptOptions(veracrypt=False))


@pytest.mark.parametrize("options", [TcryptOptions(), TcryptOptions(backup_header=True),
                                     TcryptOptions(hidden=True)])
def test_a_device_too_small_for_the_header_is_unreadable(options: TcryptOptions) -> None:
    with pytest.raises(HeaderUnreadable, match="too small"):
        read_volume(io.BytesIO(bytes(500)), PASSPHRASE, options)


def test_a_missing_device_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(HeaderUnreadable, match="cannot open") as caught:
        read_volume(tmp_path / "absent", PASSPHRASE)
    assert caught.value.subject == str(tmp_path / "absent")


def test_passphrases_longer_than_the_programs_take_are_rejected(vera: Path) -> None:
    with pytest.raises(PassphraseRejected, match="longer than the 64"):
        read_volume(vera, bytes(65), TcryptOptions(veracrypt=False))
    with pytest.raises(PassphraseRejected, match="longer than the 128"):
        read_volume(vera, bytes(129), TcryptOptions(pim=1))


def test_a_veracrypt_passphrase_may_be_longer_than_64_bytes(tmp_path: Path) -> None:
    image = tmp_path / "long.img"
    veracrypt.write_volume(image, SIZE, b"x" * 100, pim=1)
    assert read_volume(image, b"x" * 100, TcryptOptions(pim=1))[0].magic == "VERA"


def test_system_encryption_and_keyfiles_are_refused_naming_the_way_out(vera: Path) -> None:
    with pytest.raises(UnsupportedVolume, match="system encryption") as caught:
        read_volume(vera, PASSPHRASE, TcryptOptions(system=True))
    assert caught.value.fix is not None and 'backend = "kernel"' in caught.value.fix
    with pytest.raises(UnsupportedVolume, match="keyfiles"):
        read_volume(vera, PASSPHRASE, keyfiles=[b"keyfile"])


def test_truecrypt_tries_its_own_counts_in_cryptsetups_order() -> None:
    plan = kdf_plan(TcryptOptions(veracrypt=False))
    assert plan.attempts == (Kdf("ripemd160", 2000), Kdf("sha512", 1000))
    assert plan.not_tried == ("whirlpool",)
    assert plan.rounds == 2000 * 4 + 1000


def test_veracrypt_tries_truecrypt_then_veracrypt_counts() -> None:
    plan = kdf_plan(TcryptOptions())
    assert plan.attempts == (Kdf("ripemd160", 2000), Kdf("sha512", 1000),
                             Kdf("sha512", 500000), Kdf("sha256", 500000),
                             Kdf("blake2s", 500000), Kdf("ripemd160", 655331))
    assert plan.not_tried == ("whirlpool", "argon2id", "streebog")


def test_a_pim_tries_only_veracrypt_counts_scaled_by_it() -> None:
    plan = kdf_plan(TcryptOptions(pim=10))
    assert {kdf.iterations for kdf in plan.attempts} == {25000}
    assert [kdf.prf for kdf in plan.attempts] == ["sha512", "sha256", "blake2s", "ripemd160"]


def test_system_plans_include_the_boot_counts() -> None:
    plan = kdf_plan(TcryptOptions(system=True, pim=3, hash="sha256"))
    assert plan.attempts == (Kdf("sha256", 18000), Kdf("sha256", 3 * 2048))


def test_hash_pins_narrow_and_prefer_reorders() -> None:
    assert kdf_plan(TcryptOptions(hash="sha512")).attempts == (Kdf("sha512", 1000),
                                                                Kdf("sha512", 500000))
    preferred = kdf_plan(TcryptOptions(prefer="ripemd160")).attempts
    assert [kdf.prf for kdf in preferred[:2]] == ["ripemd160", "ripemd160"]


@pytest.mark.parametrize(("options", "why"), [
    (TcryptOptions(hash="whirlpool"), "Whirlpool"), (TcryptOptions(hash="stribog512"), "Streebog"),
    (TcryptOptions(hash="argon2id"), "Argon2id"), (TcryptOptions(hash="md5"), "not a"),
    (TcryptOptions(veracrypt=False, hash="sha256"), "no TrueCrypt volume")])
def test_pinned_hashes_that_cannot_work_are_refused(options: TcryptOptions, why: str) -> None:
    with pytest.raises(UnsupportedHash, match=why):
        kdf_plan(options)


def test_pbkdf2_matches_hashlib_with_and_without_in_place_derivation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    salt = os.urandom(64)
    for prf in ("sha512", "sha256", "blake2s", "ripemd160"):
        out = bytearray(64)
        tcrypt.pbkdf2(prf, b"pw", salt, 3, out)
        assert out == hashlib.pbkdf2_hmac(prf, b"pw", salt, 3, 64)
    monkeypatch.setattr(tcrypt, "PBKDF2HMAC", object)  # cryptography < 47: no derive_into
    old = bytearray(64)
    tcrypt.pbkdf2("sha512", b"pw", salt, 3, old)
    assert old == hashlib.pbkdf2_hmac("sha512", b"pw", salt, 3, 64)


def test_ripemd160_falls_back_to_cryptodome_where_openssl_lacks_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    salt = os.urandom(64)
    expected = hashlib.pbkdf2_hmac("ripemd160", b"pw", salt, 5, 64)

    def no_ripemd(name: str, *args: object) -> bytes:
        raise ValueError(f"unsupported hash type {name}")

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", no_ripemd)
    out = bytearray(64)
    tcrypt.pbkdf2("ripemd160", b"pw", salt, 5, out)
    assert out == expected
