"""Crypt layers without dm-crypt: keyd's userspace crypto served over FUSE, on a loop device.

For a kernel without device-mapper (a Raspberry Pi's, this project's development
machines), a crypt layer is opened in three steps: keyd reads the volume's parameters
(a TrueCrypt/VeraCrypt header it decrypts with the passphrase, or a plain layer's cipher
and key), starts ``python3 -m keyd.crypto.serve`` with the spec and the data key on its
stdin (the key never touches argv, a file or a log), which mounts the decrypted data area
as the one file ``volume`` under ``/run/keyd/crypt/<mapping name>``, and attaches that file
to a loop device whose sector size is the volume's. ``/dev/loopN`` then stands where
``/dev/mapper/<mapping name>`` would. Closing undoes it: detach the loop device, unmount
(the server flushes and exits), remove the directory.

The server is spawned here rather than through :class:`~keyd.runner.Runner`: the runner
runs a program to its end, and this one lives as long as the volume is open. It starts in a
session of its own, so it outlives ``keydctl`` and keyd restarts (keyd.service's
``KillMode=process``); the kernel's state (the FUSE mount and the loop device) is what keyd
observes to find it again, as with a dm mapping.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import selectors
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from keyd.adapters.cryptsetup import shape_key
from keyd.adapters.retry import Retry
from keyd.config.model import CryptLayer
from keyd.crypto.errors import CryptoError, PassphraseRejected
from keyd.engine.errors import KeyRejected, StorageError
from keyd.engine.names import SERVED_FILE, served_dir
from keyd.errors import ProgramError
from keyd.runner import Runner

if TYPE_CHECKING:
    from keyd.crypto.spec import CryptSpec

# _lazy: the keyd.crypto modules are imported on first use, so keyd, keydctl and the
# initramfs unlock do not load cryptography's ciphers and PBKDF2 unless a layer needs them.
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0
UMOUNT_FAILED = 32  # umount(8): "mount failure", here the device is busy
BLKSSZGET = 0x1268  # <linux/fs.h>: the logical block size of a block device
FUSE_FIX = "apt install fuse3 python3-pyfuse3 python3-trio (or pip install 'keyd[fuse]')"


@dataclass(frozen=True)
class Served:
    """What keyd.crypto.serve is told, and the sector size of the loop device over it."""

    spec: CryptSpec
    loop_sector_size: int


def logical_block_size(device: str) -> int:
    """The device's logical block size (512 for a regular file)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        answer = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
        return int(struct.unpack("i", answer)[0])
    except OSError:
        return 512
    finally:
        os.close(fd)


def tcrypt_served(volume: str, layer: CryptLayer, device: str, dm_name: str,
                  passphrase: bytes) -> tuple[Served, bytearray]:
    """Decrypt the TrueCrypt/VeraCrypt header: what to serve, and the master key."""
    from keyd.crypto.spec import CryptSpec  # noqa: PLC0415 (see _lazy)
    from keyd.crypto.tcrypt import TcryptOptions, read_volume  # noqa: PLC0415

    options = TcryptOptions(veracrypt=layer.type == "veracrypt", hidden=layer.hidden,
                            backup_header=layer.backup_header, system=layer.system,
                            pim=layer.pim, hash=layer.hash, cipher=layer.cipher)
    try:
        header, key = read_volume(device, passphrase, options)
    except PassphraseRejected as exc:
        # The engine knows KeyRejected (exit 6, the passphrase fallback); the message and fix
        # are the header reader's, which name what was tried.
        raise KeyRejected(f"{layer.name} of volume {volume}: {exc}", fix=exc.fix) from None
    spec = CryptSpec(device, header.data_offset, header.size, 512, header.cipher,
                     layer.readonly, served_dir(dm_name), header.iv_offset)
    return Served(spec, max(header.sector_size, logical_block_size(device))), key


