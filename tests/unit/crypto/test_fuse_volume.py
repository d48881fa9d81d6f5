"""The FUSE volume's data path, without FUSE: sector arithmetic as tables, and a Volume over an
in-memory backing checked against a plain bytearray model (hypothesis).

The cipher here is a fake: XOR with a byte made from the sector number, enough to tell a
sector written at the wrong index or offset from a right one.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.crypto.fuse_volume import (
    FileBacking,
    Span,
    Volume,
    merge,
    mount_options,
    partial_sectors,
    span,
    within,
)

HEADER = 1024  # bytes before the data area, like a TrueCrypt header (smaller, same idea)


class XorCipher:
    """Sector n is XORed with (n * 7 + 1) % 256: each sector's ciphertext differs."""

    def __init__(self, sector_size: int) -> None:
        self.sector_size = sector_size

    def _xor(self, sector: int, data: bytes) -> bytes:
        assert len(data) % self.sector_size == 0 and sector >= 0
        out = bytearray(data)
        for n in range(len(data) // self.sector_size):
            pad = ((sector + n) * 7 + 1) % 256
            at = n * self.sector_size
            out[at:at + self.sector_size] = bytes(b ^ pad for b in data[at:at + self.sector_size])
        return bytes(out)

    decrypt = encrypt = _xor


class MemoryBacking:
    """A Backing in a bytearray; counts syncs."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(os.urandom(size))
        self.syncs = 0

    def pread(self, length: int, offset: int) -> bytes:
        assert offset + length <= len(self.data)
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data: bytes | bytearray, offset: int) -> None:
        assert offset + len(data) <= len(self.data)
        self.data[offset:offset + len(data)] = data

    def fsync(self) -> None:
        self.syncs += 1


def make(sector_size: int, sectors: int, *, read_only: bool = False) -> tuple[Volume, MemoryBacking]:
    """A volume of ``sectors`` sectors after HEADER bytes, with 512 bytes of slack at the end."""
    size = sector_size * sectors
    backing = MemoryBacking(HEADER + size + 512)
    volume = Volume(backing, XorCipher(sector_size), offset=HEADER, size=size, read_only=read_only)
    return volume, backing


def plaintext(volume: Volume, backing: MemoryBacking) -> bytes:
    """The data area decrypted sector by sector, independent of Volume.read."""
    cipher = XorCipher(volume.sector_size)
    data = bytes(backing.data[HEADER:HEADER + volume.size])
    return cipher.decrypt(0, data)


@pytest.mark.parametrize(("offset", "length", "sector_size", "expected"), [
    (0, 512, 512, Span(0, 1, 0, 0)),
    (0, 1, 512, Span(0, 1, 0, 511)),
    (511, 1, 512, Span(0, 1, 511, 0)),
    (511, 2, 512, Span(0, 2, 511, 511)),
    (512, 1024, 512, Span(1, 2, 0, 0)),
    (1000, 4096, 512, Span(1, 9, 488, 24)),
    (4096, 4096, 4096, Span(1, 1, 0, 0)),
    (4096 + 512, 512, 4096, Span(1, 1, 512, 3072)),
    (0, 1 << 20, 4096, Span(0, 256, 0, 0)),
    (3 * 4096 - 1, 4097, 4096, Span(2, 2, 4095, 0)),
    (3 * 4096 - 1, 4098, 4096, Span(2, 3, 4095, 4095)),
])
def test_span(offset: int, length: int, sector_size: int, expected: Span) -> None:
    assert span(offset, length, sector_size) == expected


@pytest.mark.parametrize(("offset", "length", "size", "expected"), [
    (0, 100, 1000, 100), (900, 200, 1000, 100), (1000, 1, 1000, 0), (2000, 1, 1000, 0),
    (0, 0, 1000, 0),
])
def test_within(offset: int, length: int, size: int, expected: int) -> None:
    assert within(offset, length, size) == expected


@pytest.mark.parametrize(("where", "expected"), [
    (Span(3, 1, 0, 0), ()),
    (Span(3, 1, 10, 0), (3,)),
    (Span(3, 1, 0, 10), (3,)),
    (Span(3, 1, 10, 10), (3,)),  # one sector, partial at both ends: read once
    (Span(3, 4, 10, 0), (3,)),
    (Span(3, 4, 0, 10), (6,)),
    (Span(3, 4, 10, 10), (3, 6)),
])
def test_partial_sectors(where: Span, expected: tuple[int, ...]) -> None:
    assert partial_sectors(where) == expected


def test_merge_lays_data_over_the_old_edges() -> None:
    where = span(4 + 8, 6, 8)  # sectors 1..2 of 8 bytes, 4 bytes in, 2 bytes of sector 2
    old = {1: b"AAAAAAAA", 2: b"BBBBBBBB"}
    assert where == Span(1, 2, 4, 6)
    assert merge(where, 8, old, b"xxxxxx") == bytearray(b"AAAAxxxxxxBBBBBB")


def test_an_aligned_read_and_write_round_trip_through_the_cipher() -> None:
    volume, backing = make(512, 8)
    data = os.urandom(1024)
    assert volume.write(1024, data) == 1024
    assert volume.read(1024, 1024) == data
    assert backing.data[HEADER + 1024:HEADER + 2048] == XorCipher(512).encrypt(2, data)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_a_partial_write_keeps_the_rest_of_its_sectors(sector_size: int) -> None:
    volume, backing = make(sector_size, 4)
    before = plaintext(volume, backing)
    assert volume.write(sector_size - 3, b"123456") == 6
    after = plaintext(volume, backing)
    expected = before[:sector_size - 3] + b"123456" + before[sector_size + 3:]
    assert after == expected
    assert volume.read(sector_size - 3, 6) == b"123456"


def test_outside_the_data_area_is_never_written() -> None:
    volume, backing = make(512, 4)
    header, slack = bytes(backing.data[:HEADER]), bytes(backing.data[HEADER + volume.size:])
    volume.write(0, os.urandom(volume.size))
    volume.write(volume.size - 10, os.urandom(100))
    assert backing.data[:HEADER] == header and backing.data[HEADER + volume.size:] == slack


def test_the_end_of_the_volume() -> None:
    volume, _ = make(512, 4)
    assert volume.read(volume.size - 10, 100) == volume.read(volume.size - 10, 10)
    assert len(volume.read(volume.size - 10, 100)) == 10
    assert volume.read(volume.size, 100) == b""
    assert volume.write(volume.size - 10, bytes(100)) == 10
    assert volume.write(volume.size, b"") == 0
    with pytest.raises(OSError) as full:
        volume.write(volume.size, b"x")
    assert full.value.errno == errno.ENOSPC


def test_a_read_only_volume_refuses_writes_and_reads() -> None:
    volume, backing = make(512, 4, read_only=True)
    before = bytes(backing.data)
    with pytest.raises(OSError) as refused:
        volume.write(0, b"x")
    assert refused.value.errno == errno.EROFS
    assert backing.data == before
    assert volume.read(0, 2048) == plaintext(volume, backing)


def test_sync_reaches_the_backing() -> None:
    volume, backing = make(512, 1)
    volume.sync()
    assert backing.syncs == 1


@settings(max_examples=200)
@given(sector_size=st.sampled_from([512, 4096]),
       operations=st.lists(st.tuples(st.booleans(), st.integers(0, 5 * 4096),
                                     st.integers(0, 3 * 4096)), max_size=12))
def test_reads_and_writes_match_a_flat_model(sector_size: int,
                                             operations: list[tuple[bool, int, int]]) -> None:
    volume, backing = make(sector_size, 4 * 4096 // sector_size)
    model = bytearray(plaintext(volume, backing))
    for is_write, offset, length in operations:
        if is_write and offset < volume.size:
            data = os.urandom(length)
            written = volume.write(offset, data)
            assert written == min(length, volume.size - offset)
            model[offset:offset + written] = data[:written]
        else:
            assert volume.read(offset, length) == bytes(model[offset:offset + length])
    assert plaintext(volume, backing) == model


def test_writes_into_one_sector_from_two_threads_both_survive() -> None:
    volume, backing = make(4096, 1)
    rounds = 250

    def count_up(offset: int) -> None:
        # Each round writes a new value: a merge from a stale copy would bring an old one back.
        for value in range(rounds):
            volume.write(offset, bytes([value]) * 2048)

    threads = [threading.Thread(target=count_up, args=(offset,)) for offset in (0, 2048)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert plaintext(volume, backing) == bytes([rounds - 1]) * 4096


def test_file_backing_reads_and_writes_at_offsets(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        backing = FileBacking(fd)
        backing.pwrite(b"hello", 1000)
        assert backing.pread(7, 999) == b"\0hello\0"
        backing.fsync()
        with pytest.raises(OSError) as short:
            backing.pread(100, 4000)
        assert short.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_mount_options() -> None:
    assert mount_options("keyd-crypt:tank-crypt", read_only=False) == {
        "default_permissions", "fsname=keyd-crypt:tank-crypt", "subtype=keyd-crypt"}
    assert "ro" in mount_options("keyd-crypt:tank-crypt", read_only=True)
