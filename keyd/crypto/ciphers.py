"""dm-crypt's sector ciphers in userspace: AES in XTS or CBC mode with plain, plain64 or ESSIV IVs.

The semantics are Linux dm-crypt's (drivers/md/dm-crypt.c), so a volume written through
the kernel reads back here and the other way round. Each encryption sector of
``sector_size`` bytes is encrypted on its own, with an IV made from its *IV sector*: the
sector's position in 512-byte units from the start of the data area, plus ``iv_offset``
(cryptsetup's ``--skip``), or that sum divided by ``sector_size / 512`` with
``iv_large_sectors``. ``plain`` puts the IV sector's low 32 bits little-endian into the
16-byte IV, ``plain64`` all 64 bits, ``essiv:sha256`` encrypts the plain64 IV with AES
under sha256(key). XTS takes two AES keys of equal size, data key first (a 512-bit key is
AES-256-XTS); its tweak is the IV.

Python's cost is per call, not per byte, so a buffer of many sectors is done in a few
calls into OpenSSL: XTS with 512-byte sectors computes every block's tweak at once
(one AES-ECB call for the sectors' tweaks, the GF(2^128) doublings on all sectors
together as one big integer) and then XORs and encrypts the whole buffer in single
calls; CBC decryption is one ECB call and one XOR (every block's chaining value is the
ciphertext before it, or the sector's IV); CBC encryption chains block k of all sectors
together. Where one OpenSSL XTS or CBC call per sector is faster (large sectors, few
sectors), that is used instead. Keys are kept in bytearrays that :meth:`wipe` zeroes.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

from Cryptodome.Util.strxor import strxor
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keyd.crypto.errors import UnsupportedCipher

Buffer = bytes | bytearray | memoryview
SECTOR_SHIFT = 9  # dm-crypt counts IV sectors in 512-byte units
SECTOR_SIZES = (512, 1024, 2048, 4096)  # what dm-crypt accepts as sector_size
BLOCK = 16
_CBC_KEYS = (16, 24, 32)
_XTS_KEYS = (32, 48, 64)
_OPENSSL_XTS_KEYS = (32, 64)  # OpenSSL has AES-128-XTS and AES-256-XTS, no AES-192-XTS
_IV_MODES = ("plain", "plain64", "essiv")
_LEGACY = {"aes": "aes-cbc-plain", "aes-plain": "aes-cbc-plain"}  # cryptsetup's old spellings
# XTS multiplies the tweak by the primitive element alpha: a shift, and when bit 127 falls
# out, an XOR of x^7 + x^2 + x + 1 into the low byte (IEEE 1619, little-endian).
_GF_REDUCE = 0x87
_LANE_ONE = b"\x01" + bytes(BLOCK - 1)
_LOW_127 = (1 << 127) - 1
# The switch points below were measured (x86-64 with AES-NI, OpenSSL 3.0): under 16 sectors
# of 512 bytes one OpenSSL XTS call per sector beats building the tweak stream (they tie at
# 16; at 64, 350 MB/s against 210). Sectors of 1024 bytes and more: OpenSSL per sector.
_XTS_VECTOR_MIN = 16
_XTS_CHUNK = 1024  # sectors per tweak stream: 16 KiB integers, a 512 KiB stream (cache-sized)
_CBC_CHUNK_BYTES = 256 << 10  # per CBC decryption call: buffers that stay in the CPU cache
_CBC_BATCH_BYTES = 1 << 20  # per batched CBC encryption: fewer rounds of Python per byte
# Batched CBC encryption makes one round per block of a sector: worth it up to 512-byte
# sectors (32 blocks; 570 MB/s against 180 per sector), not at 4096 (256 rounds).
_CBC_BATCH_MAX_BLOCKS = 32


class SectorCipher(Protocol):
    """Encrypts/decrypts whole encryption sectors of a volume's data area."""

    sector_size: int  # bytes per encryption unit: 512 or 4096 (plain may use 1024/2048 too)

    def decrypt(self, sector: int, data: bytes) -> bytes:
        """Decrypt ``data`` (whole sectors); ``sector`` is the index of its first sector."""
        ...

    def encrypt(self, sector: int, data: bytes) -> bytes:
        """Encrypt ``data`` (whole sectors); ``sector`` is the index of its first sector."""
        ...


@dataclass(frozen=True)
class CipherSpec:
    """A dm-crypt cipher spec taken apart: ``aes-cbc-essiv:sha256`` -> aes, cbc, essiv, sha256."""

    cipher: str
    mode: str
    iv: str
    iv_hash: str = ""

    def __str__(self) -> str:
        iv = f"{self.iv}:{self.iv_hash}" if self.iv_hash else self.iv
        return f"{self.cipher}-{self.mode}-{iv}"