def plain_served(layer: CryptLayer, device: str, dm_name: str,
                 secret: bytes) -> tuple[Served, bytearray]:
    """A plain layer's cipher and key, as cryptsetup would make them."""
    from keyd.crypto.plain import plain_key  # noqa: PLC0415 (see _lazy)
    from keyd.crypto.spec import CryptSpec  # noqa: PLC0415

    assert layer.cipher is not None and layer.key_size is not None  # the config insists
    key = plain_key(secret, layer.key_size // 8, None if layer.raw_key else layer.hash)
    sector = layer.sector_size or 512
    spec = CryptSpec(device, layer.offset * 512, None, sector, layer.cipher, layer.readonly,
                     served_dir(dm_name), layer.skip, layer.iv_large_sectors)
    return Served(spec, max(sector, logical_block_size(device))), key


class UserspaceCrypt:
    """The :class:`~keyd.engine.ports.CryptPort` of keyd's userspace crypto (FUSE + loop)."""

    def __init__(self, runner: Runner, retry: Retry | None = None,
                 python: str = sys.executable) -> None:
        self.runner = runner
        self.retry = retry or Retry()
        self.python = python

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        """See CryptPort.open: returns the loop device standing for ``dm_name``."""
        if keyfiles:
            raise StorageError(f"{layer.name} of volume {volume}: TrueCrypt keyfiles need "
                               "dm-crypt", fix='set backend = "kernel" on a kernel with dm-crypt')
        _check_fuse()
        secret = shape_key(volume, layer, key)
        try:
            served, data_key = (plain_served(layer, device, dm_name, secret)
                                if layer.type == "plain"
                                else tcrypt_served(volume, layer, device, dm_name, secret))
        except (CryptoError, OSError) as exc:
            refused = _refused(volume, layer, exc)
            if refused is exc:
                raise
            # The refusal carries the cause's words and fix: chained, both would print.
            raise refused from None
        try:
            self._serve(dm_name, served.spec.line(), data_key)
        finally:
            data_key[:] = bytes(len(data_key))
        try:
            return self._attach(served)
        except BaseException:
            self.close(dm_name)
            raise

    def serves(self, dm_name: str) -> bool:
        """Whether ``dm_name`` is served here (its mount exists), not by dm-crypt."""
        return os.path.ismount(served_dir(dm_name))

    def close(self, dm_name: str) -> None:
        """Detach the loop device, unmount (the server flushes and exits), remove the directory."""
        mountpoint = served_dir(dm_name)
        for loop in loops_of(f"{mountpoint}/{SERVED_FILE}"):
            self._detach(loop)
        if os.path.ismount(mountpoint):
            self._unmount(dm_name, mountpoint)
        _wait_gone(server_pids(_server_name(dm_name)), dm_name)
        if os.path.isdir(mountpoint):
            os.rmdir(mountpoint)

    def _serve(self, dm_name: str, spec: bytes, key: bytearray) -> None:
        os.makedirs(os.path.dirname(served_dir(dm_name)), mode=0o700, exist_ok=True)
        # start_new_session: not killed with keydctl's terminal or process group.
        proc = subprocess.Popen(
            [self.python, "-m", "keyd.crypto.serve", _server_name(dm_name)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")})
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(spec)
            proc.stdin.write(key)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; its stderr says why
        if not _await_ready(proc.stdout, time.monotonic() + READY_TIMEOUT):
            if proc.poll() is None:
                proc.kill()
            reason = proc.stderr.read().decode(errors="replace").strip()
            proc.wait()
            raise StorageError(f"the userspace decryption of {dm_name} did not start "
                               f"(exit {proc.returncode}): {reason or 'no message'}")
        proc.stdout.close()
        proc.stderr.close()

    def _attach(self, served: Served) -> str:
        argv = ["losetup", "--find", "--show", "--sector-size", str(served.loop_sector_size)]
        argv += ["--read-only"] if served.spec.read_only else []
        mountpoint = served.spec.mountpoint
        out = self.runner.run([*argv, f"{mountpoint}/{SERVED_FILE}"], timeout=60).stdout.strip()
        if not out.startswith("/dev/loop"):
            raise StorageError(f"losetup did not name a loop device for {mountpoint}",
                               fix="run `losetup --list` to check")
        return out

    def _detach(self, device: str) -> None:
        # Exit 1: gone already (autoclear, or a detach that raced this one).
        self.runner.run(["losetup", "--detach", device], timeout=60, ok_codes=(0, 1))

    def _unmount(self, dm_name: str, mountpoint: str) -> None:
        # The loop device lets go of the file a moment after losetup --detach returns.
        try:
            self.retry.run(lambda: self.runner.run(["umount", mountpoint], timeout=60),
                           busy=lambda exc: exc.returncode == UMOUNT_FAILED)
        except ProgramError as exc:
            raise StorageError(f"{dm_name} is still in use and cannot be closed",
                               fix="unmount what sits on it first") from exc


def fuse_problems() -> list[str]:
    """What this machine lacks for the userspace crypt backend (empty: nothing)."""
    problems = [] if os.path.exists("/dev/fuse") else ["/dev/fuse is missing (modprobe fuse)"]
    if importlib.util.find_spec("pyfuse3") is None:
        problems.append("pyfuse3 is not installed")
    return problems


def _check_fuse() -> None:
    problems = fuse_problems()
    if problems:
        raise StorageError(f"the userspace crypt backend cannot run: {'; '.join(problems)}",
                           fix=FUSE_FIX)


def _refused(volume: str, layer: CryptLayer, exc: Exception) -> Exception:
    if isinstance(exc, KeyRejected | StorageError):
        return exc
    if isinstance(exc, CryptoError):
        return StorageError(f"cannot open {layer.name} of volume {volume} in userspace: {exc.message}",
                            fix=exc.fix)
    return StorageError(f"cannot read {layer.name} of volume {volume}: {exc}",
                        fix="check the layer's device")


def _server_name(dm_name: str) -> str:
    # keyd.crypto.serve takes <volume>-<layer>; dm names are keyd-<volume>-<layer>.
    return dm_name.removeprefix("keyd-")


def _await_ready(stdout: IO[bytes], deadline: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(stdout.fileno(), selectors.EVENT_READ)
        buffer = b""
        while b"\n" not in buffer and time.monotonic() < deadline:
            if selector.select(timeout=max(deadline - time.monotonic(), 0.0)):
                chunk = os.read(stdout.fileno(), 64)
                if not chunk:
                    break
                buffer += chunk
    return buffer.startswith(b"ready\n")


def loops_of(path: str, sys_root: str = "/sys") -> list[str]:
    """The loop devices whose backing file is ``path``."""
    found = []
    for backing in sorted(Path(sys_root, "block").glob("loop*/loop/backing_file")):
        try:
            if backing.read_text().strip() == path:
                found.append(f"/dev/{backing.parent.parent.name}")
        except OSError:
            continue
    return found


def server_pids(name: str, proc_root: str = "/proc") -> list[int]:
    """The keyd.crypto.serve processes serving ``name`` (``@keyd-crypt NAME``)."""
    from keyd.crypto.serve import served_name  # noqa: PLC0415 (see _lazy)

    pids = []
    for entry in Path(proc_root).iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if served_name(cmdline) == name:
            pids.append(int(entry.name))
    return pids


def exited(pid: int, proc_root: str = "/proc") -> bool:
    """Whether ``pid`` has exited; reaps it if it is this process's child (keyd started it)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    except ChildProcessError:
        pass  # not ours: keyd restarted since, or keydctl started it
    try:
        stat = Path(proc_root, str(pid), "stat").read_text()
    except OSError:
        return True
    if stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
        return False
    # A child of ours that exited between the waitpid above and the read: reap it now.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def _wait_gone(pids: list[int], dm_name: str) -> None:
    # The backing device is free (O_EXCL) only once the server has exited.
    deadline = time.monotonic() + EXIT_TIMEOUT
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [pid for pid in pids if not exited(pid)]
    if pids:
        raise StorageError(f"the userspace decryption of {dm_name} (PID {pids[0]}) did not exit "
                           f"within {EXIT_TIMEOUT:.0f} s of its unmount",
                           fix=f"check the journal for keyd-crypt; kill {pids[0]} if it hangs")
