"""Seed 000 on a real kernel: TrueCrypt on a 4 KiB-sector disk, and VeraCrypt with a pinned PRF.

The TrueCrypt volume is made by tcplay in the guest (as the seed's author made
his on Ubuntu) and keyd opens it with cryptsetup's TCRYPT support, where
TrueCrypt 7.1a refused 4K-sector disks. No Debian tool creates VeraCrypt
volumes, so that header is written on the host from the published format
(tests/support/veracrypt.py). keyd is driven only through keydctl in the
guest; results are read from the kernel (dmsetup, findmnt, sysfs, checksums).
"""

from __future__ import annotations

from pathlib import Path

from tests.configs import seed_000, veracrypt_ext4
from tests.support import veracrypt

from .conftest import GuestLab
from .fixtures.keydctl import Kernel, Keydctl, tcplay

PASSPHRASE = "Raspberry NAS 2013 passphrase"
TC_DATA_OFFSET = 131072 // 512  # TrueCrypt's data area starts 128 KiB in, in 512-byte sectors


def crypt_table(guest: GuestLab, name: str) -> dict[str, str]:
    """The dm-crypt table of ``name`` without its key field."""
    fields = guest.check(["dmsetup", "table", name]).stdout.split()
    assert fields[2] == "crypt", fields[:3]
    return {"start": fields[0], "length": fields[1], "cipher": fields[3], "iv_offset": fields[5],
            "device": fields[6], "offset": fields[7], "options": " ".join(fields[8:])}


def tc_config(device: str) -> str:
    """Volume nas: the seed's TrueCrypt volume on ``device``, ext4 at /mnt/t/nas."""
    return seed_000(device, mountpoint="/mnt/t/nas",
                    description="seed 000: TrueCrypt on a 4K-sector USB disk, ext4 inside")


def test_tcplay_volume_on_a_4k_sector_disk_unlocks_locks_and_keeps_its_data(
        guest: GuestLab) -> None:
    kernel = Kernel(guest)
    disk = guest.disk("TC4K000", 64, sector_size=4096)
    assert guest.check(["blockdev", "--getss", disk]).stdout.strip() == "4096"
    tcplay(guest, PASSPHRASE, "-c", "-d", disk, "-z", "-w", "-a", "RIPEMD160", "-b", "AES-256-XTS")
    # Format and fill it through tcplay's own mapping: keyd must read what TrueCrypt tools wrote.
    tcplay(guest, PASSPHRASE, "-m", "tcsetup", "-d", disk)
    guest.sh("mkfs.ext4 -q -L nas /dev/mapper/tcsetup && mkdir -p /mnt/t/setup"
             " && mount /dev/mapper/tcsetup /mnt/t/setup && echo written-by-tcplay >"
             " /mnt/t/setup/origin && umount /mnt/t/setup", timeout=120)
    guest.check(["tcplay", "-u", "tcsetup"])
    dump = guest.check(["cryptsetup", "tcryptDump", "--disable-veracrypt", disk],
                       input=PASSPHRASE + "\n", timeout=300).stdout
    # tcplay records the disk's 4096-byte sectors in the header; TrueCrypt's XTS data unit stays
    # 512 bytes whatever the sector size, and that is what cryptsetup maps (checked below).
    assert "Sector size:\t4096" in dump and "MK offset:\t131072" in dump, dump
    keyd = Keydctl(guest, "/etc/keyd/seed000.toml").write_config(tc_config(disk))
    doctor = keyd("doctor")
    assert doctor.rc == 0, doctor
    assert f"nas/tc: {disk} -> /dev/vd" in doctor.stdout
    assert "4096-byte sectors" in doctor.stdout, doctor.stdout
    wrong = keyd("unlock", "nas", "--passphrase", input="not the passphrase\n")
    assert wrong.rc == 6 and "wrong key for volume nas" in wrong.stderr, wrong
    assert kernel.dm() == [] and kernel.findmnt("/mnt/t/nas") == ""

    first = keyd("unlock", "nas", "--passphrase", input=PASSPHRASE + "\n")

    assert first.rc == 0, first
    assert "volume nas unlocked at /mnt/t/nas" in first.stdout
    assert kernel.findmnt("/mnt/t/nas") == "/dev/mapper/keyd-nas-tc ext4"
    assert guest.check(["cat", "/mnt/t/nas/origin"]).stdout == "written-by-tcplay\n"
    uuid = guest.check(["dmsetup", "info", "-c", "--noheadings", "-o", "uuid",
                        "keyd-nas-tc"]).stdout.strip()
    assert uuid.startswith("CRYPT-TCRYPT-") and uuid.endswith("-keyd-nas-tc"), uuid
    # The mapping fits the 4K disk: data and IV offsets at 128 KiB (a whole number of 4K
    # sectors), a length of whole 4K sectors, and 4096-byte logical blocks on top.
    table = crypt_table(guest, "keyd-nas-tc")
    assert table["cipher"] == "aes-xts-plain64"
    assert "sector_size" not in table["options"]  # 512-byte XTS data units, as TrueCrypt's
    assert int(table["offset"]) == int(table["iv_offset"]) == TC_DATA_OFFSET
    assert int(table["offset"]) % 8 == 0 and int(table["length"]) % 8 == 0
    assert int(table["length"]) * 512 == (64 << 20) - 2 * 131072  # minus both header areas
    assert guest.check(["blockdev", "--getss", "/dev/mapper/keyd-nas-tc"]).stdout.strip() == "4096"
    report = keyd.status("nas")
    assert report["state"] == "unlocked", report

    guest.sh("head -c 3145728 /dev/urandom > /mnt/t/nas/blob && sync")
    digest = kernel.sha256("/mnt/t/nas/blob")
    again = keyd("unlock", "nas", "--passphrase", input=PASSPHRASE + "\n")
    assert again.rc == 0 and "already unlocked" in again.stdout, again

    locked = keyd("lock", "nas")

    assert locked.rc == 0 and "volume nas locked" in locked.stdout, locked
    assert kernel.findmnt("/mnt/t/nas") == ""
    assert "keyd-nas-tc" not in kernel.dm()
    assert keyd.status("nas")["state"] == "locked"

    reopened = keyd("unlock", "nas", "--passphrase", input=PASSPHRASE + "\n")
    assert reopened.rc == 0, reopened
    assert kernel.sha256("/mnt/t/nas/blob") == digest
    assert keyd("lock", "nas").rc == 0
    assert kernel.dm() == [] and kernel.findmnt("/mnt/t/nas") == ""