def parse_spec(spec: str) -> CipherSpec:
    """Take a dm-crypt cipher spec apart; raise UnsupportedCipher for what is not AES XTS/CBC."""
    full = _LEGACY.get(spec, spec)
    parts = full.split("-")
    if len(parts) != 3:
        raise UnsupportedCipher(spec, "expected cipher-mode-iv, e.g. aes-xts-plain64",
                                fix="write the cipher as cryptsetup prints it")
    cipher, mode, iv = parts
    iv_mode, _, iv_hash = iv.partition(":")
    if cipher != "aes" or mode not in ("xts", "cbc"):
        raise UnsupportedCipher(spec, "the userspace backend implements AES in XTS and CBC mode")
    if iv_mode not in _IV_MODES or (iv_mode == "essiv") != bool(iv_hash):
        raise UnsupportedCipher(spec, f"IV generator {iv!r} is not one of plain, plain64, "
                                      "essiv:sha256")
    if iv_hash and iv_hash != "sha256":
        raise UnsupportedCipher(spec, "ESSIV is implemented with sha256 only")
    return CipherSpec(cipher, mode, iv_mode, iv_hash)


def sector_cipher(spec: str, key: Buffer, *, sector_size: int = 512,
                  iv_large_sectors: bool = False, iv_offset: int = 0) -> XtsCipher | CbcCipher:
    """The :class:`SectorCipher` dm-crypt builds from a table line: spec, key, sector size,
    ``iv_large_sectors`` and ``iv_offset`` (512-byte sectors). The key is copied."""
    parsed = parse_spec(spec)
    sizes = _XTS_KEYS if parsed.mode == "xts" else _CBC_KEYS
    if len(key) not in sizes:
        raise UnsupportedCipher(spec, f"a {len(key) * 8}-bit key; {parsed.mode} takes "
                                      f"{' or '.join(str(s * 8) for s in sizes)} bits",
                                fix="set key_size to the size the volume was made with")
    ivs = IvGenerator.make(parsed, key, sector_size, iv_large_sectors, iv_offset)
    if parsed.mode == "xts":
        return XtsCipher(key, ivs)
    return CbcCipher(key, ivs)


class IvGenerator:
    """The 16-byte IVs of consecutive sectors, as dm-crypt computes them."""

    def __init__(self, spec: CipherSpec, sector_size: int, large: bool, iv_offset: int,
                 essiv_key: bytearray | None = None) -> None:
        self.spec = spec
        self.sector_size = sector_size
        self.iv_offset = iv_offset
        self.large = large
        self._essiv_key = essiv_key

    @classmethod
    def make(cls, spec: CipherSpec, key: Buffer, sector_size: int, large: bool,
             iv_offset: int) -> IvGenerator:
        """Check the geometry (as dm-crypt's table parser does) and derive the ESSIV key."""
        if sector_size not in SECTOR_SIZES:
            raise UnsupportedCipher(str(spec), f"sector size {sector_size}: dm-crypt takes "
                                    f"{', '.join(map(str, SECTOR_SIZES))}", fix=None)
        units = sector_size >> SECTOR_SHIFT
        if iv_offset < 0 or (large and iv_offset % units):
            raise UnsupportedCipher(str(spec), f"iv_offset {iv_offset} must be >= 0 and, with "
                                    f"iv_large_sectors, a multiple of {units}", fix=None)
        essiv = bytearray(hashlib.sha256(key).digest()) if spec.iv == "essiv" else None
        return cls(spec, sector_size, large, iv_offset, essiv)

    def first_sector(self, sector: int) -> tuple[int, int]:
        """The IV sector of data sector ``sector`` and the step from one sector to the next."""
        units = self.sector_size >> SECTOR_SHIFT
        start = self.iv_offset + sector * units
        if self.large:
            return start // units, 1
        return start, units

    def ivs(self, sector: int, count: int) -> bytes:
        """The IVs of ``count`` sectors from data sector ``sector``, concatenated."""
        if not count:
            return b""
        start, step = self.first_sector(sector)
        numbers = range(start, start + count * step, step)
        if self.spec.iv == "plain" and numbers[-1] > 0xFFFFFFFF:
            words = array("Q", (number & 0xFFFFFFFF for number in numbers))
        else:
            words = array("Q", numbers)
        if sys.byteorder == "big":
            words.byteswap()  # the IV is little-endian on every architecture
        blocks = bytearray(BLOCK * count)
        memoryview(blocks).cast("Q")[0::2] = words
        if self._essiv_key is None:
            return bytes(blocks)
        return _ecb(self._essiv_key).encryptor().update(blocks)

    def wipe(self) -> None:
        """Zero the ESSIV key."""
        if self._essiv_key is not None:
            self._essiv_key[:] = bytes(len(self._essiv_key))


