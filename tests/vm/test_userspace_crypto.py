"""keyd's userspace crypto on a real kernel: the same bytes as dm-crypt, both ways, and seed 000
as it was, on a kernel without dm-crypt, through keyd.service (a crash of keyd included).

Equivalence: for each kind of volume (TrueCrypt by tcplay and VeraCrypt with a PRF and PIM
of its own, each on 512- and 4096-byte-sector disks; plain aes-cbc-plain with seed 001's
kind of raw key, and aes-cbc-essiv:sha256 with 4096-byte sectors), cryptsetup (dm-crypt)
writes random data at the start of the decrypted device, keydctl opens the layer with
``backend = "userspace"`` and must read the same bytes from its loop device, then writes
other random data that dm-crypt must read back. The volumes come from the real programs
where Debian has them (tcplay, cryptsetup's plain mode); VeraCrypt's header is written on
the host from the published format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from keyd_lab.daemon_setup import (
    Signer,
    config_toml,
    install_keyd,
    journal_text,
    make_stick,
    start_keyd,
    wait_state,
    wait_until,
)
from tests import configs
from tests.support import veracrypt

from .conftest import GuestLab
from .fixtures.keydctl import Keydctl, tcplay

PASSPHRASE = "Raspberry NAS 2013 passphrase"
RAW_KEY = bytes(range(16))  # seed 001's kind: a key file whose first 16 bytes are the key
SAMPLE = 4 << 20  # bytes compared at the start of the decrypted device
NO_DM_CRYPT = "/etc/modprobe.d/keyd-test-no-dm-crypt.conf"


@dataclass(frozen=True)
class Case:
    """A volume kind: its disk, how it is made, how cryptsetup opens it, how keyd.toml says it."""

    name: str
    sector_size: int
    crypt: configs.Crypt
    kernel_open: tuple[str, ...]  # cryptsetup open options, before DEVICE NAME
    key: bytes

    @property
    def kernel_input(self) -> bytes:
        """What cryptsetup reads on stdin: TCRYPT a passphrase line, plain a key file."""
        return self.key + b"\n" if self.crypt["type"] in ("tcrypt", "veracrypt") else self.key

    def config(self, disk: str) -> str:
        return configs.crypt_layer("eq", "c", {**self.crypt, "backend": "userspace"}, device=disk)


VERACRYPT: configs.Crypt = {"type": "veracrypt", "hash": "sha256", "pim": 1}
VERACRYPT_OPEN = ("--type", "tcrypt", "--veracrypt", "--hash", "sha256", "--veracrypt-pim=1")
CASES = [
    Case("tcplay-4k", 4096, configs.TCRYPT, ("--type", "tcrypt"), PASSPHRASE.encode()),
    Case("tcplay-512", 512, configs.TCRYPT, ("--type", "tcrypt"), PASSPHRASE.encode()),
    Case("veracrypt-4k", 4096, VERACRYPT, VERACRYPT_OPEN, PASSPHRASE.encode()),
    Case("veracrypt-512", 512, VERACRYPT, VERACRYPT_OPEN, PASSPHRASE.encode()),
    Case("plain-aes-cbc-plain", 512, configs.PLAIN_2006,
         ("--type", "plain", "--cipher", "aes-cbc-plain", "--key-size", "128", "--hash", "plain",
          "--key-file=-"), RAW_KEY),
    Case("plain-essiv-4k", 4096, {"type": "plain", "cipher": "aes-cbc-essiv:sha256",
                                  "key_size": 256, "hash": "sha256", "sector_size": 4096},
         ("--type", "plain", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256",
          "--hash", "sha256", "--sector-size", "4096", "--key-file=-"), PASSPHRASE.encode()),
]


def make_disk(guest: GuestLab, case: Case, tmp_path: Path) -> str:
    serial = f"EQ{case.name.upper().replace('-', '')}"[:20]
    if case.crypt["type"] == "veracrypt":
        image = tmp_path / f"{serial}.img"
        veracrypt.write_volume(image, 32 << 20, case.key, prf="sha256", pim=1,
                               sector_size=case.sector_size)
        path = guest.lab.attach_disk(image, serial, sector_size=case.sector_size)
        guest._disks.append(serial)  # GuestLab.reset() detaches what is listed
        return path
    disk = guest.disk(serial, 32, sector_size=case.sector_size)
    if case.crypt["type"] == "tcrypt":
        tcplay(guest, PASSPHRASE, "-c", "-d", disk, "-z", "-w", "-a", "RIPEMD160", "-b",
               "AES-256-XTS")
    return disk


def fill(guest: GuestLab, device: str) -> str:
    """Write SAMPLE random bytes at the start of ``device`` (direct, synced); their sha256."""
    return guest.sh(f"head -c {SAMPLE} /dev/urandom > /run/eq.bin && "
                    f"dd if=/run/eq.bin of={device} bs=1M oflag=direct conv=fsync status=none && "
                    "sha256sum < /run/eq.bin | cut -d' ' -f1").strip()


def digest(guest: GuestLab, device: str) -> str:
    return guest.sh(f"dd if={device} bs=1M count={SAMPLE >> 20} iflag=direct status=none | "
                    "sha256sum | cut -d' ' -f1").strip()


def kernel_open(guest: GuestLab, case: Case, disk: str) -> str:
    guest.check(["cryptsetup", "open", *case.kernel_open, disk, "eqkern"],
                input=case.kernel_input, timeout=300)
    return "/dev/mapper/eqkern"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_userspace_and_dm_crypt_read_what_the_other_wrote(guest: GuestLab, tmp_path: Path,
                                                          case: Case) -> None:
    disk = make_disk(guest, case, tmp_path)
    written_by_kernel = fill(guest, kernel_open(guest, case, disk))
    guest.check(["cryptsetup", "close", "eqkern"])

    keyd = Keydctl(guest, "/etc/keyd/eq.toml").write_config(case.config(disk))
    guest.check(["sh", "-c", "cat > /run/eq.key"], input=case.key)
    keyd.ok("unlock", "eq", "--key-file", "/run/eq.key")
    layer = keyd.status("eq")["by_name"]["c"]
    assert "userspace crypto" in layer["detail"], layer
    loop = layer["device"]
    assert loop.startswith("/dev/loop"), layer
    assert guest.check(["blockdev", "--getss", loop]).stdout.strip() == str(case.sector_size)
    assert digest(guest, loop) == written_by_kernel
    written_in_userspace = fill(guest, loop)
    keyd.ok("lock", "eq")
    assert guest.sh("findmnt -rn -t fuse.keyd-crypt || true").strip() == ""

    assert digest(guest, kernel_open(guest, case, disk)) == written_in_userspace
    guest.check(["cryptsetup", "close", "eqkern"])


def seed_000_toml(signer: Signer, disk: str) -> str:
    return config_toml(signer, configs.crypt_mount(
        "nas", disk, configs.TCRYPT, names=("tc", "media"), fstype="ext4", mountpoint="/mnt/t/nas",
        policy={"lock_on_removal": True, "grace": 1}))


def test_seed_000_unlocks_through_keyd_on_a_kernel_without_dm_crypt(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    disk = guest.disk("PINAS4K", 64, sector_size=4096)
    tcplay(guest, PASSPHRASE, "-c", "-d", disk, "-z", "-w", "-a", "RIPEMD160", "-b", "AES-256-XTS")
    tcplay(guest, PASSPHRASE, "-m", "tcsetup", "-d", disk)
    guest.sh("mkfs.ext4 -q /dev/mapper/tcsetup && mkdir -p /mnt/t/setup && mount /dev/mapper/tcsetup"
             " /mnt/t/setup && echo written-by-tcplay > /mnt/t/setup/origin && umount /mnt/t/setup",
             timeout=120)
    guest.check(["tcplay", "-u", "tcsetup"])
    # As on the seed's Raspberry Pi: the kernel cannot do dm-crypt.
    guest.sh(f"echo 'install dm_crypt /bin/false' > {NO_DM_CRYPT} && "
             "{ modprobe -r dm_crypt || true; }")
    assert guest.run(["modprobe", "dm_crypt"]).rc != 0
    assert guest.sh("lsmod | grep -c '^dm_crypt' || true").strip() == "0"

    install_keyd(guest, signer, seed_000_toml(signer, disk))
    start_keyd(guest)
    guest.plug(make_stick(tmp_path, signer, "PINASKEY", {"nas": PASSPHRASE.encode()}))
    assert wait_state(guest, "nas", "unlocked", 300), journal_text(guest, "keyd.service")

    assert guest.sh("lsmod | grep -c '^dm_crypt' || true").strip() == "0"
    served = guest.sh("findmnt -rn -t fuse.keyd-crypt -o TARGET,SOURCE").split()
    assert served[0] == "/run/keyd/crypt/keyd-nas-tc", served
    assert guest.sh(f"readlink -f {served[1]}") == guest.sh(f"readlink -f {disk}")
    assert guest.run(["pgrep", "-f", "^@keyd-crypt nas-tc"]).rc == 0
    assert guest.check(["cat", "/mnt/t/nas/origin"]).stdout == "written-by-tcplay\n"
    source = guest.check(["findmnt", "-n", "-o", "SOURCE", "/mnt/t/nas"]).stdout.strip()
    assert guest.check(["blockdev", "--getss", source]).stdout.strip() == "4096"
    guest.sh("head -c 1048576 /dev/urandom > /mnt/t/nas/blob && sync")
    blob = guest.sh("sha256sum < /mnt/t/nas/blob").split()[0]

    # keyd crashes: its successor finds the layer served (the same server) and adopts it.
    server = guest.check(["pgrep", "-f", "^@keyd-crypt nas-tc"]).stdout.split()
    guest.check(["systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", "keyd.service"])
    assert wait_until(guest, "systemctl is-active keyd.service", 120)
    assert wait_state(guest, "nas", "unlocked", 120), journal_text(guest, "keyd.service")
    assert guest.check(["pgrep", "-f", "^@keyd-crypt nas-tc"]).stdout.split() == server

    guest.unplug("PINASKEY")
    assert wait_state(guest, "nas", "locked", 180), journal_text(guest, "keyd.service")
    left = guest.sh("{ findmnt -rn -o TARGET,FSTYPE /mnt/t/nas; findmnt -rn -t fuse.keyd-crypt; "
                    "pgrep -af '^@keyd-crypt'; } || true")
    assert left.strip() == "", left

    # dm-crypt back: the kernel reads what userspace wrote.
    guest.sh(f"rm {NO_DM_CRYPT}")
    guest.check(["cryptsetup", "open", "--type", "tcrypt", disk, "tccheck"],
                input=PASSPHRASE + "\n", timeout=300)
    guest.sh("mkdir -p /mnt/t/check && mount -o ro /dev/mapper/tccheck /mnt/t/check")
    assert guest.sh("sha256sum < /mnt/t/check/blob").split()[0] == blob
