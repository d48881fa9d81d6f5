"""The lab's Debian kernel: resolved from apt, downloaded, extracted and depmod'ed once, then cached.

The cache is keyed by the kernel package's name and version, so a second run
costs a directory lookup, and a new Debian kernel gets a fresh entry.
"""

from __future__ import annotations

import fcntl
import lzma
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from keyd.errors import ProgramError
from keyd.runner import Runner
from keyd_lab.errors import LabError
from keyd_lab.progress import phase

METAPACKAGE = "linux-image-amd64"
COMPLETE = ".complete"
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class Kernel:
    """An extracted kernel: its image, its modules tree and its release string."""

    package: str
    version: str
    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        """The bootable kernel image."""
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel: QEMU boots it via PVH, skipping XZ under TCG."""
        return self.root / "boot" / f"vmlinux-{self.release}"

    @property
    def modules(self) -> Path:
        """The ``lib/modules`` directory (bind-mounted over the guest's)."""
        return self.root / "lib" / "modules"

    def module(self, name: str) -> Path:
        """Path of one module's .ko file, found through modules.dep."""
        return self.modules / self.release / _module_paths(self.modules / self.release)[name]


def cache_dir() -> Path:
    """Root of the lab cache: ``$XDG_CACHE_HOME/keyd-lab`` or ``~/.cache/keyd-lab``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keyd-lab"


@contextmanager
def cache_locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock: several test sessions (pytest-xdist workers) may start at once;
    one builds what the cache lacks, the others wait for it and then use it."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def resolve_package(runner: Runner) -> tuple[str, str]:
    """The kernel package to use and its candidate version, from apt.

    ``KEYD_LAB_KERNEL`` names a package explicitly; otherwise the one that
    Debian's ``linux-image-amd64`` currently depends on.
    """
    package = os.environ.get("KEYD_LAB_KERNEL") or _metapackage_target(runner)
    policy = runner.run(["apt-cache", "policy", package]).stdout
    match = re.search(r"Candidate:\s*(\S+)", policy)
    if not match or match.group(1) == "(none)":
        raise LabError(f"apt knows no version of {package}",
                       fix="run 'apt-get update' (the lab downloads its kernel with apt)")
    return package, match.group(1)


def _metapackage_target(runner: Runner) -> str:
    depends = runner.run(["apt-cache", "depends", METAPACKAGE]).stdout
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", depends)
    if not match:
        raise LabError(f"apt cannot resolve {METAPACKAGE} to a kernel package",
                       fix="run 'apt-get update', or set KEYD_LAB_KERNEL=linux-image-6.1.0-NN-amd64")
    return match.group(1)


def ensure_kernel(runner: Runner, timings: dict[str, float] | None = None) -> Kernel:
    """Return the cached kernel, downloading and extracting it first if needed."""
    try:
        package, version = resolve_package(runner)
    except (LabError, ProgramError):
        cached = newest_cached()
        if cached is None:
            raise
        return cached
    entry = cache_dir() / "kernel" / f"{package}_{version}"
    if not (entry / COMPLETE).exists():
        _build_entry(runner, package, entry, timings)
    return _load(entry, package, version)


def extract_vmlinux(kernel: Kernel) -> Path:
    """Decompress the bzImage's XZ payload into ``kernel.vmlinux`` (atomically) and return it.

    Debian's kernels are XZ-compressed; decompressing them in the emulated
    guest costs about 5 s of every boot, here it costs 1 s once.
    """
    image = kernel.vmlinuz.read_bytes()
    start = image.find(XZ_MAGIC)
    if start < 0:
        raise LabError(f"{kernel.vmlinuz} has no XZ payload", fix="set KEYD_LAB_KERNEL to a Debian kernel")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
    if not elf.startswith(b"\x7fELF"):
        raise LabError(f"the payload of {kernel.vmlinux} is not an ELF kernel")
    partial = kernel.vmlinux.with_suffix(".partial")
    partial.write_bytes(elf)
    partial.rename(kernel.vmlinux)
    return kernel.vmlinux


def newest_cached() -> Kernel | None:
    """The most recently built cached kernel, for when apt cannot be asked."""
    entries = sorted((cache_dir() / "kernel").glob("*/" + COMPLETE), key=lambda p: p.stat().st_mtime)
    if not entries:
        return None
    package, _, version = entries[-1].parent.name.partition("_")
    return _load(entries[-1].parent, package, version)


def _build_entry(runner: Runner, package: str, entry: Path, timings: dict[str, float] | None) -> None:
    staging = entry.with_name(entry.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with phase(f"download {package}", timings):
        runner.run(["apt-get", "download", package], cwd=staging, timeout=600)
    debs = list(staging.glob("*.deb"))
    if len(debs) != 1:
        raise LabError(f"apt-get download {package} left {len(debs)} .deb files in {staging}")
    with phase("extract kernel", timings):
        runner.run(["dpkg-deb", "-x", str(debs[0]), str(staging / "root")], timeout=300)
        debs[0].unlink()
        release = _release_of(staging / "root")
        runner.run(["depmod", "-b", str(staging / "root"), release], timeout=300)
    (staging / COMPLETE).write_text(release + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    staging.rename(entry)


def _release_of(root: Path) -> str:
    releases = [p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir()]
    if len(releases) != 1:
        raise LabError(f"expected one kernel release under {root}/lib/modules, found {releases}")
    return releases[0]


def _load(entry: Path, package: str, version: str) -> Kernel:
    release = (entry / COMPLETE).read_text().strip()
    return Kernel(package=package, version=version, release=release, root=entry / "root")


def _module_paths(release_dir: Path) -> dict[str, str]:
    paths: dict[str, str] = {}
    for line in (release_dir / "modules.dep").read_text().splitlines():
        path = line.split(":", 1)[0]
        name = Path(path).name.split(".ko", 1)[0].replace("-", "_")
        paths[name] = path
    return paths
