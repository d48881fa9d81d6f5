"""A userspace-decrypted volume as a block device: keyd.crypto.serve's FUSE file on a loop device.

Real FUSE mounts, loop devices, mkfs.ext4 and mount on this machine; every image's data area
is checked against an independent decryption (one OpenSSL XTS call per sector).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from keyd.crypto.serve import served_name
from tests.host.support import (
    IMAGES,
    STOP_TIMEOUT,
    Image,
    attached,
    loops_backed_by,
    mounted,
    mounted_at,
    plain_image,
    request,
    run,
    serving,
    start,
    wait_ready,
)

EXT4_MAGIC_AT, EXT4_MAGIC = 1024 + 56, b"\x53\xef"


@pytest.fixture(params=sorted(IMAGES))
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Image:
    """Each kind of volume image, freshly made."""
    return IMAGES[request.param](tmp_path)


def sector_size(image: Image) -> int:
    """The image's encryption sector size, which its loop device's logical blocks match."""
    return int(str(image.spec["sector_size"]))


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write and fsync each file."""
    for name, data in files.items():
        with open(directory / name, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())


def test_ext4_on_the_volume_survives_a_restart(image: Image, tmp_path: Path) -> None:
    files = {f"file{i}": os.urandom(size) for i, size in enumerate((1, 4096, 3 * 1024 * 1024 + 7))}
    crypt, fs = tmp_path / "crypt", tmp_path / "fs"
    with serving(image, crypt) as served:
        with attached(served.file, sector_size=sector_size(image)) as loop:
            run(["mkfs.ext4", "-q", loop])
            with mounted(loop, fs):
                write_files(fs, files)
        assert served.stop() == 0
    assert not mounted_at(crypt) and not loops_backed_by(served.file)

    with serving(image, crypt) as served, \
            attached(served.file, sector_size=sector_size(image)) as loop, mounted(loop, fs):
        assert {name: (fs / name).read_bytes() for name in files} == files


def test_the_data_area_decrypts_to_the_file_systems_bytes(image: Image, tmp_path: Path) -> None:
    header = image.path.read_bytes()[:image.offset]
    with serving(image, tmp_path / "crypt") as served:
        with attached(served.file, sector_size=sector_size(image)) as loop:
            run(["mkfs.ext4", "-q", loop])
            with mounted(loop, tmp_path / "fs") as fs:
                write_files(fs, {"data": os.urandom(1024 * 1024)})
        served_bytes = served.file.read_bytes()
        assert served.stop() == 0
    on_disk = image.data_area()
    assert served_bytes[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] == EXT4_MAGIC
    assert on_disk[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] != EXT4_MAGIC
    assert image.reference(on_disk) == served_bytes
    assert image.path.read_bytes()[:image.offset] == header


def test_a_read_only_volume_refuses_writes(tmp_path: Path) -> None:
    image = plain_image(tmp_path, size=8 * 1024 * 1024, sector_size=512)
    before = hashlib.sha256(image.path.read_bytes()).digest()
    with serving(image, tmp_path / "crypt", read_only=True) as served:
        with pytest.raises(OSError) as refused:
            os.open(served.file, os.O_RDWR)
        assert refused.value.errno == errno.EROFS
        with attached(served.file, sector_size=512, read_only=True) as loop:
            with pytest.raises(OSError), open(loop, "r+b", buffering=0) as device:
                device.write(bytes(512))
            with open(loop, "rb") as device:
                assert device.read() == image.reference(image.data_area())
    assert hashlib.sha256(image.path.read_bytes()).digest() == before


def test_a_block_device_is_served_and_held_exclusively(tmp_path: Path) -> None:
    image = plain_image(tmp_path, size=8 * 1024 * 1024, sector_size=4096, offset=4096)
    data = os.urandom(1024 * 1024 + 512)
    with attached(image.path, sector_size=512) as disk:
        on_disk = dataclasses.replace(image, path=Path(disk))
        with serving(on_disk, tmp_path / "crypt") as served:
            second = start("tank-other", request(on_disk, tmp_path / "other"))
            assert wait_ready(second) == b""
            assert second.wait(STOP_TIMEOUT) != 0
            assert second.stderr is not None and b"cannot open" in second.stderr.read()
            for pipe in (second.stdout, second.stderr):
                assert pipe is not None
                pipe.close()
            with open(served.file, "r+b", buffering=0) as volume:
                volume.seek(1000)
                volume.write(data)
            assert served.stop() == 0
    plain = image.reference(image.data_area())
    assert plain[1000:1000 + len(data)] == data


def test_sigterm_waits_until_the_loop_device_is_detached(tmp_path: Path) -> None:
    image = plain_image(tmp_path, size=8 * 1024 * 1024, sector_size=512)
    crypt = tmp_path / "crypt"
    with serving(image, crypt) as served:
        with attached(served.file, sector_size=512) as loop:
            served.process.send_signal(signal.SIGTERM)
            time.sleep(1)
            assert served.process.poll() is None and mounted_at(crypt)
            with open(loop, "rb") as device:
                assert len(device.read(65536)) == 65536
        assert served.process.wait(STOP_TIMEOUT) == 0
        assert not mounted_at(crypt)


def test_an_unmount_from_outside_ends_it(tmp_path: Path) -> None:
    image = plain_image(tmp_path, size=8 * 1024 * 1024, sector_size=512)
    with serving(image, tmp_path / "crypt") as served:
        run(["umount", str(served.mountpoint)])
        assert served.process.wait(STOP_TIMEOUT) == 0


def test_it_is_named_locked_and_keeps_the_key_out_of_argv(tmp_path: Path) -> None:
    image = plain_image(tmp_path, size=8 * 1024 * 1024, sector_size=512)
    with serving(image, tmp_path / "crypt", name="tank-crypt") as served:
        proc = Path(f"/proc/{served.process.pid}")
        cmdline = (proc / "cmdline").read_bytes()
        assert cmdline.startswith(b"@keyd-crypt\0tank-crypt\0")
        assert served_name(cmdline.decode().split("\0")) == "tank-crypt"
        assert (proc / "comm").read_text() == "keyd-crypt\n"
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
        assert int(status["VmLck"].split()[0]) > 0
        limits = (proc / "limits").read_text().splitlines()
        assert next(line.split()[4:6] for line in limits if line.startswith("Max core")) == ["0", "0"]
        for place in (cmdline, (proc / "environ").read_bytes()):
            assert image.key not in place and image.key.hex().encode() not in place
        with open("/proc/self/mountinfo") as info:
            mount = next(line.split() for line in info if f" {served.mountpoint} " in line)
        assert mount[-3:-1] == ["fuse.keyd-crypt", str(image.path)]


def test_a_key_the_cipher_refuses_fails_before_ready(tmp_path: Path) -> None:
    image = plain_image(tmp_path, size=8 * 1024 * 1024, sector_size=512)
    crypt = tmp_path / "crypt"
    process = start("tank-crypt", request(image, crypt, key=os.urandom(10)))
    try:
        assert wait_ready(process) == b""
        assert process.wait(STOP_TIMEOUT) != 0
        assert process.stderr is not None
        assert b"key" in process.stderr.read()
        assert not mounted_at(crypt)
    finally:
        process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            assert pipe is not None
            pipe.close()