VC_PIM = 1  # 15000 + 1000 * PIM = 16000 PBKDF2 rounds instead of 500000 (TCG is slow)


def vc_config(device: str, prf: str) -> str:
    """Volume vault: VeraCrypt on ``device`` opened with ``prf`` and VC_PIM, ext4 at /mnt/t/vault."""
    return veracrypt_ext4(device, prf=prf, pim=VC_PIM, mountpoint="/mnt/t/vault")


def attach_image(guest: GuestLab, image: Path, serial: str) -> str:
    """Attach a prepared image (guest.disk() would create a blank one); reset detaches it."""
    path = guest.lab.attach_disk(image, serial)
    guest._disks.append(serial)  # GuestLab.reset() detaches what is listed
    return path


def test_veracrypt_volume_opens_only_with_its_pinned_prf_and_pim(
        guest: GuestLab, tmp_path: Path) -> None:
    kernel = Kernel(guest)
    image = tmp_path / "VC000.img"
    veracrypt.write_volume(image, 64 << 20, PASSPHRASE.encode(), prf="sha512", pim=VC_PIM)
    disk = attach_image(guest, image, "VC000")
    keyd = Keydctl(guest, "/etc/keyd/seed000vc.toml").write_config(vc_config(disk, "sha512"))

    # No filesystem yet: the mapping opens, the mount fails, and the run is rolled back.
    bare = keyd("unlock", "vault", "--passphrase", input=PASSPHRASE + "\n")
    assert bare.rc != 0 and "could not mount layer fs of volume vault" in bare.stderr, bare
    assert "rolled back" in bare.stderr, bare
    assert kernel.dm() == [] and kernel.findmnt("/mnt/t/vault") == ""
    # What keyd ran is exactly the pinned cryptsetup call (key on stdin only).
    assert ("'cryptsetup', 'open', '--type', 'tcrypt', '--veracrypt', '--veracrypt-pim=1', "
            "'--hash', 'sha512'") in bare.stderr, bare.stderr
    guest.check(["cryptsetup", "open", "--type", "tcrypt", "--veracrypt", "--hash", "sha512",
                 f"--veracrypt-pim={VC_PIM}", disk, "vcsetup"], input=PASSPHRASE + "\n",
                timeout=300)
    guest.sh("mkfs.ext4 -q /dev/mapper/vcsetup && cryptsetup close vcsetup", timeout=120)

    opened = keyd("unlock", "vault", "--passphrase", input=PASSPHRASE + "\n")
    assert opened.rc == 0, opened
    assert kernel.findmnt("/mnt/t/vault") == "/dev/mapper/keyd-vault-vc ext4"
    table = crypt_table(guest, "keyd-vault-vc")
    assert table["cipher"] == "aes-xts-plain64" and table["offset"] == str(TC_DATA_OFFSET)
    guest.sh("head -c 1048576 /dev/urandom > /mnt/t/vault/blob && sync")
    digest = kernel.sha256("/mnt/t/vault/blob")
    assert keyd("lock", "vault").rc == 0
    assert kernel.dm() == [] and kernel.findmnt("/mnt/t/vault") == ""
    reopened = keyd("unlock", "vault", "--passphrase", input=PASSPHRASE + "\n")
    assert reopened.rc == 0, reopened
    assert kernel.sha256("/mnt/t/vault/blob") == digest
    assert keyd("lock", "vault").rc == 0

    # A wrong PRF pin is a rejected key: clear message, exit 6, nothing left open.
    wrong = Keydctl(guest, "/etc/keyd/seed000vc-wrong.toml").write_config(vc_config(disk, "sha256"))
    refused = wrong("unlock", "vault", "--passphrase", input=PASSPHRASE + "\n")
    assert refused.rc == 6, refused
    assert "wrong key for volume vault" in refused.stderr, refused.stderr
    assert "hash" in refused.stderr and "pim" in refused.stderr
    assert PASSPHRASE not in refused.stderr + refused.stdout
    assert kernel.dm() == [] and kernel.findmnt("/mnt/t/vault") == ""
