"""Prepares everything a boot needs (kernel and initramfs), from the cache when possible."""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from keyd.runner import Runner
from keyd_lab import initramfs, zfs
from keyd_lab.errors import LabError
from keyd_lab.kernel import Kernel, cache_dir, cache_locked, ensure_kernel, extract_vmlinux
from keyd_lab.progress import phase
from keyd_lab.vm import QEMU


@dataclass(frozen=True)
class Artifacts:
    """A bootable kernel and the initramfs built for it."""

    kernel: Kernel
    initramfs: Path


def check_host() -> None:
    """Fail early, with the install command, if the host lacks what the lab needs."""
    missing = [(tool, package) for tool, package in
               ((QEMU, "qemu-system-x86"), ("dpkg-deb", "dpkg"), ("depmod", "kmod"))
               if shutil.which(tool) is None]
    if not Path("/bin/busybox").exists():
        missing.append(("busybox", "busybox-static"))
    if missing:
        tools = ", ".join(tool for tool, _ in missing)
        packages = " ".join(sorted({package for _, package in missing}))
        raise LabError(f"the lab needs {tools}", fix=f"apt-get install {packages} (or run 'make deps')")


def prepare(runner: Runner, timings: dict[str, float] | None = None) -> Artifacts:
    """Return the kernel and initramfs, building whatever the cache lacks (one builder at a time)."""
    check_host()
    with cache_locked(cache_dir()):
        return _prepare(runner, timings)


def _prepare(runner: Runner, timings: dict[str, float] | None) -> Artifacts:
    kernel = ensure_kernel(runner, timings)
    if not kernel.vmlinux.exists():
        with phase("decompress the kernel for PVH boot", timings):
            extract_vmlinux(kernel)
    target = kernel.root.parent / f"initramfs-{_initramfs_key()}.cpio.gz"
    if not target.exists():
        with phase("build initramfs", timings):
            initramfs.build_initramfs(kernel, target)
    if zfs.zfs_enabled():
        # Same image, modules tree with OpenZFS added: loaded only on demand, so boots are no slower.
        kernel = zfs.ensure_zfs(runner, kernel, timings)
    return Artifacts(kernel, target)


def _initramfs_key() -> str:
    # Rebuild when the init script, the module list or busybox changes.
    digest = hashlib.sha256(initramfs.INIT_SCRIPT.read_bytes())
    digest.update(" ".join(initramfs.MODULES).encode())
    digest.update(str(initramfs.BUSYBOX.stat().st_size).encode())
    return digest.hexdigest()[:12]


def new_run_dir(label: str = "run") -> Path:
    """A fresh directory for one boot's sockets, logs and artifacts."""
    path = cache_dir() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{time.monotonic_ns() % 100000}"
    path.mkdir(parents=True)
    return path
