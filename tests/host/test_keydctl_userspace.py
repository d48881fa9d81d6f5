"""keydctl on this very kernel, which has no device-mapper: TrueCrypt and VeraCrypt volumes
opened through keyd's userspace crypto (FUSE + loop), written, locked, unlocked, read back.

The volumes are made by tests/support/veracrypt.py from the published format, with an
ext4 made by mkfs.ext4 in a plain file and encrypted there, one 512-byte XTS unit at a
time: nothing of keyd's crypto makes what keyd then opens. The disk is a loop device, with
4096-byte sectors for seed 000's TrueCrypt volume (the case TrueCrypt's own userspace mode
refused).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyd.engine.names import SERVED_FILE, dm_name, served_dir
from tests import configs
from tests.host.support import attached, loops_backed_by, mounted_at, run
from tests.support import veracrypt

KEYDCTL = [sys.executable, "-m", "keyd.cli.main"]
PASSPHRASE = b"raspberry pi nas 2013"
MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One volume: how it is made and how keyd.toml describes it."""

    volume: str
    layer: str
    truecrypt: bool
    disk_sector_size: int

    def config(self, device: str, mountpoint: Path) -> str:
        if self.truecrypt:
            return configs.seed_000(device, volume=self.volume, mountpoint=str(mountpoint))
        return configs.veracrypt_ext4(device, prf="sha256", pim=3, volume=self.volume,
                                      mountpoint=str(mountpoint))


CASES = [Case("hostnas", "tc", truecrypt=True, disk_sector_size=4096),
         Case("hostvault", "vc", truecrypt=False, disk_sector_size=512)]


def make_volume(directory: Path, case: Case, size: int = 40 * MiB) -> Path:
    """A TrueCrypt/VeraCrypt image whose data area holds a fresh ext4."""
    plain = directory / "ext4.img"
    data_size = size - 2 * veracrypt.DATA_OFFSET
    with plain.open("wb") as out:
        out.truncate(data_size)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(plain)])
    image = directory / f"{case.volume}.img"
    # TrueCrypt knows no sha256 and no PIM: sha512 at its 1000 iterations.
    prf, pim = ("sha512", None) if case.truecrypt else ("sha256", 3)
    veracrypt.write_volume(image, size, PASSPHRASE, prf=prf, pim=pim, truecrypt=case.truecrypt,
                           data=plain.read_bytes(), sector_size=case.disk_sector_size)
    plain.unlink()
    return image


def keydctl(*args: str) -> str:
    return run([*KEYDCTL, *args])


@contextlib.contextmanager
def locked_at_the_end(volume: str, config: Path, run_dir: Path) -> Iterator[None]:
    try:
        yield
    finally:
        subprocess.run([*KEYDCTL, "lock", volume, "--direct", "--config", str(config),
                        "--run-dir", str(run_dir)], capture_output=True, check=False)


def served_pids(name: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"^@keyd-crypt {name}"], capture_output=True,
                          text=True, check=False).stdout.split()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.volume)
def test_keydctl_opens_locks_and_reopens_a_volume_in_userspace(tmp_path: Path, case: Case) -> None:
    image = make_volume(tmp_path, case)
    mountpoint, run_dir = tmp_path / "mnt", tmp_path / "run"
    key_file = tmp_path / "passphrase"
    key_file.write_bytes(PASSPHRASE)
    config = tmp_path / "keyd.toml"
    mapping = dm_name(case.volume, case.layer)
    served = Path(served_dir(mapping))
    with attached(image, sector_size=case.disk_sector_size) as disk:
        config.write_text(case.config(disk, mountpoint))
        common = ["--config", str(config), "--run-dir", str(run_dir)]
        with locked_at_the_end(case.volume, config, run_dir):
            keydctl("unlock", case.volume, "--direct", "--key-file", str(key_file), *common)
            status = keydctl("status", case.volume, *common)
            assert "userspace crypto" in status, status
            [loop] = loops_backed_by(served / SERVED_FILE)
            assert run(["blockdev", "--getss", loop]).strip() == str(case.disk_sector_size)
            (mountpoint / "photos.txt").write_text("holiday 2013\n")
            os.sync()
            keydctl("lock", case.volume, "--direct", *common)
            assert not mounted_at(mountpoint) and not mounted_at(served)
            assert not served.exists() and not loops_backed_by(served / SERVED_FILE)
            assert served_pids(f"{case.volume}-{case.layer}") == []

            keydctl("unlock", case.volume, "--direct", "--key-file", str(key_file), *common)
            assert (mountpoint / "photos.txt").read_text() == "holiday 2013\n"
            keydctl("lock", case.volume, "--direct", *common)
        assert not mounted_at(served)


def test_a_wrong_passphrase_is_a_rejected_key_and_leaves_nothing(tmp_path: Path) -> None:
    case = CASES[1]
    image = make_volume(tmp_path, case, size=8 * MiB)
    key_file = tmp_path / "wrong"
    key_file.write_bytes(b"not the passphrase")
    config = tmp_path / "keyd.toml"
    with attached(image, sector_size=512) as disk:
        config.write_text(case.config(disk, tmp_path / "mnt"))
        done = subprocess.run([*KEYDCTL, "unlock", case.volume, "--direct", "--key-file",
                               str(key_file), "--config", str(config), "--run-dir",
                               str(tmp_path / "run")], capture_output=True, text=True, check=False)
    assert done.returncode == 6, done.stderr
    assert "wrong passphrase, or /dev/loop" in done.stderr, done.stderr
    assert not Path(served_dir(dm_name(case.volume, case.layer))).exists()
