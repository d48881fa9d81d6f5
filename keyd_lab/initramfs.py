"""Builds the lab's busybox initramfs as a newc cpio archive, in Python, without root.

Device nodes and modes are written straight into the archive, so nothing
needs mknod or chown on the host.
"""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

from keyd_lab.errors import LabError
from keyd_lab.kernel import Kernel

BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("init.sh")
# Loaded in this order by init.sh; virtio_console brings the command channel up early.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "virtio_console", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p", "overlay")


class CpioWriter:
    """Accumulates newc cpio entries in memory."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        """Add one entry: a directory, file or device node by ``mode``."""
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._chunks += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]
        self._ino += 1

    def archive(self) -> bytes:
        """The finished archive, with its trailer."""
        self.add("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def build_initramfs(kernel: Kernel, target: Path) -> Path:
    """Write the gzipped initramfs for ``kernel`` to ``target`` (atomically) and return it."""
    if not BUSYBOX.exists():
        raise LabError(f"{BUSYBOX} is missing", fix="apt-get install busybox-static")
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot"):
        cpio.add(directory, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    cpio.add("init", stat.S_IFREG | 0o755, INIT_SCRIPT.read_bytes())
    for module in MODULES:
        cpio.add(f"modules/{module}.ko", stat.S_IFREG | 0o644, kernel.module(module).read_bytes())
    partial = target.with_suffix(".partial")
    partial.write_bytes(gzip.compress(cpio.archive(), compresslevel=1))
    partial.rename(target)
    return target
