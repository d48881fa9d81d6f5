"""Real TrueCrypt and VeraCrypt images, made by those programs (cryptsetup's test images).

cryptsetup's tests/tcrypt-compat-test opens each image and checks the file system inside
with blkid: UUID DEAD-BABE, CAFE-BABE in hidden volumes. Those are FAT12 volume serial
numbers, so the same check here reads the decrypted boot sector; the reserved sector after
it must decrypt to zeros and the two FAT copies to the same bytes, which checks the IVs of
the sectors after the first. Most images are opened with the PRF pinned, as the compat
test does, to keep PBKDF2 (up to 655331 iterations) to one run each. See
tests/data/tcrypt/README.md for where the images come from.
"""

from __future__ import annotations

import io
import lzma
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyd.crypto import tcrypt
from keyd.crypto.errors import PassphraseRejected, UnsupportedCipher, UnsupportedHash
from keyd.crypto.tcrypt import TcryptOptions, TcryptVolume, data_cipher, read_volume

IMAGES = Path(__file__).resolve().parents[2] / "data" / "tcrypt"
# tcrypt-compat-test's PASSWORD, PASSWORD_HIDDEN and PASSWORD_PIM
PASSWORD = b"aaaaaaaaaaaa"
PASSWORD_HIDDEN = b"bbbbbbbbbbbb"
PASSWORD_PIM = b"cccccccccccccccccccc"
TRUECRYPT = TcryptOptions(veracrypt=False)


def image(name: str) -> io.BytesIO:
    """One vendored image, decompressed in memory."""
    return io.BytesIO(lzma.decompress((IMAGES / f"{name}.xz").read_bytes()))


@dataclass(frozen=True)
class Case:
    """An image, how it is opened, and what its header must say."""

    image: str
    passphrase: bytes
    options: TcryptOptions
    expected: TcryptVolume

    def __str__(self) -> str:
        return f"{self.image}:{self.expected.header_offset}"


