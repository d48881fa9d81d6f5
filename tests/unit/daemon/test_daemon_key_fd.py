"""Keys passed as file descriptors: a sealed memfd or a regular file, never a pipe or a socket."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from pathlib import Path

import pytest

from keyd.daemon import key_fd
from keyd.daemon.key_fd import BadKeyFd, read_key_fd
from keyd.engine.keys import MAX_KEY_BYTES

KEY = b"0123456789abcdef" * 4


def memfd(data: bytes, *, sealed: bool = True) -> int:
    fd = os.memfd_create("test-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, key_fd.SEALS | fcntl.F_SEAL_SEAL)
    return fd


def test_a_sealed_memfd_is_read_whatever_its_offset() -> None:
    assert bytes(read_key_fd(memfd(KEY)).buffer) == KEY


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(KEY)
    assert bytes(read_key_fd(os.open(tmp_path / "key", os.O_RDONLY)).buffer) == KEY


def test_an_unsealed_memfd_is_refused() -> None:
    with pytest.raises(BadKeyFd, match="not sealed"):
        read_key_fd(memfd(KEY, sealed=False))


def test_a_pipe_whose_writer_stays_open_is_refused_at_once() -> None:
    reader, writer = os.pipe()
    with pytest.raises(BadKeyFd, match="is a pipe"):
        read_key_fd(reader)  # refused by its kind: never read, so it cannot block
    os.close(writer)


def test_a_socket_is_refused() -> None:
    left, right = socket.socketpair()
    with pytest.raises(BadKeyFd, match="is a socket"):
        read_key_fd(os.dup(left.fileno()))
    left.close()
    right.close()


@pytest.mark.parametrize("size", [0, MAX_KEY_BYTES + 1])
def test_an_empty_or_oversized_key_is_refused(size: int) -> None:
    with pytest.raises(BadKeyFd, match=f"holds {size} bytes"):
        read_key_fd(memfd(b"k" * size))


def test_the_descriptor_is_closed_after_the_read() -> None:
    fd = memfd(KEY)
    read_key_fd(fd)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_read_that_hangs_gives_up_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(key_fd, "_checked_read", lambda fd: release.wait(10))  # a hung FUSE read
    with pytest.raises(BadKeyFd, match=r"did not finish within 0\.2 s"):
        read_key_fd(memfd(KEY), deadline=0.2)  # without the deadline: 10 s, then no error
    release.set()
