"""Safe stick mounting against a fake runner that plays the kernel's part on a real directory."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from keyd.errors import ProgramError
from keyd.runner import DEFAULT_TIMEOUT, Completed
from keyd.trust.errors import Reason, StickMountError, UnsafeStickError
from keyd.trust.stick_mount import MOUNT_OPTIONS, StickMounter


class FakeMountRunner:
    """'Mounts' by copying a prepared stick tree into the mount point; 'umount' empties it."""

    def __init__(self, stick: Path | None, *, fail: Sequence[str] = ()) -> None:
        self.stick = stick
        self.fail = list(fail)  # argv prefixes (joined by space) that fail, once each
        self.calls: list[list[str]] = []
        self.mode_at_mount: int | None = None

    def run(self, argv: Sequence[str], *, secret: bytes | bytearray | None = None,
            timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
            cwd: str | os.PathLike[str] | None = None, argv0: str | None = None) -> Completed:
        argv = list(argv)
        self.calls.append(argv)
        joined = " ".join(argv)
        for prefix in self.fail:
            if joined.startswith(prefix):
                self.fail.remove(prefix)
                raise ProgramError(argv, 32, f"{argv[0]}: simulated failure")
        if argv[0] == "mount":
            point = Path(argv[-1])
            self.mode_at_mount = stat.S_IMODE(point.stat().st_mode)
            if self.stick is not None:
                shutil.copytree(self.stick, point, dirs_exist_ok=True)
        elif argv[0] == "umount":
            point = Path(argv[-1])
            for child in point.iterdir():
                shutil.rmtree(child)
        return Completed(tuple(argv), 0, "", "", 0.0)


@pytest.fixture
def stick(plain_stick: Path) -> Path:
    """The stick tree the fake mount copies in."""
    return plain_stick


def mounter(runner: FakeMountRunner, tmp_path: Path) -> StickMounter:
    return StickMounter(runner, run_dir=str(tmp_path / "run" / "keyd"))


def test_stick_is_mounted_read_only_read_and_unmounted(stick: Path, tmp_path: Path) -> None:
    runner = FakeMountRunner(stick)
    result = mounter(runner, tmp_path).read("/dev/sdz1", "VFAT")
    with result.bundle as bundle:
        assert bytes(bundle.files["manifest"]) == b"format = 1\n"
    point = result.mount_point
    assert runner.calls == [["mount", "-t", "vfat", "-o", MOUNT_OPTIONS, "/dev/sdz1", point],
                            ["umount", point]]
    assert MOUNT_OPTIONS == "ro,nosuid,nodev,noexec,noatime"
    assert runner.mode_at_mount == 0o700
    assert Path(point).parent == tmp_path / "run" / "keyd"
    assert not Path(point).exists()
    assert stat.S_IMODE((tmp_path / "run" / "keyd").stat().st_mode) == 0o700
    assert result.mounted_seconds >= 0


@pytest.mark.parametrize(("fstype", "options"), [
    ("vfat", "ro,nosuid,nodev,noexec,noatime"),
    ("exfat", "ro,nosuid,nodev,noexec,noatime"),
    ("ext4", "ro,nosuid,nodev,noexec,noatime,noload"),
])
def test_ext4_sticks_are_mounted_without_journal_replay(
        stick: Path, tmp_path: Path, fstype: str, options: str) -> None:
    runner = FakeMountRunner(stick)
    result = mounter(runner, tmp_path).read("/dev/sdz1", fstype.upper())
    result.bundle.wipe()
    assert runner.calls[0] == ["mount", "-t", fstype, "-o", options, "/dev/sdz1",
                               result.mount_point]


@pytest.mark.parametrize("fstype", ["ext2", "squashfs", "ntfs", "", "vfat,exec"])
def test_filesystems_outside_the_allow_list_are_never_mounted(
        stick: Path, tmp_path: Path, fstype: str) -> None:
    runner = FakeMountRunner(stick)
    with pytest.raises(StickMountError) as caught:
        mounter(runner, tmp_path).read("/dev/sdz1", fstype)
    assert caught.value.reason is Reason.UNSUPPORTED_FILESYSTEM
    assert runner.calls == []


def test_allow_list_is_configurable(stick: Path, tmp_path: Path) -> None:
    runner = FakeMountRunner(stick)
    only_ext4 = StickMounter(runner, run_dir=str(tmp_path / "run"), filesystems=("ext4",))
    with pytest.raises(StickMountError):
        only_ext4.read("/dev/sdz1", "vfat")
    only_ext4.read("/dev/sdz1", "ext4").bundle.wipe()


def test_failed_mount_leaves_no_directory(stick: Path, tmp_path: Path) -> None:
    runner = FakeMountRunner(stick, fail=["mount"])
    with pytest.raises(StickMountError) as caught:
        mounter(runner, tmp_path).read("/dev/sdz1", "vfat")
    assert caught.value.reason is Reason.MOUNT_FAILED
    assert list((tmp_path / "run" / "keyd").iterdir()) == []
    assert [call[0] for call in runner.calls] == ["mount"]


def test_failed_unmount_is_retried_lazily_and_reported(stick: Path, tmp_path: Path) -> None:
    runner = FakeMountRunner(stick, fail=["umount /"])
    with pytest.raises(StickMountError) as caught:
        mounter(runner, tmp_path).read("/dev/sdz1", "exfat")
    assert caught.value.reason is Reason.UNMOUNT_FAILED
    assert [call[:2] for call in runner.calls] == [["mount", "-t"], ["umount", runner.calls[1][1]],
                                                   ["umount", "-l"]]
    assert list((tmp_path / "run" / "keyd").iterdir()) == []


def test_stick_without_bundle_is_unmounted_before_the_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = FakeMountRunner(empty)
    with pytest.raises(UnsafeStickError) as caught:
        mounter(runner, tmp_path).read("/dev/sdz1", "ext4")
    assert caught.value.reason is Reason.NO_BUNDLE
    assert runner.calls[-1][0] == "umount"


def test_mount_point_is_yielded_while_mounted(stick: Path, tmp_path: Path) -> None:
    runner = FakeMountRunner(stick)
    with mounter(runner, tmp_path).mounted("/dev/sdz1", "vfat") as point:
        assert (point / "keyd" / "manifest").exists()
        assert runner.calls[-1][0] == "mount"
    assert runner.calls[-1] == ["umount", str(point)]


def test_relative_device_is_refused(stick: Path, tmp_path: Path) -> None:
    runner = FakeMountRunner(stick)
    with pytest.raises(StickMountError):
        mounter(runner, tmp_path).read("sdz1", "vfat")
    assert runner.calls == []


def test_run_dir_that_is_a_symlink_is_refused(stick: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "real")
    runner = FakeMountRunner(stick)
    with pytest.raises(StickMountError):
        StickMounter(runner, run_dir=str(tmp_path / "run")).read("/dev/sdz1", "vfat")
    assert runner.calls == []