def volume(magic: str, version: int, prf: str, iterations: int, *, header: int = 0,
           data: int = 131072, size: int = 36864, hidden: bool = False) -> TcryptVolume:
    return TcryptVolume(magic=magic, version=version, prf=prf, iterations=iterations,
                        cipher="aes-xts-plain64", header_offset=header, data_offset=data,
                        size=size, sector_size=512, hidden=hidden, iv_offset=data // 512)


HIDDEN = TcryptOptions(veracrypt=False, hidden=True)
CASES = [
    # TrueCrypt 5 (header version 3): no header CRC, data right after the header, the
    # hidden header 1536 bytes before the end and the hidden data placed from its size.
    Case("tc_3-sha512-xts-aes", PASSWORD, TRUECRYPT,
         volume("TRUE", 3, "sha512", 1000, data=512, size=18944)),
    Case("tc_3-sha512-xts-aes-hidden", PASSWORD_HIDDEN, HIDDEN,
         volume("TRUE", 3, "sha512", 1000, header=39424, data=19968, size=19456, hidden=True)),
    # TrueCrypt 6 and 7 (versions 4 and 5): 128 KiB header areas at both ends.
    Case("tc_4-sha512-xts-aes", PASSWORD, TRUECRYPT,
         volume("TRUE", 4, "sha512", 1000, size=19456)),
    Case("tc_5-ripemd160-xts-aes", PASSWORD, TRUECRYPT, volume("TRUE", 5, "ripemd160", 2000)),
    Case("tc_5-sha512-xts-aes-hidden", PASSWORD, TRUECRYPT,
         volume("TRUE", 5, "sha512", 1000, size=86016)),
    Case("tc_5-sha512-xts-aes-hidden", PASSWORD, TcryptOptions(veracrypt=False,
                                                              backup_header=True),
         volume("TRUE", 5, "sha512", 1000, header=348160 - 131072, size=86016)),
    Case("tc_5-sha512-xts-aes-hidden", PASSWORD_HIDDEN, HIDDEN,
         volume("TRUE", 5, "sha512", 1000, header=65536, data=176128, hidden=True)),
    Case("tc_5-sha512-xts-aes-hidden", PASSWORD_HIDDEN,
         TcryptOptions(veracrypt=False, hidden=True, backup_header=True),
         volume("TRUE", 5, "sha512", 1000, header=348160 - 65536, data=176128, hidden=True)),
    # VeraCrypt 1.x, PRF pinned as tcrypt-compat-test does.
    Case("vc_1-sha512-xts-aes", PASSWORD, TcryptOptions(hash="sha512"),
         volume("VERA", 5, "sha512", 500000)),
    Case("vc_1-sha256-xts-aes", PASSWORD, TcryptOptions(hash="sha256"),
         volume("VERA", 5, "sha256", 500000)),
    Case("vc_1-ripemd160-xts-aes", PASSWORD, TcryptOptions(hash="ripemd160"),
         volume("VERA", 5, "ripemd160", 655331)),
    Case("vc_1-blake2s-xts-aes", PASSWORD, TcryptOptions(hash="blake2s-256"),
         volume("VERA", 5, "blake2s", 500000)),
    Case("vc_1-sha512-xts-aes-hidden", PASSWORD_HIDDEN, TcryptOptions(hidden=True,
                                                                     hash="sha512"),
         volume("VERA", 5, "sha512", 500000, header=65536, data=165888, size=47104,
                hidden=True)),
    Case("vcpim_1_1234-sha256-xts-aes", PASSWORD_PIM, TcryptOptions(pim=1234, hash="sha256"),
         volume("VERA", 5, "sha256", 15000 + 1000 * 1234)),
]


def fat_serial(boot: bytes) -> str:
    """A FAT12/16 volume serial number as blkid prints it (its UUID)."""
    serial = struct.unpack_from("<I", boot, 39)[0]
    return f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_real_image_header_and_file_system_are_what_cryptsetup_finds(case: Case) -> None:
    source = image(case.image)
    found, key = read_volume(source, case.passphrase, case.options)
    assert found == case.expected
    assert len(key) == 64
    start = found.data_offset
    sectors = data_cipher(found, key).decrypt(0, source.getvalue()[start:start + 2048])
    boot, reserved, fat1, fat2 = (sectors[i:i + 512] for i in range(0, 2048, 512))
    assert fat_serial(boot) == ("CAFE-BABE" if found.hidden else "DEAD-BABE")
    assert boot[54:62] == b"FAT12   " and boot[510:] == b"\x55\xaa"
    assert struct.unpack_from("<H", boot, 19)[0] * 512 <= found.size  # FAT12 total sectors
    assert reserved == bytes(512)
    assert fat1 == fat2 and fat1.startswith(b"\xf8\xff\xff")


@pytest.fixture
def kdf_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The PRFs PBKDF2 runs with, in order."""
    runs: list[str] = []
    real = tcrypt.pbkdf2

    def counting(prf: str, password: bytes | bytearray, salt: bytes, iterations: int,
                 out: bytearray) -> None:
        runs.append(prf)
        real(prf, password, salt, iterations, out)

    monkeypatch.setattr(tcrypt, "pbkdf2", counting)
    yield runs


def test_without_a_pinned_hash_veracrypt_prfs_are_tried_in_cryptsetups_order(
        kdf_runs: list[str]) -> None:
    found, _ = read_volume(image("vc_1-sha256-xts-aes"), PASSWORD)
    assert found.prf == "sha256"
    assert kdf_runs == ["ripemd160", "sha512", "sha512", "sha256"]


def test_a_preferred_prf_is_tried_first(kdf_runs: list[str]) -> None:
    found, _ = read_volume(image("vc_1-sha256-xts-aes"), PASSWORD,
                           TcryptOptions(prefer="sha256"))
    assert (found.prf, kdf_runs) == ("sha256", ["sha256"])


def test_truecrypt_mode_does_not_open_a_veracrypt_volume() -> None:
    with pytest.raises(PassphraseRejected) as caught:
        read_volume(image("vc_1-sha512-xts-aes"), PASSWORD, TRUECRYPT)
    assert caught.value.tried == ("ripemd160", "sha512")


def test_a_wrong_passphrase_is_rejected_naming_the_prfs_tried() -> None:
    with pytest.raises(PassphraseRejected) as caught:
        read_volume(image("tc_5-ripemd160-xts-aes"), PASSWORD_HIDDEN, TRUECRYPT)
    assert "tried PRFs ripemd160, sha512; not tried: whirlpool" in caught.value.message
    assert caught.value.subject == "the volume"  # a file object without a name


def test_a_cascade_cannot_be_told_from_a_wrong_passphrase_and_says_so() -> None:
    with pytest.raises(PassphraseRejected) as caught:
        read_volume(image("tc_5-sha512-xts-serpent-twofish-aes"), PASSWORD, TRUECRYPT)
    assert "AES-XTS" in caught.value.message
    assert caught.value.fix is not None and "cascade" in caught.value.fix
    assert 'backend = "kernel"' in caught.value.fix


def test_a_pinned_cascade_is_refused_before_any_pbkdf2(kdf_runs: list[str]) -> None:
    options = TcryptOptions(veracrypt=False, cipher="serpent-twofish-aes")
    with pytest.raises(UnsupportedCipher, match="only AES-XTS"):
        read_volume(image("tc_5-sha512-xts-serpent-twofish-aes"), PASSWORD, options)
    assert kdf_runs == []


def test_whirlpool_is_named_as_not_tried_and_refused_when_pinned() -> None:
    with pytest.raises(PassphraseRejected) as caught:
        read_volume(image("tc_5-whirlpool-xts-aes"), PASSWORD, TRUECRYPT)
    assert caught.value.not_tried == ("whirlpool",)
    with pytest.raises(UnsupportedHash, match="Whirlpool"):
        read_volume(image("tc_5-whirlpool-xts-aes"), PASSWORD,
                    TcryptOptions(veracrypt=False, hash="whirlpool"))


def test_unknown_hash_and_cipher_pins_fail_as_in_tcrypt_compat_test() -> None:
    with pytest.raises(UnsupportedHash, match="not a TrueCrypt/VeraCrypt PRF"):
        read_volume(image("tc_4-sha512-xts-aes"), PASSWORD, TcryptOptions(hash="xxxx"))
    with pytest.raises(UnsupportedCipher):
        read_volume(image("tc_4-sha512-xts-aes"), PASSWORD, TcryptOptions(cipher="xxx"))


def test_every_vendored_image_is_described_in_the_readme() -> None:
    readme = (IMAGES / "README.md").read_text()
    names = sorted(path.name.removesuffix(".xz") for path in IMAGES.glob("*.xz"))
    assert names and all(f"`{name}`" in readme for name in names)
