"""Stick and disk images are built on the host without root, readable with the filesystems' own tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from keyd.runner import SubprocessRunner
from keyd_lab.errors import LabError
from keyd_lab.media import build_stick, create_disk


def test_disks_are_sparse_files_of_the_requested_size(tmp_path: Path) -> None:
    disk = create_disk(tmp_path / "d.img", 512)
    assert disk.stat().st_size == 512 << 20
    assert disk.stat().st_blocks == 0


def test_vfat_stick_has_its_label_and_files(tmp_path: Path) -> None:
    image = build_stick(SubprocessRunner(), tmp_path / "s.img", label="KEYS",
                        files={"keyd/manifest": b"format = 1\n", "top.txt": b"hi"})
    listing = subprocess.run(["mtype", "-i", str(image), "::/keyd/manifest"], capture_output=True,
                             check=True).stdout
    assert listing == b"format = 1\n"
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(image)], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert label == "KEYS"


def test_ext4_stick_has_its_files(tmp_path: Path) -> None:
    image = build_stick(SubprocessRunner(), tmp_path / "s.img", fs="ext4", files={"keyd/k": b"\x00\x01"})
    dumped = subprocess.run(["debugfs", "-R", "cat /keyd/k", str(image)], capture_output=True,
                            check=True).stdout
    assert dumped == b"\x00\x01"


def test_unknown_filesystems_and_files_on_exfat_are_refused_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="cannot build a btrfs stick"):
        build_stick(SubprocessRunner(), tmp_path / "s.img", fs="btrfs")
    with pytest.raises(LabError) as error:
        build_stick(SubprocessRunner(), tmp_path / "s.img", fs="exfat", files={"a": b"b"})
    assert error.value.fix is not None and "vfat or ext4" in error.value.fix
