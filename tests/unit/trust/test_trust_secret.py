"""Key material in memory: zeroed buffers, no leaks in repr, and the memfd path to cryptsetup."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from keyd.cli.enroll_command import read_capped_secret
from keyd.errors import KeydError
from keyd.memfd import memfd_path
from keyd.runner import DEFAULT_TIMEOUT, Completed
from keyd.trust.luks import add_keyslot
from keyd.trust.secret import SecretBytes

KEY = b"\x10super secret key\x00"


def test_secret_is_zeroed_on_exit_and_never_shown() -> None:
    secret = SecretBytes(KEY)
    buffer = secret.buffer
    with secret:
        assert bytes(secret.buffer) == KEY
        assert "super" not in repr(secret) and "super" not in str(secret)
        assert repr(secret) == f"<SecretBytes {len(KEY)} bytes>"
    assert buffer == bytearray() and len(secret) == 0


def test_adopt_takes_the_callers_buffer_without_copying() -> None:
    buffer = bytearray(KEY)
    secret = SecretBytes.adopt(buffer)
    secret.wipe()
    assert buffer == bytearray()


def test_memfd_path_serves_the_key_only_while_open() -> None:
    with SecretBytes(KEY) as secret, memfd_path(secret.buffer) as path:
        assert path.startswith(f"/proc/{os.getpid()}/fd/")
        assert Path(path).read_bytes() == KEY
        assert os.readlink(path).startswith("/memfd:keyd-secret")
    assert not Path(path).exists()


class RecordingRunner:
    """Records argv and stdin, and reads the new-key file while 'cryptsetup' runs."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.stdin: bytes = b""
        self.new_key: bytes = b""

    def run(self, argv: Sequence[str], *, secret: bytes | bytearray | None = None,
            timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
            cwd: str | os.PathLike[str] | None = None, argv0: str | None = None) -> Completed:
        self.argv = list(argv)
        self.stdin = bytes(secret or b"")
        self.new_key = Path(argv[-1]).read_bytes()
        return Completed(tuple(argv), 0, "", "", 0.0)


def test_add_keyslot_sends_old_key_on_stdin_and_new_key_via_memfd() -> None:
    runner = RecordingRunner()
    with SecretBytes(KEY) as new, SecretBytes(b"old passphrase") as old:
        add_keyslot(runner, "/dev/md0", new, old, iter_time_ms=50)
    assert runner.argv[:6] == ["cryptsetup", "luksAddKey", "--batch-mode", "--key-file", "-",
                               "--iter-time"]
    assert runner.argv[-2] == "/dev/md0"
    assert runner.stdin == b"old passphrase"
    assert runner.new_key == KEY
    assert not any("secret" in arg or "passphrase" in arg for arg in runner.argv)


def test_capped_reads_fill_a_secret_and_refuse_empty_or_oversized_input() -> None:
    with read_capped_secret(io.BytesIO(KEY), 64, "key") as secret:
        assert bytes(secret.buffer) == KEY
    for data in (b"", b"x" * 65):
        with pytest.raises(KeydError, match="1 to 64 bytes"):
            read_capped_secret(io.BytesIO(data), 64, "key")
