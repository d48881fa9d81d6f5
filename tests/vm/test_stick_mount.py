"""The daemon's stick mount on a real kernel: exact options, unmounted at once, unsafe filesystems refused."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyd.runner import SubprocessRunner
from keyd_lab import gpg_scratch
from keyd_lab.media import StickSpec, build_stick

from .conftest import GuestLab

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "vm" / "guest" / "stick_probe.py"
GUEST_PYTHON = REPO / ".venv" / "bin" / "python"
KEYDCTL = [sys.executable, "-m", "keyd.cli.main"]
SERIAL = "KEYDSTICK3"
# A run directory of the test's own: the daemon tests' keyd keeps its lock files in /run/keyd.
RUN_DIR = "/run/keyd-stick-test"
VOLUMES = ("tank", "media", "backup")


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """A stick directory with signed keys for three volumes, bound to serial KEYDSTICK3."""
    runner = SubprocessRunner()
    base = tmp_path_factory.mktemp("bundle")
    home = gpg_scratch.make_home(base / "gnupg")
    signer = gpg_scratch.new_key(runner, home, "NAS admin <admin@keyd.test>")
    stick = base / "stick"
    for volume in VOLUMES:
        subprocess.run([*KEYDCTL, "enroll", "--volume", volume, "--signing-key", signer,
                        "--signer", signer, "--gnupghome", str(home), "--state-dir", str(base / "state"),
                        "--output", str(stick), "--generate", "64", "--bind-serial", SERIAL],
                       check=True, capture_output=True)
    yield stick, home, signer
    gpg_scratch.stop_agent(runner, home)


def probe(guest: GuestLab, device: str) -> dict[str, Any]:
    out = guest.check([str(GUEST_PYTHON), str(PROBE), device, RUN_DIR], timeout=120).stdout
    report: dict[str, Any] = json.loads(out)
    return report


def verify(directory: Path, home: Path, signer: str) -> dict[str, Any]:
    result = subprocess.run([*KEYDCTL, "verify", str(directory), "--serial", SERIAL, "--json",
                             "--signer", signer, "--gnupghome", str(home),
                             "--state-dir", str(directory.parent / "verify-state")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    verdicts: dict[str, Any] = json.loads(result.stdout)
    return verdicts


def test_vfat_stick_is_mounted_private_readonly_and_unmounted_right_after_reading(
        guest: GuestLab, tmp_path: Path, signed_bundle: tuple[Path, Path, str]) -> None:
    stick_dir, home, signer = signed_bundle
    files = {str(p.relative_to(stick_dir)): p.read_bytes() for p in stick_dir.rglob("*") if p.is_file()}
    image = build_stick(SubprocessRunner(), tmp_path / "keys.img", label="KEYS", files=files)
    device = guest.plug(StickSpec(image, SERIAL))

    report = probe(guest, device)

    assert report["fstype"] == "vfat"
    [line] = report["while_mounted"]
    fields = line.split()
    assert set(fields[5].split(",")) == {"ro", "nosuid", "nodev", "noexec", "noatime"}, line
    assert fields[4].startswith(f"{RUN_DIR}/stick-")
    assert guest.check(["stat", "-c", "%a", RUN_DIR]).stdout.strip() == "700"
    assert report["after_unmount"] == [] and report["left_mounted"] == []
    assert report["left_entries"] == []  # the private mount point is gone too
    # What the guest read through the stick is the whole bundle, and it verifies.
    read_back = tmp_path / "read-back"
    for name, data in report["files"].items():
        (read_back / "keyd" / name).parent.mkdir(parents=True, exist_ok=True)
        (read_back / "keyd" / name).write_bytes(base64.b64decode(data))
    verdicts = verify(read_back, home, signer)
    assert sorted(v["volume"] for v in verdicts["volumes"] if v["accepted"]) == sorted(VOLUMES)
    print(f"\nstick mounted for {report['mounted_seconds']:.3f} s to read a 3-volume bundle")


@pytest.mark.parametrize("fs", ["ext2", "squashfs"])
def test_stick_with_a_filesystem_outside_the_allow_list_is_never_mounted(
        guest: GuestLab, tmp_path: Path, fs: str) -> None:
    image = build_stick(SubprocessRunner(), tmp_path / f"{fs}.img", fs=fs, label="KEYS",
                        files={"keyd/manifest": b"format = 1\n"})
    device = guest.plug(StickSpec(image, f"KEYD{fs.upper()}"[:12]))

    report = probe(guest, device)

    assert report["fstype"] == fs
    assert report["error"] == "UNSUPPORTED_FILESYSTEM"
    assert report["left_mounted"] == [] and report["left_entries"] == []
    mounted = guest.check(["findmnt", "-rno", "SOURCE"]).stdout.split()
    assert device not in mounted


def test_ext4_stick_with_a_dirty_journal_is_read_without_writing_to_it(
        guest: GuestLab, tmp_path: Path) -> None:
    runner = SubprocessRunner()
    image = build_stick(runner, tmp_path / "ext4.img", fs="ext4", label="KEYS",
                        files={"keyd/manifest": b"format = 1\n"})
    # As if the stick was pulled while mounted read-write: the journal needs recovery,
    # which a plain read-only mount would replay, i.e. write to the stick.
    runner.run(["debugfs", "-w", "-R", "feature needs_recovery", str(image)])
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    device = guest.plug(StickSpec(image, "KEYDEXT4"))

    report = probe(guest, device)
    guest.unplug("KEYDEXT4")

    assert report["fstype"] == "ext4" and "error" not in report, report
    assert base64.b64decode(report["files"]["manifest"]) == b"format = 1\n"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