class _Base:
    """Key handling and argument checks shared by both modes."""

    def __init__(self, key: Buffer, ivs: IvGenerator) -> None:
        self.key = bytearray(key)
        self.ivs = ivs
        self.sector_size = ivs.sector_size
        self.spec = str(ivs.spec)

    def _count(self, sector: int, data: Buffer) -> int:
        if sector < 0 or len(data) % self.sector_size:
            raise ValueError(f"{self.spec}: need whole {self.sector_size}-byte sectors at a "
                             f"sector index >= 0, got {len(data)} bytes at {sector}")
        return len(data) // self.sector_size

    def _chunks(self, sector: int, data: Buffer, per: int) -> Iterator[tuple[int, memoryview]]:
        view = memoryview(data)
        size = per * self.sector_size
        for offset in range(0, len(view), size):
            yield sector + offset // self.sector_size, view[offset:offset + size]

    def _sectors(self, data: Buffer) -> Iterator[memoryview]:
        view = memoryview(data)
        return (view[offset:offset + self.sector_size]
                for offset in range(0, len(view), self.sector_size))

    def _iv_list(self, sector: int, data: Buffer) -> list[bytes]:
        ivs = self.ivs.ivs(sector, len(data) // self.sector_size)
        return [ivs[offset:offset + BLOCK] for offset in range(0, len(ivs), BLOCK)]

    def wipe(self) -> None:
        """Zero the key bytes; the cipher must not be used afterwards."""
        self.key[:] = bytes(len(self.key))
        self.ivs.wipe()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} sector_size={self.sector_size}>"


