"""TrueCrypt and VeraCrypt volume headers: find one, decrypt it, read the data area's geometry.

What cryptsetup's TCRYPT support does (lib/tcrypt/tcrypt.{c,h}), for the AES-XTS volumes
that keyd can decrypt in userspace. A header is 512 bytes: a 64-byte salt, then 448 bytes
encrypted with AES-256-XTS (data unit 0) under the first 64 bytes of
PBKDF2-HMAC-PRF(passphrase, salt). The PRF is not recorded, so each (PRF, iteration count)
of cryptsetup's table is tried in its order until the plaintext starts with "TRUE" (or
"VERA" for VeraCrypt) and the CRC-32 of the key area matches (and, from header version 4,
the CRC-32 of the header fields). Normal headers sit at byte 0, hidden ones at 64 KiB (or,
from TrueCrypt before 6.0, 1536 bytes before the end), backups 128 KiB and 64 KiB before
the end. The data area is encrypted in 512-byte XTS units whatever the volume's sector
size (VeraCrypt's ENCRYPTION_DATA_UNIT_SIZE; cryptsetup maps it with 512-byte dm-crypt
sectors), with IV sector = the unit's position on the device in 512-byte sectors.

Refused, with the fix (the kernel backend, where cryptsetup does all of it): cipher chains
other than AES, which cannot be told from a wrong passphrase without implementing them;
the PRFs whirlpool, streebog and argon2id, which no library here provides; keyfiles;
system encryption, whose offsets depend on the partition table. Each PBKDF2 run costs
hundreds of milliseconds at VeraCrypt's counts, so :func:`kdf_plan` exposes the attempts
and a layer's ``hash`` (or a remembered PRF, ``prefer``) narrows or reorders them.
The derived header keys are wiped after use; hashlib's and older cryptography's PBKDF2
return immutable bytes, which Python frees but cannot zero (best effort).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from Cryptodome.Hash import RIPEMD160
from Cryptodome.Protocol.KDF import PBKDF2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from keyd.crypto.ciphers import SectorCipher, sector_cipher
from keyd.crypto.errors import (
    KERNEL_FIX,
    HeaderDamaged,
    HeaderUnreadable,
    PassphraseRejected,
    UnsupportedCipher,
    UnsupportedHash,
    UnsupportedVolume,
)

Source = str | os.PathLike[str] | BinaryIO
HEADER_SIZE = 512
SALT_LEN = 64
HEADER_KEY_LEN = 64  # AES-256-XTS; the cascades' 192 bytes are never needed here
KEY_AREA = 192  # of the decrypted part: header bytes 256-511 are the key area
FIELDS_LEN = 188  # header bytes 64-251 are covered by the header CRC-32
DATA_UNIT = 512  # the XTS data unit of the data area
XTS_SPEC = "aes-xts-plain64"
XTS_KEY_LEN = 64
HIDDEN_OFFSET = 65536
HIDDEN_OFFSET_OLD = -1536  # TrueCrypt before 6.0: the hidden header near the end
BACKUP_OFFSET = -131072
HIDDEN_BACKUP_OFFSET = -65536
TC_MAGIC, VC_MAGIC = b"TRUE", b"VERA"
MAX_PASSPHRASE = 64  # TrueCrypt; VeraCrypt takes up to 128 bytes
VC_MAX_PASSPHRASE = 128
# hash names people and cryptsetup use for the same PRF
_ALIASES = {"stribog512": "streebog", "blake2s-256": "blake2s"}
_DIGEST_SIZES = {"sha512": 64, "sha256": 32, "ripemd160": 20, "blake2s": 32}
_UNAVAILABLE = {"whirlpool": "no library here implements Whirlpool",
                "streebog": "no library here implements Streebog (GOST R 34.11-2012)",
                "argon2id": "VeraCrypt's Argon2id needs 416 MiB and a newer cryptography"}
_CRYPTOGRAPHY_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha512": hashes.SHA512(), "sha256": hashes.SHA256(), "blake2s": hashes.BLAKE2s(32)}


@dataclass(frozen=True)
class _Row:
    """One line of cryptsetup's tcrypt_kdf table (legacy SHA-1 left out: pre-XTS only)."""

    prf: str
    iterations: int
    veracrypt: bool = False
    pim_const: int = 0
    pim_mult: int = 0
    boot: bool = False  # system encryption's counts


