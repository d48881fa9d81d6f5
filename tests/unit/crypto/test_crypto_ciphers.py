"""dm-crypt's sector ciphers in userspace, against IEEE 1619 vectors and obvious references.

The references build one `cryptography` XTS or CBC object per sector with the IV computed
from dm-crypt's rules written out again (IV sector in 512-byte units plus iv_offset, or in
sector_size units with iv_large_sectors; plain = low 32 bits, plain64; ESSIV = AES-ECB
under sha256(key) of the plain64 IV). Where OpenSSL cannot be the reference (an XTS key
whose halves are equal, AES-192-XTS), XTS is written out block by block.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.crypto.ciphers import (
    SECTOR_SIZES,
    SectorCipher,
    XtsCipher,
    parse_spec,
    sector_cipher,
)
from keyd.crypto.errors import UnsupportedCipher

SPECS = {"aes-xts-plain64": (32, 48, 64), "aes-xts-plain": (64,), "aes-xts-essiv:sha256": (64,),
         "aes-cbc-plain": (16, 32), "aes-cbc-plain64": (16, 24, 32),
         "aes-cbc-essiv:sha256": (16, 32)}
# IEEE 1619-2007 annex B, vector 4: AES-128-XTS, data unit 0, 512 bytes 00..ff twice.
V4_KEY = bytes.fromhex("27182818284590452353602874713526" "31415926535897932384626433832795")
V4_CIPHERTEXT = bytes.fromhex(
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
    "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
    "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
    "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
    "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
    "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
    "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
    "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
    "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
    "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
    "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
    "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
    "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
    "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
    "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568")
# Vectors 1-3 are 32 bytes long: the first two blocks of a sector (XTS blocks depend only
# on their own tweak). (key, data unit, plaintext byte, ciphertext)
SHORT_VECTORS = [
    (bytes(32), 0, 0x00,
     "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
    (bytes.fromhex("11" * 16 + "22" * 16), 0x3333333333, 0x44,
     "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
    (bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0"),
     0x123456789A, 0x44, "b01f86f8edc1863706fa8a4253e34f28af319de38334870f4dd1f94cbe9832f1"),
]


def iv_sector(sector: int, sector_size: int, large: bool, iv_offset: int) -> int:
    units = sector_size // 512
    number = iv_offset + sector * units
    return number // units if large else number


def reference_iv(spec: str, key: bytes, number: int) -> bytes:
    if spec.endswith("-plain"):
        return (number % 2**32).to_bytes(16, "little")
    iv = number.to_bytes(16, "little")
    if spec.endswith("essiv:sha256"):
        salt = hashlib.sha256(key).digest()
        iv = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(iv)
    return iv


def xts_by_hand(key: bytes, tweak: bytes, data: bytes, decrypt: bool) -> bytes:
    """XTS block by block: C = E1(P ^ T) ^ T, T = E2(tweak) * alpha**k."""
    half = len(key) // 2
    ecb = Cipher(algorithms.AES(key[:half]), modes.ECB())
    value = int.from_bytes(
        Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor().update(tweak), "little")
    out = b""
    for start in range(0, len(data), 16):
        mask = value.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(data[start:start + 16], mask, strict=True))
        block = (ecb.decryptor() if decrypt else ecb.encryptor()).update(block)
        out += bytes(a ^ b for a, b in zip(block, mask, strict=True))
        value <<= 1
        if value >> 128:
            value ^= (1 << 128) | 0x87
    return out


def reference(spec: str, key: bytes, sector: int, data: bytes, *, sector_size: int = 512,
              large: bool = False, iv_offset: int = 0, decrypt: bool = True) -> bytes:
    """One cryptography object per sector, the obvious way."""
    out = b""
    for index in range(len(data) // sector_size):
        chunk = data[index * sector_size:(index + 1) * sector_size]
        iv = reference_iv(spec, key, iv_sector(sector + index, sector_size, large, iv_offset))
        if "-xts-" in spec and (len(key) == 48 or key[:len(key) // 2] == key[len(key) // 2:]):
            out += xts_by_hand(key, iv, chunk, decrypt)
            continue
        mode = modes.XTS(iv) if "-xts-" in spec else modes.CBC(iv)
        cipher = Cipher(algorithms.AES(key), mode)
        out += (cipher.decryptor() if decrypt else cipher.encryptor()).update(chunk)
    return out


@st.composite
def setups(draw: st.DrawFn) -> tuple[str, bytes, int, bool, int]:
    spec = draw(st.sampled_from(sorted(SPECS)))
    key = draw(st.binary(min_size=64, max_size=64))[:draw(st.sampled_from(SPECS[spec]))]
    sector_size = draw(st.sampled_from(SECTOR_SIZES))
    large = draw(st.booleans())
    units = sector_size // 512
    # Near 2**32 IV sectors too, where plain and plain64 part.
    iv_offset = draw(st.sampled_from([0, 8, 2**32 - 64, 2**40])) * (units if large else 1)
    return spec, key, sector_size, large, iv_offset


@settings(max_examples=150)
@given(setup=setups(), sector=st.integers(0, 2**33), count=st.integers(0, 40),
       seed=st.integers(0, 2**32))
def test_a_cipher_matches_the_per_sector_reference_both_ways(
        setup: tuple[str, bytes, int, bool, int], sector: int, count: int, seed: int) -> None:
    spec, key, sector_size, large, iv_offset = setup
    plain = random.Random(seed).randbytes(count * sector_size)  # too big to draw as binary
    cipher = sector_cipher(spec, key, sector_size=sector_size, iv_large_sectors=large,
                           iv_offset=iv_offset)
    encrypted = cipher.encrypt(sector, plain)
    assert encrypted == reference(spec, key, sector, plain, sector_size=sector_size,
                                  large=large, iv_offset=iv_offset, decrypt=False)
    assert cipher.decrypt(sector, encrypted) == plain
    assert cipher.decrypt(sector, plain) == reference(spec, key, sector, plain,
                                                      sector_size=sector_size, large=large,
                                                      iv_offset=iv_offset)


@settings(max_examples=60)
@given(setup=setups(), sector=st.integers(0, 2**20), count=st.integers(1, 40),
       decrypt=st.booleans())
def test_a_call_over_many_sectors_is_the_concatenation_of_single_sector_calls(
        setup: tuple[str, bytes, int, bool, int], sector: int, count: int,
        decrypt: bool) -> None:
    spec, key, sector_size, large, iv_offset = setup
    cipher = sector_cipher(spec, key, sector_size=sector_size, iv_large_sectors=large,
                           iv_offset=iv_offset)
    run = cipher.decrypt if decrypt else cipher.encrypt
    data = os.urandom(count * sector_size)
    singles = b"".join(run(sector + i, data[i * sector_size:(i + 1) * sector_size])
                       for i in range(count))
    assert run(sector, data) == singles


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("decrypt", [True, False])
def test_buffers_larger_than_one_batch_match_the_reference(spec: str, decrypt: bool) -> None:
    key = os.urandom(max(SPECS[spec]))
    data = os.urandom(2100 * 512)  # more than the XTS tweak-stream and CBC chunks
    cipher = sector_cipher(spec, key, iv_offset=256)
    run = cipher.decrypt if decrypt else cipher.encrypt
    assert run(7, data) == reference(spec, key, 7, data, iv_offset=256, decrypt=decrypt)


@pytest.mark.parametrize("count", [1, 16, 40])  # one OpenSSL call per sector, and the stream
def test_ieee_1619_vector_4_in_sector_0(count: int) -> None:
    cipher = sector_cipher("aes-xts-plain64", V4_KEY)
    plain = bytes(range(256)) * 2
    assert cipher.encrypt(0, plain * count)[:512] == V4_CIPHERTEXT
    assert cipher.decrypt(0, V4_CIPHERTEXT) == plain


@pytest.mark.parametrize(("key", "unit", "fill", "expected"), SHORT_VECTORS)
@pytest.mark.parametrize("count", [1, 16])
def test_ieee_1619_vectors_1_to_3_are_a_sectors_first_two_blocks(
        key: bytes, unit: int, fill: int, expected: str, count: int) -> None:
    # Vector 1's key halves are equal: OpenSSL refuses it, the tweak stream does it.
    cipher = sector_cipher("aes-xts-plain64", key)
    data = bytes([fill]) * 512 * count
    assert cipher.encrypt(unit, data)[:32].hex() == expected


def test_plain_keeps_the_low_32_bits_of_the_iv_sector_and_plain64_all_64() -> None:
    key = os.urandom(32)
    data = os.urandom(512)
    wrapped = sector_cipher("aes-cbc-plain", key).encrypt(2**32 + 5, data)
    assert wrapped == sector_cipher("aes-cbc-plain", key).encrypt(5, data)
    assert wrapped != sector_cipher("aes-cbc-plain64", key).encrypt(2**32 + 5, data)


def test_essiv_iv_is_aes_of_the_sector_under_the_sha256_of_the_key() -> None:
    key = bytes(range(32))
    salt = hashlib.sha256(key).digest()
    iv = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update((9).to_bytes(16, "little"))
    plain = bytes(512)
    expected = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor().update(plain)
    assert sector_cipher("aes-cbc-essiv:sha256", key).encrypt(9, plain) == expected


@pytest.mark.parametrize(("large", "iv"), [(False, 64 + 3 * 8), (True, 8 + 3)])
def test_iv_sectors_count_512_byte_units_unless_large(large: bool, iv: int) -> None:
    key = os.urandom(64)
    cipher = sector_cipher("aes-xts-plain64", key, sector_size=4096, iv_large_sectors=large,
                           iv_offset=64)
    plain = os.urandom(4096)
    tweak = iv.to_bytes(16, "little")
    expected = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor().update(plain)
    assert cipher.encrypt(3, plain) == expected


def test_aes_192_xts_is_supported_without_openssl() -> None:
    key = os.urandom(48)
    data = os.urandom(3 * 4096)
    cipher = sector_cipher("aes-xts-plain64", key, sector_size=4096)
    assert cipher.decrypt(2, data) == reference("aes-xts-plain64", key, 2, data,
                                                sector_size=4096)


def test_the_cipher_is_a_sector_cipher_and_wipe_zeroes_its_keys() -> None:
    cipher = sector_cipher("aes-xts-essiv:sha256", bytes(range(64)))
    assert isinstance(cipher, XtsCipher)
    as_protocol: SectorCipher = cipher
    assert as_protocol.sector_size == 512
    cipher.wipe()
    assert cipher.key == bytes(64) and cipher.data_key == bytes(32)
    assert cipher.tweak_key == bytes(32)
    assert "essiv" in repr(cipher) and "00" not in repr(cipher)


@pytest.mark.parametrize(("spec", "canonical"), [
    ("aes", "aes-cbc-plain"), ("aes-plain", "aes-cbc-plain"),
    ("aes-xts-plain64", "aes-xts-plain64"), ("aes-cbc-essiv:sha256", "aes-cbc-essiv:sha256")])
def test_specs_parse_as_cryptsetup_spells_them(spec: str, canonical: str) -> None:
    assert str(parse_spec(spec)) == canonical


@pytest.mark.parametrize(("spec", "why"), [
    ("serpent-xts-plain64", "AES in XTS and CBC"), ("aes-lrw-benbi", "AES in XTS and CBC"),
    ("aes-xts-benbi", "IV generator"), ("aes-cbc-essiv:sha1", "sha256 only"),
    ("aes-cbc-essiv", "IV generator"), ("aes-xts", "cipher-mode-iv"),
    ("capi:xts(aes)-plain64", "cipher-mode-iv")])
def test_unsupported_specs_are_refused_with_the_kernel_as_the_fix(spec: str, why: str) -> None:
    with pytest.raises(UnsupportedCipher, match=why) as caught:
        sector_cipher(spec, bytes(64))
    assert caught.value.subject == spec


@pytest.mark.parametrize(("spec", "key", "sector_size", "large", "iv_offset"), [
    ("aes-xts-plain64", 16, 512, False, 0), ("aes-cbc-plain", 64, 512, False, 0),
    ("aes-xts-plain64", 64, 8192, False, 0), ("aes-xts-plain64", 64, 4096, True, 4),
    ("aes-xts-plain64", 64, 512, False, -1)])
def test_keys_and_geometry_dm_crypt_refuses_are_refused(
        spec: str, key: int, sector_size: int, large: bool, iv_offset: int) -> None:
    with pytest.raises(UnsupportedCipher):
        sector_cipher(spec, bytes(key), sector_size=sector_size, iv_large_sectors=large,
                      iv_offset=iv_offset)


def test_partial_sectors_are_a_programming_error() -> None:
    cipher = sector_cipher("aes-xts-plain64", os.urandom(64))
    with pytest.raises(ValueError, match="whole 512-byte sectors"):
        cipher.decrypt(0, bytes(100))
    with pytest.raises(ValueError, match="sector index"):
        cipher.encrypt(-1, bytes(512))