class XtsCipher(_Base):
    """AES-XTS sectors (``aes-xts-plain64`` and friends)."""

    def __init__(self, key: Buffer, ivs: IvGenerator) -> None:
        super().__init__(key, ivs)
        half = len(self.key) // 2
        self.data_key = self.key[:half]
        self.tweak_key = self.key[half:]
        # OpenSSL refuses a key whose halves are equal; dm-crypt does not (outside FIPS mode).
        self._openssl = None
        if len(self.key) in _OPENSSL_XTS_KEYS and self.data_key != self.tweak_key:
            self._openssl = algorithms.AES(self.key)

    def decrypt(self, sector: int, data: Buffer) -> bytes:
        """See :class:`SectorCipher`."""
        return self._run(sector, data, decrypt=True)

    def encrypt(self, sector: int, data: Buffer) -> bytes:
        """See :class:`SectorCipher`."""
        return self._run(sector, data, decrypt=False)

    def _run(self, sector: int, data: Buffer, *, decrypt: bool) -> bytes:
        count = self._count(sector, data)
        if self._openssl and (self.sector_size > 512 or count < _XTS_VECTOR_MIN):
            return self._per_sector(self._openssl, sector, data, decrypt)
        return b"".join(self._vector(first, chunk, decrypt)
                        for first, chunk in self._chunks(sector, data, _XTS_CHUNK))

    def _per_sector(self, aes: algorithms.AES, sector: int, data: Buffer,
                    decrypt: bool) -> bytes:
        parts = []
        for iv, chunk in zip(self._iv_list(sector, data), self._sectors(data), strict=True):
            cipher = Cipher(aes, modes.XTS(iv))
            parts.append((cipher.decryptor() if decrypt else cipher.encryptor()).update(chunk))
        return b"".join(parts)

    def _vector(self, sector: int, data: memoryview, decrypt: bool) -> bytes:
        count = len(data) // self.sector_size
        tweaks = _ecb(self.tweak_key).encryptor().update(self.ivs.ivs(sector, count))
        stream = tweak_stream(tweaks, self.sector_size // BLOCK)
        blocks = _ecb(self.data_key)
        context = blocks.decryptor() if decrypt else blocks.encryptor()
        return _xor(context.update(_xor(data, stream)), stream)

    def wipe(self) -> None:
        """Zero the key bytes; the cipher must not be used afterwards."""
        super().wipe()
        self.data_key[:] = bytes(len(self.data_key))
        self.tweak_key[:] = bytes(len(self.tweak_key))


def tweak_stream(tweaks: bytes, blocks_per_sector: int) -> bytearray:
    """Every block's XTS tweak: block k of sector j gets ``tweaks[j] * alpha**k``.

    The sectors' tweaks are lanes of one integer (lane j = bits 128j..128j+127, the
    little-endian reading of block j), so one doubling step does all sectors at once; the
    k-th multiples are then copied into place as 8-byte words with strided slices.
    """
    count = len(tweaks) // BLOCK
    ones = int.from_bytes(_LANE_ONE * count, "little")
    low = ones * _LOW_127
    value = int.from_bytes(tweaks, "little")
    stream = bytearray(len(tweaks) * blocks_per_sector)
    words = memoryview(stream).cast("Q")
    stride = 2 * blocks_per_sector
    for k in range(blocks_per_sector):
        lanes = memoryview(value.to_bytes(len(tweaks), "little")).cast("Q")
        words[2 * k::stride] = lanes[0::2]
        words[2 * k + 1::stride] = lanes[1::2]
        value = ((value & low) << 1) ^ (((value >> 127) & ones) * _GF_REDUCE)
    return stream


class CbcCipher(_Base):
    """AES-CBC sectors (``aes-cbc-plain``, ``aes-cbc-plain64``, ``aes-cbc-essiv:sha256``)."""

    def __init__(self, key: Buffer, ivs: IvGenerator) -> None:
        super().__init__(key, ivs)
        self._aes = algorithms.AES(self.key)

    def decrypt(self, sector: int, data: Buffer) -> bytes:
        """See :class:`SectorCipher`: one ECB call, then XOR with the chaining values."""
        self._count(sector, data)
        return b"".join(self._decrypt(first, chunk)
                        for first, chunk in self._chunks(sector, data, _CBC_CHUNK_BYTES // self.sector_size))

    def _decrypt(self, sector: int, data: memoryview) -> bytes:
        plain = _ecb(self.key).decryptor().update(data)
        chain = bytearray(len(data))
        chain[BLOCK:] = data[:-BLOCK]
        count = len(data) // self.sector_size
        _scatter(chain, self.ivs.ivs(sector, count), 0, self.sector_size // BLOCK)
        return _xor(plain, chain)

    def encrypt(self, sector: int, data: Buffer) -> bytes:
        """See :class:`SectorCipher`: block k of every sector in one ECB call, k by k."""
        count = self._count(sector, data)
        if count == 1 or self.sector_size // BLOCK > _CBC_BATCH_MAX_BLOCKS:
            return self._per_sector(sector, data)
        return b"".join(self._encrypt(first, chunk) for first, chunk in
                        self._chunks(sector, data, _CBC_BATCH_BYTES // self.sector_size))

    def _encrypt(self, sector: int, data: memoryview) -> bytes:
        per_sector = self.sector_size // BLOCK
        context = _ecb(self.key).encryptor()
        out = bytearray(len(data))
        chain = self.ivs.ivs(sector, len(data) // self.sector_size)
        for k in range(per_sector):
            chain = context.update(_xor(_gather(data, k, per_sector), chain))
            _scatter(out, chain, k, per_sector)
        return bytes(out)

    def _per_sector(self, sector: int, data: Buffer) -> bytes:
        parts = []
        for iv, chunk in zip(self._iv_list(sector, data), self._sectors(data), strict=True):
            parts.append(Cipher(self._aes, modes.CBC(iv)).encryptor().update(chunk))
        return b"".join(parts)


def _ecb(key: bytearray) -> Cipher[modes.ECB]:
    # ECB here only ever encrypts independent blocks (tweaks, IVs, pre-whitened data).
    return Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305


def _xor(left: Buffer, right: Buffer) -> bytes:
    # Cryptodome's stub says bytes; its C code takes any buffer of the same length.
    return strxor(cast(bytes, left), cast(bytes, right))


def _gather(data: Buffer, k: int, per_sector: int) -> bytes:
    """Block ``k`` of every sector, concatenated."""
    words = memoryview(data).cast("B").cast("Q")
    column = bytearray(len(data) // per_sector)
    view = memoryview(column).cast("Q")
    view[0::2] = words[2 * k::2 * per_sector]
    view[1::2] = words[2 * k + 1::2 * per_sector]
    return bytes(column)


def _scatter(out: bytearray, column: bytes, k: int, per_sector: int) -> None:
    """Write ``column``'s blocks as block ``k`` of consecutive sectors of ``out``."""
    words = memoryview(out).cast("Q")
    source = memoryview(column).cast("Q")
    words[2 * k::2 * per_sector] = source[0::2]
    words[2 * k + 1::2 * per_sector] = source[1::2]
