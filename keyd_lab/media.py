"""Disk and USB-stick images for the lab, built on the host without root."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keyd.runner import Runner
from keyd_lab.errors import LabError

STICK_FILESYSTEMS = ("vfat", "exfat", "ext4", "ext2", "squashfs")


@dataclass(frozen=True)
class StickSpec:
    """How a stick looks to the guest: its image and the USB identity QEMU gives it."""

    image: Path
    serial: str
    vendor: str = "keyd"
    product: str = "Lab Stick"


def create_disk(path: Path, size_mb: int) -> Path:
    """A sparse raw disk image of ``size_mb`` MiB (zeros cost no host space)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as image:
        image.truncate(size_mb << 20)
    return path


def build_stick(runner: Runner, path: Path, *, fs: str = "vfat", label: str = "KEYD",
                files: Mapping[str, bytes] | None = None, size_mb: int = 32) -> Path:
    """Build a stick image with filesystem ``fs``, ``label`` and ``files`` (relative path -> bytes)."""
    if fs not in STICK_FILESYSTEMS:
        raise LabError(f"the lab cannot build a {fs} stick",
                       fix=f"use one of: {', '.join(STICK_FILESYSTEMS)}")
    files = files or {}
    with tempfile.TemporaryDirectory(prefix="keyd-stick-") as tmp:
        source = Path(tmp)
        for name, data in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
        if fs == "squashfs":
            path.unlink(missing_ok=True)
            runner.run(["mksquashfs", str(source), str(path), "-noappend", "-quiet"])
            return path
        create_disk(path, size_mb)
        _format(runner, path, fs, label=label, source=source, has_files=bool(files))
    return path


def _format(runner: Runner, path: Path, fs: str, *, label: str, source: Path, has_files: bool) -> None:
    if fs == "vfat":
        runner.run(["mkfs.vfat", "-n", label, str(path)])
        if has_files:
            entries = [str(p) for p in source.iterdir()]
            runner.run(["mcopy", "-s", "-i", str(path), *entries, "::/"])
    elif fs in ("ext4", "ext2"):
        runner.run([f"mkfs.{fs}", "-q", "-F", "-L", label, "-d", str(source), str(path)])
    elif fs == "exfat":
        if has_files:
            raise LabError("the lab cannot put files on an exfat stick without mounting it",
                           fix="use vfat or ext4 for sticks with files, or copy them in the guest")
        runner.run(["mkfs.exfat", "-L", label, str(path)])
