"""Seed 004 on a real kernel: plain dm-crypt, AES, passphrase hashed with ripemd160 (2004).

The seed ran ``cryptsetup -c aes -h ripemd160 ... create cryptvol1 /dev/hdb2``: with
that era's defaults a 256-bit key, the passphrase hashed hashalot-style (ripemd160,
then ripemd160 of "A" + passphrase for the bytes past 20) and the kernel's bare
"aes" meaning aes-cbc-plain (see docs/keyd.toml.5.md). The fixture is opened by
cryptsetup with those parameters; keyd must put the very same key into the dm table,
and that key must equal the hashalot derivation computed here on the host.
"""

from __future__ import annotations

import hashlib

from tests.configs import seed_004

from .conftest import GuestLab
from .fixtures.keydctl import Kernel, Keydctl

SERIAL = "SEED004PLAIN"
DEVICE = f"/dev/disk/by-id/virtio-{SERIAL}"
PASSPHRASE = "correct horse battery staple 2004"
PLAIN_2004 = ["--type", "plain", "--cipher", "aes-cbc-plain", "--key-size", "256",
              "--hash", "ripemd160"]
CONFIG = seed_004(DEVICE, mountpoint="/mnt/t/data",
                  description="seed 004: cryptsetup -c aes -h ripemd160 (2004)")


def hashalot_key(passphrase: bytes, size: int, hash_name: str = "ripemd160") -> bytes:
    """The plain-mode key: hash(pass) || hash("A" + pass) || hash("AA" + pass) ..., cut to size."""
    key = b""
    for rounds in range(size):
        key += hashlib.new(hash_name, b"A" * rounds + passphrase).digest()
        if len(key) >= size:
            return key[:size]
    raise AssertionError("unreachable")


def crypt_table(kernel: Kernel, name: str) -> tuple[str, str]:
    """(cipher, hex key) of a dm-crypt mapping's table line."""
    fields = kernel.table_with_keys(name)
    assert fields[2] == "crypt", fields
    return fields[3], fields[4]


def make_fixture(guest: GuestLab, kernel: Kernel) -> tuple[str, str]:
    """Format the disk as the seed did; return the fixture mapping's (cipher, key)."""
    guest.disk(SERIAL, 64)
    guest.check(["cryptsetup", "open", *PLAIN_2004, DEVICE, "fixture"],
                input=PASSPHRASE + "\n", timeout=120)
    table = crypt_table(kernel, "fixture")
    guest.check(["mkfs.ext3", "-q", "-L", "cryptvol1", "/dev/mapper/fixture"], timeout=120)
    guest.check(["cryptsetup", "close", "fixture"])
    return table


def test_keyd_derives_the_2004_key_from_the_passphrase_and_keeps_the_data(
        guest: GuestLab) -> None:
    kernel = Kernel(guest)
    fixture = make_fixture(guest, kernel)
    assert fixture == ("aes-cbc-plain", hashalot_key(PASSPHRASE.encode(), 32).hex())
    keyd = Keydctl(guest).write_config(CONFIG)

    # keydctl --passphrase off a terminal reads one line per key from stdin.
    keyd.ok("unlock", "cryptvol1", "--passphrase", input=PASSPHRASE + "\n")
    assert crypt_table(kernel, "keyd-cryptvol1-c") == fixture
    assert guest.sh("dmsetup info -c --noheadings -o uuid keyd-cryptvol1-c").startswith(
        "CRYPT-PLAIN-")
    assert kernel.mounts_under()["/mnt/t/data"][1:] == ("/dev/mapper/keyd-cryptvol1-c", "ext3")
    written = kernel.write_files("/mnt/t/data")
    assert keyd.status("cryptvol1")["state"] == "unlocked"
    keyd.ok("lock", "cryptvol1")
    kernel.assert_nothing_open()

    # The same passphrase as a key file ("-"): one trailing newline is not part of it.
    keyd.ok("unlock", "cryptvol1", "--key-file", "-", input=PASSPHRASE + "\n")
    assert crypt_table(kernel, "keyd-cryptvol1-c") == fixture
    assert kernel.checksums("/mnt/t/data") == written
    keyd.ok("lock", "cryptvol1")
    kernel.assert_nothing_open()


def test_a_wrong_passphrase_is_caught_by_the_mount_and_everything_is_rolled_back(
        guest: GuestLab) -> None:
    kernel = Kernel(guest)
    make_fixture(guest, kernel)
    keyd = Keydctl(guest).write_config(CONFIG)

    # Plain mode has no header to check a key against: cryptsetup opens any key, and the
    # garbage it decrypts does not mount. keyd reports that as a probable wrong key (exit 6).
    wrong = keyd("unlock", "cryptvol1", "--passphrase", input="correct horse battery stapler\n")
    assert wrong.rc == 6, wrong
    assert "wrong key for volume cryptvol1?" in wrong.stderr
    assert "rolled back" in wrong.stderr and "stapler" not in wrong.stderr
    kernel.assert_nothing_open()
    assert keyd.status("cryptvol1")["state"] == "locked"