# cryptsetup's order. Argon2id's "iterations" are its time cost; it is never run here.
_KDF_TABLE = (
    _Row("ripemd160", 2000), _Row("ripemd160", 1000, boot=True),
    _Row("sha512", 1000), _Row("whirlpool", 1000),
    _Row("sha512", 500000, True, 15000, 1000), _Row("whirlpool", 500000, True, 15000, 1000),
    _Row("sha256", 500000, True, 15000, 1000), _Row("sha256", 200000, True, 0, 2048, True),
    _Row("argon2id", 6, True), _Row("blake2s", 500000, True, 15000, 1000),
    _Row("blake2s", 200000, True, 0, 2048, True), _Row("ripemd160", 655331, True, 15000, 1000),
    _Row("ripemd160", 327661, True, 0, 2048, True), _Row("streebog", 500000, True, 15000, 1000),
)
KNOWN_PRFS = tuple(dict.fromkeys(row.prf for row in _KDF_TABLE))


@dataclass(frozen=True)
class TcryptOptions:
    """How to look for the header: cryptsetup's ``--veracrypt``/``--disable-veracrypt``,
    ``--tcrypt-hidden``, ``--tcrypt-backup``, ``--tcrypt-system``, ``--veracrypt-pim``,
    ``--hash`` and ``--cipher``; ``prefer`` is a PRF to try first (say, last time's)."""

    veracrypt: bool = True
    hidden: bool = False
    backup_header: bool = False
    system: bool = False
    pim: int | None = None
    hash: str | None = None
    cipher: str | None = None
    prefer: str | None = None


