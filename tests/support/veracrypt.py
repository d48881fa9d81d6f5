"""Write TrueCrypt and VeraCrypt volumes (AES-XTS, PBKDF2) from the published format.

No Debian tool creates VeraCrypt volumes (tcplay writes TrueCrypt ones in the lab), so
the VM tests write their headers here, and the unit tests round-trip keyd's userspace
reader (keyd.crypto.tcrypt) through the same writer. Nothing here calls keyd's code: the
data area is encrypted the obvious way, one cryptography XTS context per 512-byte unit.

Layout (VeraCrypt "Volume Format Specification"; cryptsetup lib/tcrypt/tcrypt.{c,h}):
bytes 0-63 salt (plain), 64-511 encrypted with AES-256-XTS (data unit 0) under the first
64 bytes of PBKDF2-HMAC-PRF(passphrase, salt, iterations). Inside, big-endian: "VERA" (or
"TRUE"), format version 5, minimum program version (VeraCrypt 1.11, TrueCrypt 7.0), CRC-32
of the key area (256-511), hidden volume size (0 unless hidden), volume size, master key
scope offset (the data start) and size, flags, sector size, CRC-32 of bytes 64-251.
Normal header at 0, hidden header at 64 KiB, their backups 128 KiB and 64 KiB before the
end; the data area starts at 128 KiB and ends 128 KiB before the end, and a hidden
volume's data area lies at the end of the outer one's. The XTS tweak of a 512-byte unit
is its sector number on the device. Iterations (cryptsetup's tcrypt_kdf table):
VeraCrypt 500000 (655331 for ripemd160), or 15000 + 1000 * PIM; TrueCrypt 1000 (2000 for
ripemd160).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

DATA_OFFSET = 131072  # header area; the backup header area at the end is as large
HIDDEN_HEADER = 65536
UNIT = 512
_PRFS = {"sha512": hashes.SHA512, "sha256": hashes.SHA256}
_VERSIONS = {b"VERA": 0x010B, b"TRUE": 0x0700}


def iterations(pim: int | None, *, prf: str = "sha512", truecrypt: bool = False) -> int:
    """The PBKDF2 iteration count of a non-system volume."""
    if truecrypt:
        return 2000 if prf == "ripemd160" else 1000
    if pim:
        return 15000 + 1000 * pim
    return 655331 if prf == "ripemd160" else 500000


def derive(passphrase: bytes, salt: bytes, prf: str, count: int) -> bytes:
    """The 64-byte header key."""
    if prf == "ripemd160":
        return hashlib.pbkdf2_hmac("ripemd160", passphrase, salt, count, 64)
    return PBKDF2HMAC(_PRFS[prf](), length=64, salt=salt, iterations=count).derive(passphrase)


def header(passphrase: bytes, volume_size: int, master_keys: bytes, *, prf: str = "sha512",
           pim: int | None = None, salt: bytes | None = None, truecrypt: bool = False,
           data_offset: int = DATA_OFFSET, hidden: bool = False,
           sector_size: int = UNIT) -> bytes:
    """The 512-byte encrypted header of an AES-XTS volume of ``volume_size`` bytes."""
    salt = salt if salt is not None else os.urandom(64)
    magic = b"TRUE" if truecrypt else b"VERA"
    keys = master_keys.ljust(256, b"\0")
    body = magic + struct.pack(">HHI", 5, _VERSIONS[magic], zlib.crc32(keys))
    hidden_size = volume_size if hidden else 0
    body += bytes(16) + struct.pack(">QQQQII", hidden_size, volume_size, data_offset,
                                    volume_size, 0, sector_size)
    body += bytes(120)
    plain = body + struct.pack(">I", zlib.crc32(body)) + keys
    assert len(salt) == 64 and len(plain) == 448
    key = derive(passphrase, salt, prf, iterations(pim, prf=prf, truecrypt=truecrypt))
    encryptor = Cipher(algorithms.AES(key), modes.XTS(bytes(16))).encryptor()
    return salt + encryptor.update(plain) + encryptor.finalize()


def encrypt_data(master_keys: bytes, data: bytes, data_offset: int) -> bytes:
    """``data`` (whole 512-byte units) encrypted as a data area starting at ``data_offset``."""
    aes = algorithms.AES(master_keys[:64])
    out = bytearray()
    for start in range(0, len(data), UNIT):
        tweak = ((data_offset + start) // UNIT).to_bytes(16, "little")
        out += Cipher(aes, modes.XTS(tweak)).encryptor().update(data[start:start + UNIT])
    return bytes(out)


@dataclass(frozen=True)
class Hidden:
    """A hidden volume inside the outer one: its passphrase, size and contents."""

    passphrase: bytes
    size: int
    data: bytes = b""
    prf: str = "sha512"
    pim: int | None = None


def write_volume(image: Path, size: int, passphrase: bytes, *, prf: str = "sha512",
                 pim: int | None = None, truecrypt: bool = False, data: bytes = b"",
                 hidden: Hidden | None = None, backup: bool = True,
                 sector_size: int = UNIT) -> bytes:
    """Make ``image`` (``size`` bytes, sparse) an AES-XTS volume with random master keys:
    ``data`` encrypted at the start of its data area, a backup header (unless ``backup`` is
    false) and, if asked, a hidden volume. Returns the outer volume's master keys."""
    keys = os.urandom(64)
    volume_size = size - 2 * DATA_OFFSET
    places = (0, size - DATA_OFFSET) if backup else (0,)
    with open(image, "r+b" if image.exists() else "wb") as out:
        out.truncate(size)
        for place in places:
            _put(out, place, header(passphrase, volume_size, keys, prf=prf, pim=pim,
                                    truecrypt=truecrypt, sector_size=sector_size))
        _put(out, DATA_OFFSET, encrypt_data(keys, data, DATA_OFFSET))
        if hidden is not None:
            _write_hidden(out, size, hidden, truecrypt, sector_size)
    return keys


def _write_hidden(out: BinaryIO, size: int, hidden: Hidden, truecrypt: bool,
                  sector_size: int) -> None:
    keys = os.urandom(64)
    offset = size - DATA_OFFSET - hidden.size
    for place in (HIDDEN_HEADER, size - HIDDEN_HEADER):
        _put(out, place, header(hidden.passphrase, hidden.size, keys, prf=hidden.prf,
                                pim=hidden.pim, truecrypt=truecrypt, data_offset=offset,
                                hidden=True, sector_size=sector_size))
    _put(out, offset, encrypt_data(keys, hidden.data, offset))


def _put(out: BinaryIO, offset: int, data: bytes) -> None:
    out.seek(offset)
    out.write(data)
