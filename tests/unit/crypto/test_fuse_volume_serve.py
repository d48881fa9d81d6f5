"""keyd.crypto.serve's pure parts: its spec line, its stdin framing and finding it by cmdline.

The process itself (hardening, naming, FUSE, loop) is tested as root in tests/host.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from keyd.crypto.serve import MAX_REQUEST, read_request, served_name
from keyd.crypto.spec import CryptSpec, parse_spec
from keyd.errors import ConfigError

GOOD: dict[str, object] = {
    "backing": "/dev/md/tank", "offset": 131072, "size": None, "sector_size": 512,
    "cipher": "aes-xts-plain64", "read_only": False, "mountpoint": "/run/keyd/crypt/tank-crypt"}


def line(**changes: object) -> bytes:
    """GOOD with ``changes`` (a value of ... drops the field), as JSON."""
    spec = {key: value for key, value in {**GOOD, **changes}.items() if value is not ...}
    return json.dumps(spec).encode()


def test_a_good_spec() -> None:
    assert parse_spec(line()) == CryptSpec(
        backing="/dev/md/tank", offset=131072, size=None, sector_size=512,
        cipher="aes-xts-plain64", read_only=False, mountpoint="/run/keyd/crypt/tank-crypt",
        iv_offset=0, iv_large_sectors=False)
    spec = parse_spec(line(size=4096 * 10, sector_size=4096, iv_offset=256,
                           iv_large_sectors=True, read_only=True))
    assert (spec.size, spec.iv_offset, spec.iv_large_sectors, spec.read_only) == (
        40960, 256, True, True)


@pytest.mark.parametrize(("changes", "key"), [
    ({"backing": ...}, "backing"),
    ({"backing": "dev/md/tank"}, "backing"),
    ({"mountpoint": "/run/a,allow_other"}, "mountpoint"),
    ({"offset": 100}, "offset"),
    ({"offset": -512}, "offset"),
    ({"offset": True}, "offset"),
    ({"offset": "0"}, "offset"),
    ({"size": 1000}, "size"),
    ({"size": 0}, "size"),
    ({"size": 512, "sector_size": 4096}, "size"),
    ({"sector_size": 520}, "sector_size"),
    ({"cipher": 7}, "cipher"),
    ({"read_only": "no"}, "read_only"),
    ({"iv_offset": 1.5}, "iv_offset"),
    ({"iv_large_sectors": 1}, "iv_large_sectors"),
])
def test_a_bad_field_is_named(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as bad:
        parse_spec(line(**changes))
    assert bad.value.key == key


@pytest.mark.parametrize("text", [b"", b"{", b"[1]", b"\xff"])
def test_a_spec_that_is_not_a_json_object(text: bytes) -> None:
    with pytest.raises(ConfigError):
        parse_spec(text)


def through_a_pipe(data: bytes) -> tuple[CryptSpec, bytes]:
    """read_request of ``data`` written to a pipe (by a thread: it may exceed the pipe's size)."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        try:
            os.write(write_end, data)
        except BrokenPipeError:
            pass  # the reader gave up on a too-large request
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        spec, key = read_request(read_end)
        return spec, bytes(key.buffer)
    finally:
        os.close(read_end)
        feeder.join()


def test_the_request_is_the_spec_line_then_the_key() -> None:
    key = bytes(range(256)) + b"\n\n"  # any byte, newlines too, belongs to the key
    spec, got = through_a_pipe(line() + b"\n" + key)
    assert spec.backing == "/dev/md/tank" and got == key


@pytest.mark.parametrize("data", [
    line(),  # no newline
    line() + b"\n",  # no key
    line() + b"\n" + bytes(MAX_REQUEST),  # too large
])
def test_a_request_without_a_key_or_too_large_is_refused(data: bytes) -> None:
    with pytest.raises(ConfigError):
        through_a_pipe(data)


@pytest.mark.parametrize(("cmdline", "name"), [
    (["@keyd-crypt", "tank-crypt", "", "", ""], "tank-crypt"),
    (["@keyd-crypt", "tank-crypt"], "tank-crypt"),
    (["/usr/bin/python3", "-m", "keyd.crypto.serve", "tank-crypt", ""], "tank-crypt"),
    (["python3", "-I", "-m", "keyd.crypto.serve", "tank-crypt"], "tank-crypt"),
    (["python3", "-m", "keyd.daemon.main"], None),
    (["@ntfs-3g", "/dev/sdb1", "/mnt/x"], None),
    ([], None),
])
def test_served_name(cmdline: list[str], name: str | None) -> None:
    assert served_name(cmdline) == name
