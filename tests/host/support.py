"""Helpers of the host tier: volume images, the serving process, loop devices and mounts.

Each resource is a context manager that undoes itself even when the test fails: the
serving process is stopped (killed if it must be) and its mount removed, loop devices are
detached, file systems unmounted. A new kind of image (TrueCrypt, once its header parser
lands) is one more entry in :data:`IMAGES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "keyd.crypto.serve"]
PROGRAMS = ("losetup", "mkfs.ext4", "mount", "umount")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
MiB = 1 << 20


def host_problems() -> list[str]:
    """What this machine lacks for the host tier, each with its fix; empty when it is ready."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: the host tier mounts FUSE and attaches loop devices (run as root)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing: modprobe fuse")
    if not os.path.exists("/dev/loop-control"):
        problems.append("/dev/loop-control is missing: modprobe loop")
    problems += [f"{name} is not installed: make apt" for name in PROGRAMS if not shutil.which(name)]
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        problems.append("pyfuse3 is not installed in this Python: make venv (the fuse extra)")
    return problems


def run(argv: list[str]) -> str:
    """Run a program, fail with its stderr; return its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Image:
    """A volume image: its file, the spec fields that describe it, its key, and an independent
    way to decrypt its data area (``reference``: ciphertext -> plaintext)."""

    path: Path
    spec: dict[str, object]
    key: bytes
    reference: Callable[[bytes], bytes] = field(repr=False)

    @property
    def offset(self) -> int:
        """Byte offset of the data area."""
        return int(str(self.spec["offset"]))

    def data_area(self) -> bytes:
        """The data area's ciphertext as it is on disk now."""
        with open(self.path, "rb") as image:
            image.seek(self.offset)
            return image.read()


def xts_plain64_reference(key: bytes, sector_size: int) -> Callable[[bytes], bytes]:
    """dm-crypt's aes-xts-plain64, one OpenSSL call per sector: the IV of sector n is its
    position in 512-byte units (n * sector_size / 512), little-endian (not iv_large_sectors)."""
    aes = algorithms.AES(key)

    def decrypt(data: bytes) -> bytes:
        units = sector_size // 512
        return b"".join(
            Cipher(aes, modes.XTS((n * units).to_bytes(16, "little"))).decryptor()
            .update(data[at:at + sector_size])
            for n, at in enumerate(range(0, len(data), sector_size)))
    return decrypt


def plain_image(directory: Path, *, size: int, sector_size: int, offset: int = 0) -> Image:
    """A plain aes-xts-plain64 volume (cryptsetup open --type plain) with a random 512-bit key:
    ``offset`` bytes of random "header" before a zero-filled data area of ``size`` bytes."""
    path = directory / f"plain-{sector_size}.img"
    with open(path, "wb") as image:
        image.write(os.urandom(offset))
        image.truncate(offset + size)
    key = os.urandom(64)
    spec: dict[str, object] = {"offset": offset, "size": size, "sector_size": sector_size,
                               "cipher": "aes-xts-plain64"}
    return Image(path, spec, key, xts_plain64_reference(key, sector_size))


# The images every host test runs on, by test id: name -> maker(directory).
IMAGES: dict[str, Callable[[Path], Image]] = {
    "plain-512": lambda d: plain_image(d, size=32 * MiB, sector_size=512),
    "plain-4096": lambda d: plain_image(d, size=32 * MiB, sector_size=4096, offset=MiB),
}


@dataclass
class Served:
    """A running ``keyd.crypto.serve``: its process, mountpoint and the served file."""

    process: subprocess.Popen[bytes]
    mountpoint: Path
    name: str

    @property
    def file(self) -> Path:
        """The decrypted volume file."""
        return self.mountpoint / "volume"

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def request(image: Image, mountpoint: Path, *, read_only: bool = False,
            key: bytes | None = None) -> bytes:
    """What the serve process reads on stdin: the spec line, then the key."""
    spec = {**image.spec, "backing": str(image.path), "mountpoint": str(mountpoint),
            "read_only": read_only}
    return json.dumps(spec).encode() + b"\n" + (image.key if key is None else key)


def start(name: str, stdin: bytes, argv: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start the serve process and hand it its request; stdout and stderr are pipes."""
    process = subprocess.Popen([*(argv or SERVE), name], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(stdin)
    process.stdin.close()
    return process


def wait_ready(process: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> bytes:
    """What the process wrote to stdout until it closed it (or exited, or the timeout)."""
    assert process.stdout is not None
    out = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
    return out


def mounted_at(path: Path) -> bool:
    """Whether something is mounted at ``path`` (from /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as info:
        return any(line.split()[4] == str(path) for line in info)


def loops_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` (from sysfs: works when it is gone too)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().strip().removesuffix(" (deleted)") == str(path):
            found.append(f"/dev/{backing.parts[3]}")
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _clean_up(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    _stop(process)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
    if mounted_at(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextlib.contextmanager
def serving(image: Image, mountpoint: Path, *, name: str = "tank-crypt",
            read_only: bool = False) -> Iterator[Served]:
    """Serve ``image`` at ``mountpoint`` until the block ends; fails if it never gets ready."""
    process = start(name, request(image, mountpoint, read_only=read_only))
    try:
        out = wait_ready(process)
        if out != b"ready\n":
            _stop(process)
            assert process.stderr is not None
            raise AssertionError(f"not ready ({out!r}): {process.stderr.read().decode()}")
        yield Served(process, mountpoint, name)
    finally:
        _clean_up(process, mountpoint)


@contextlib.contextmanager
def attached(file: Path, *, sector_size: int, read_only: bool = False) -> Iterator[str]:
    """``file`` on a loop device, as keyd attaches a served volume; detached at the end."""
    argv = ["losetup", "--find", "--show", f"--sector-size={sector_size}", "--direct-io=off"]
    device = run([*argv, *(["--read-only"] if read_only else []), str(file)]).strip()
    try:
        yield device
    finally:
        for _ in range(50):  # udev may still hold it for a moment after a mount
            if subprocess.run(["losetup", "--detach", device], capture_output=True,
                              check=False).returncode == 0 or not os.path.exists(device):
                break
            time.sleep(0.1)


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path) -> Iterator[Path]:
    """``device`` mounted at ``mountpoint``; unmounted (lazily if it must be) at the end."""
    mountpoint.mkdir(exist_ok=True)
    run(["mount", device, str(mountpoint)])
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