@dataclass(frozen=True)
class Kdf:
    """One PBKDF2 attempt: a PRF and its iteration count (PIM applied)."""

    prf: str
    iterations: int

    @property
    def rounds(self) -> int:
        """HMAC computations for the 64-byte header key: the attempt's cost."""
        return self.iterations * -(-HEADER_KEY_LEN // _DIGEST_SIZES[self.prf])


@dataclass(frozen=True)
class KdfPlan:
    """The attempts, in order, and the PRFs cryptsetup would also try that this code cannot."""

    attempts: tuple[Kdf, ...]
    not_tried: tuple[str, ...]

    @property
    def rounds(self) -> int:
        """The cost of a wrong passphrase: every attempt's HMAC computations, per location."""
        return sum(kdf.rounds for kdf in self.attempts)


@dataclass(frozen=True)
class TcryptVolume:
    """What a decrypted header says; offsets and sizes in bytes from the device's start.

    ``sector_size`` is the volume's sector size as recorded (512, or 4096 on 4K disks);
    the data area is encrypted in 512-byte units regardless (:func:`data_cipher`).
    """

    magic: str  # "TRUE" (TrueCrypt) or "VERA" (VeraCrypt)
    version: int  # header format version
    prf: str
    iterations: int
    cipher: str  # the data area's dm-crypt spec
    header_offset: int
    data_offset: int
    size: int
    sector_size: int
    hidden: bool
    iv_offset: int  # IV sector of the data area's first byte (512-byte units)


def kdf_plan(options: TcryptOptions) -> KdfPlan:
    """The PBKDF2 attempts for ``options``, in cryptsetup's order narrowed by ``hash`` and PIM."""
    wanted = _prf_name(options.hash) if options.hash else None
    if wanted in _UNAVAILABLE:
        raise UnsupportedHash(wanted, f"{_UNAVAILABLE[wanted]}, so the userspace backend "
                                      "cannot derive the header key")
    rows = [row for row in _KDF_TABLE if _applies(row, options, wanted)]
    if wanted and not rows:
        raise UnsupportedHash(wanted, "no TrueCrypt volume uses this PRF",
                              fix='use type = "veracrypt", or the hash TrueCrypt used')
    attempts = [Kdf(row.prf, _iterations(row, options)) for row in rows
                if row.prf not in _UNAVAILABLE]
    not_tried = tuple(dict.fromkeys(row.prf for row in rows if row.prf in _UNAVAILABLE))
    prefer = _prf_name(options.prefer) if options.prefer else None
    attempts.sort(key=lambda kdf: kdf.prf != prefer)  # stable: the rest keep their order
    return KdfPlan(tuple(attempts), not_tried)


def _prf_name(name: str) -> str:
    prf = _ALIASES.get(name.lower(), name.lower())
    if prf not in KNOWN_PRFS:
        raise UnsupportedHash(name, "is not a TrueCrypt/VeraCrypt PRF",
                              fix=f"use one of: {', '.join(KNOWN_PRFS)}")
    return prf


def _applies(row: _Row, options: TcryptOptions, wanted: str | None) -> bool:
    if wanted and row.prf != wanted:
        return False
    if row.boot and not options.system:
        return False
    if row.veracrypt and not options.veracrypt:
        return False
    # cryptsetup: with a PIM, only VeraCrypt's counts are tried.
    return row.veracrypt or not (options.veracrypt and options.pim)


def _iterations(row: _Row, options: TcryptOptions) -> int:
    if options.veracrypt and options.pim and row.veracrypt and row.pim_mult:
        return row.pim_const + row.pim_mult * options.pim
    return row.iterations


def read_volume(source: Source, passphrase: bytes | bytearray,
                options: TcryptOptions = TcryptOptions(), *,
                keyfiles: Sequence[bytes | bytearray] = ()) -> tuple[TcryptVolume, bytearray]:
    """Find and decrypt the header of the volume on ``source`` (a path or a readable,
    seekable binary file); return what it says and its master key (64 bytes, AES-XTS).

    The caller owns the key and should zero it when done. Raises PassphraseRejected when
    no header decrypts, the Unsupported* errors for what only the kernel backend opens,
    HeaderUnreadable and HeaderDamaged for faults of the device.
    """
    name = _name(source)
    _refuse(name, options, keyfiles)
    plan = kdf_plan(options)
    _check_length(name, passphrase, options)
    with _opened(source, name) as file:
        device_size = _device_size(file, name)
        damaged: list[int] = []
        for offset in _locations(name, options, device_size):
            found, bad = _try_header(_read(file, offset, name), passphrase, plan, options)
            if found is not None:
                return found.volume(offset, device_size, name)
            damaged += [offset] if bad else []
    raise _rejection(name, options, plan, damaged)


def data_cipher(volume: TcryptVolume, key: bytes | bytearray) -> SectorCipher:
    """The cipher of ``volume``'s data area (512-byte units, IVs counted from the device's
    start); sector 0 is the first 512 bytes at ``volume.data_offset``."""
    return sector_cipher(volume.cipher, key, sector_size=DATA_UNIT, iv_offset=volume.iv_offset)


def _name(source: Source) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return str(getattr(source, "name", "the volume"))


def _refuse(name: str, options: TcryptOptions, keyfiles: Sequence[object]) -> None:
    if options.system:
        raise UnsupportedVolume(f"{name}: TrueCrypt/VeraCrypt system encryption is not "
                                "supported in userspace (its offsets depend on the partition "
                                "table)", subject=name, fix=KERNEL_FIX)
    if keyfiles:
        raise UnsupportedVolume(f"{name}: TrueCrypt/VeraCrypt keyfiles (the bundle's "
                                "keyfiles, cryptsetup's --key-file) are not supported in "
                                "userspace", subject=name, fix=KERNEL_FIX)
    if options.cipher not in (None, "aes"):
        raise UnsupportedCipher(str(options.cipher), "only AES-XTS TrueCrypt/VeraCrypt "
                                                     "volumes can be opened in userspace")


def _check_length(name: str, passphrase: bytes | bytearray, options: TcryptOptions) -> None:
    limit = VC_MAX_PASSPHRASE if options.veracrypt else MAX_PASSPHRASE
    if len(passphrase) > limit:
        raise PassphraseRejected(f"{name}: the passphrase is {len(passphrase)} bytes, longer "
                                 f"than the {limit} that TrueCrypt/VeraCrypt accept",
                                 subject=name, fix="check the key for this layer")


@contextlib.contextmanager
def _opened(source: Source, name: str) -> Iterator[BinaryIO]:
    if not isinstance(source, str | os.PathLike):
        yield source
        return
    try:
        file = open(source, "rb")  # noqa: SIM115 - closed below, OSError mapped
    except OSError as exc:
        raise HeaderUnreadable(f"cannot open {name}: {exc.strerror}", subject=name) from exc
    with file:
        yield file


def _device_size(file: BinaryIO, name: str) -> int:
    # seek() gives a block device's size too, where fstat says 0.
    try:
        return file.seek(0, os.SEEK_END)
    except OSError as exc:
        raise HeaderUnreadable(f"cannot size {name}: {exc.strerror}", subject=name) from exc


def _locations(name: str, options: TcryptOptions, device_size: int) -> list[int]:
    if options.hidden and options.backup_header:
        wanted = [device_size + HIDDEN_BACKUP_OFFSET]
    elif options.hidden:
        wanted = [HIDDEN_OFFSET, device_size + HIDDEN_OFFSET_OLD]
    elif options.backup_header:
        wanted = [device_size + BACKUP_OFFSET]
    else:
        wanted = [0]
    found = [offset for offset in wanted if 0 <= offset <= device_size - HEADER_SIZE]
    if not found:
        raise HeaderUnreadable(f"{name} is {device_size} bytes, too small to hold a "
                               f"TrueCrypt/VeraCrypt header at {wanted[0]}", subject=name)
    return found


def _read(file: BinaryIO, offset: int, name: str) -> bytes:
    try:
        file.seek(offset)
        data = file.read(HEADER_SIZE)
    except OSError as exc:
        raise HeaderUnreadable(f"cannot read the header of {name} at {offset}: "
                               f"{exc.strerror}", subject=name) from exc
    if len(data) != HEADER_SIZE:
        raise HeaderUnreadable(f"short read of the header of {name} at {offset}",
                               subject=name)
    return data


@dataclass
class _Decrypted:
    """A header's decrypted part (448 bytes, which hold the master key) and the KDF used."""

    plain: bytearray
    kdf: Kdf
    options: TcryptOptions

    @property
    def magic(self) -> bytes:
        """The magic: b"TRUE", b"VERA", or garbage for a wrong key."""
        return bytes(self.plain[:4])

    @property
    def intact(self) -> bool:
        """Both CRC-32s match (the header's from version 4 on)."""
        keys_crc, header_crc = self._field(">I", 8), self._field(">I", FIELDS_LEN)
        # A memoryview, so that no copy of the keys is left behind to wipe.
        if zlib.crc32(memoryview(self.plain)[KEY_AREA:]) != keys_crc:
            return False
        # Headers before version 4 (TrueCrypt 5) have no header CRC.
        return self.version < 4 or zlib.crc32(memoryview(self.plain)[:FIELDS_LEN]) == header_crc

    @property
    def version(self) -> int:
        """The header format version."""
        return self._field(">H", 4)

    def _field(self, fmt: str, offset: int) -> int:
        value: int = struct.unpack_from(fmt, self.plain, offset)[0]
        return value

    def volume(self, offset: int, device_size: int, name: str) -> tuple[TcryptVolume, bytearray]:
        """The parsed header and its master key; the plaintext is wiped."""
        try:
            volume = self._parse(offset, device_size, name)
            return volume, self.plain[KEY_AREA:KEY_AREA + XTS_KEY_LEN]
        finally:
            self.wipe()

    def _parse(self, offset: int, device_size: int, name: str) -> TcryptVolume:
        hidden_size, volume_size, mk_offset = struct.unpack_from(">QQQ", self.plain, 28)
        sector_size = self._field(">I", 64) or DATA_UNIT
        size = (hidden_size if self.options.hidden else volume_size) // DATA_UNIT * DATA_UNIT
        data_offset = self._data_offset(mk_offset, hidden_size, device_size)
        if sector_size % DATA_UNIT or data_offset + size > device_size:
            raise HeaderDamaged(f"the header of {name} at {offset} describes {size} bytes at "
                                f"{data_offset} in sectors of {sector_size} bytes, which a "
                                f"device of {device_size} bytes cannot hold", subject=name,
                                fix="check that the device is the whole volume")
        return TcryptVolume(
            magic=self.magic.decode("ascii"), version=self.version,
            prf=self.kdf.prf, iterations=self.kdf.iterations, cipher=XTS_SPEC,
            header_offset=offset, data_offset=data_offset, size=size,
            sector_size=sector_size, hidden=self.options.hidden,
            iv_offset=data_offset // DATA_UNIT)

    def _data_offset(self, mk_offset: int, hidden_size: int, device_size: int) -> int:
        # cryptsetup's TCRYPT_get_data_offset for XTS, in bytes.
        if self.version < 3:
            return DATA_UNIT
        if self.options.hidden and self.version == 3:
            return (device_size - hidden_size + HIDDEN_OFFSET_OLD) // DATA_UNIT * DATA_UNIT
        return int(mk_offset) or DATA_UNIT

    def wipe(self) -> None:
        """Zero the plaintext (it holds the master key)."""
        self.plain[:] = bytes(len(self.plain))


def _try_header(header: bytes, passphrase: bytes | bytearray, plan: KdfPlan,
                options: TcryptOptions) -> tuple[_Decrypted | None, bool]:
    """The first attempt that decrypts the header with its magic and CRCs; and whether an
    attempt found the magic but not the CRCs (a damaged header, or a 1 in 2**32 accident)."""
    magics = (TC_MAGIC, VC_MAGIC) if options.veracrypt else (TC_MAGIC,)
    salt, encrypted = header[:SALT_LEN], header[SALT_LEN:]
    damaged = False
    for kdf in plan.attempts:
        found = _Decrypted(_decrypt_header(kdf, passphrase, salt, encrypted), kdf, options)
        if found.magic in magics and found.intact:
            return found, damaged
        damaged = damaged or found.magic in magics
        found.wipe()
    return None, damaged


def _decrypt_header(kdf: Kdf, passphrase: bytes | bytearray, salt: bytes,
                    encrypted: bytes) -> bytearray:
    key = bytearray(HEADER_KEY_LEN)
    out = bytearray(len(encrypted) + 15)  # update_into wants room for a block more
    try:
        pbkdf2(kdf.prf, passphrase, salt, kdf.iterations, key)
        tweak = bytes(16)  # data unit 0
        Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor().update_into(encrypted, out)
    finally:
        key[:] = bytes(len(key))
    del out[len(encrypted):]
    return out


def pbkdf2(prf: str, password: bytes | bytearray, salt: bytes, iterations: int,
           out: bytearray) -> None:
    """Fill ``out`` with PBKDF2-HMAC-``prf``; in place where cryptography can (47 and later)."""
    algorithm = _CRYPTOGRAPHY_HASHES.get(prf)
    if algorithm is not None and hasattr(PBKDF2HMAC, "derive_into"):
        PBKDF2HMAC(algorithm, len(out), salt, iterations).derive_into(password, out)
        return
    try:
        out[:] = hashlib.pbkdf2_hmac(prf, password, salt, iterations, len(out))
    except ValueError:
        if prf != "ripemd160":
            raise
        out[:] = _ripemd160_pbkdf2(password, salt, iterations, len(out))


def _ripemd160_pbkdf2(password: bytes | bytearray, salt: bytes, iterations: int,
                      length: int) -> bytes:
    # OpenSSL 3.0.0-3.0.6 keep RIPEMD-160 in the legacy provider, unloaded by default.
    # Cryptodome's stub says str; the function takes bytes (and encodes a str).
    secret = cast(str, bytes(password))
    return PBKDF2(secret, salt, length, iterations, hmac_hash_module=RIPEMD160)


def _rejection(name: str, options: TcryptOptions, plan: KdfPlan,
               damaged: list[int]) -> Exception:
    if damaged:
        other = "the backup header" if not options.backup_header else "the primary header"
        return HeaderDamaged(f"the header of {name} at {damaged[0]} decrypts but its CRC-32 "
                             "does not match: it is damaged", subject=name,
                             fix=f"open the volume with {other} (backup_header)")
    tried = tuple(dict.fromkeys(kdf.prf for kdf in plan.attempts))
    kind = "hidden " if options.hidden else ""
    program = "TrueCrypt/VeraCrypt" if options.veracrypt else "TrueCrypt"
    skipped = f"; not tried: {', '.join(plan.not_tried)}" if plan.not_tried else ""
    return PassphraseRejected(
        f"wrong passphrase, or {name} is not a {kind}{program} volume encrypted with AES-XTS "
        f"(tried PRFs {', '.join(tried)}{skipped})", subject=name, tried=tried,
        not_tried=plan.not_tried,
        fix="check the passphrase and the layer's hidden, backup_header, pim and hash; a "
            "volume that uses another cipher (Serpent, Twofish, Camellia, Kuznyechik, a "
            f"cascade) or PRF opens only with the kernel backend: {KERNEL_FIX}")
