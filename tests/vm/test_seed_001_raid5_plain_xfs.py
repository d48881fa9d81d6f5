"""Seed 001 on a real kernel: RAID5 on 3 disks -> plain dm-crypt keyed by a file (2006) -> XFS.

The seed ran ``cryptsetup create --key-file passphrase --key-size 128 md0_crypt /dev/md0``
with cryptsetup 1.0.x: cipher "aes" (the kernel's aes-cbc-plain) and, because the key came
from a file, the file's first 16 bytes as the key, unhashed (docs/keyd.toml.5.md). The
fixture is opened with today's equivalent, ``--key-file FILE`` in plain mode (still raw);
keyd, fed the same file on stdin, must reach the same key in the dm table.
"""

from __future__ import annotations

import re
import secrets
import string

from tests.configs import seed_001

from .conftest import GuestLab
from .fixtures.keydctl import Kernel, Keydctl, create_array, stop_array

SERIALS = ("SEED001A", "SEED001B", "SEED001C")
# As the seed made it: `tr -cd '[:alnum:]' < /dev/urandom | head -c32 > passphrase`.
KEY_FILE = "".join(secrets.choice(string.ascii_letters + string.digits)
                   for _ in range(32)).encode()
MAPPER = "keyd-raid5-crypt"
MOUNTPOINT = "/mnt/t/raid5crypt"


def config(uuid: str, degraded: str = "never") -> str:
    """keyd.toml for the seed: array ``uuid`` with the given degraded policy."""
    return seed_001(uuid, degraded=degraded, mountpoint=MOUNTPOINT, description=(
        "seed 001: RAID5 + cryptsetup create --key-file passphrase --key-size 128 + XFS"))


def build_seed(guest: GuestLab, kernel: Kernel) -> tuple[str, list[str], str]:
    """RAID5 -> plain (key file) -> XFS with files; (uuid, dm table fields, checksums)."""
    members = [guest.disk(serial, 320) for serial in SERIALS]
    uuid = create_array(guest, "fixture", 5, members)
    guest.check(["sh", "-c", "mkdir -p /run/seed001 && cat > /run/seed001/passphrase"],
                input=KEY_FILE)
    guest.check(["cryptsetup", "open", "--type", "plain", "--cipher", "aes-cbc-plain",
                 "--key-size", "128", "--key-file", "/run/seed001/passphrase",
                 "/dev/md/fixture", "fixture"], timeout=120)
    table = kernel.table_with_keys("fixture")
    guest.check(["mkfs.xfs", "-q", "/dev/mapper/fixture"], timeout=180)
    guest.sh(f"mkdir -p {MOUNTPOINT} && mount /dev/mapper/fixture {MOUNTPOINT}")
    written = kernel.write_files(MOUNTPOINT)
    guest.sh(f"umount {MOUNTPOINT} && cryptsetup close fixture && rm /run/seed001/passphrase")
    stop_array(guest, "fixture")
    return uuid, table, written


def test_keyd_uses_the_key_files_first_16_bytes_as_2006_did_and_keeps_the_data(
        guest: GuestLab) -> None:
    kernel = Kernel(guest)
    uuid, fixture_table, written = build_seed(guest, kernel)
    assert fixture_table[3:5] == ["aes-cbc-plain", KEY_FILE[:16].hex()]
    keyd = Keydctl(guest).write_config(config(uuid))

    keyd.ok("unlock", "raid5", "--key-file", "-", input=KEY_FILE)
    table = kernel.table_with_keys(MAPPER)
    assert table[:5] == fixture_table[:5]  # start, length, crypt, cipher, key
    assert "raid5" in kernel.mdstat() and "[3/3] [UUU]" in kernel.mdstat()
    assert kernel.mounts_under()[MOUNTPOINT][1:] == (f"/dev/mapper/{MAPPER}", "xfs")
    assert kernel.checksums(MOUNTPOINT) == written
    guest.sh(f"echo more > {MOUNTPOINT}/sub/text.txt")
    changed = kernel.checksums(MOUNTPOINT)
    report = keyd.status("raid5")
    assert report["state"] == "unlocked", report
    assert report["by_name"]["md0"]["owned"] and not report["by_name"]["md0"]["degraded"]

    keyd.ok("lock", "raid5")
    kernel.assert_nothing_open()
    keyd.ok("unlock", "raid5", "--key-file", "-", input=KEY_FILE)
    assert kernel.checksums(MOUNTPOINT) == changed != written
    keyd.ok("lock", "raid5")
    kernel.assert_nothing_open()


def test_a_missing_member_is_refused_by_policy_never_and_started_by_always(
        guest: GuestLab) -> None:
    kernel = Kernel(guest)
    uuid, _, written = build_seed(guest, kernel)
    guest.detach(SERIALS[2])
    guest.sh("udevadm settle")
    keyd = Keydctl(guest).write_config(config(uuid, "never"))

    refused = keyd("unlock", "raid5", "--key-file", "-", input=KEY_FILE)
    assert refused.rc == 1, (refused, kernel.mdstat())
    assert "raid layer md0 has 2 of 3 members and its degraded policy is never" in refused.stderr
    assert "degraded = \"always\"" in refused.stderr  # the fix is named
    kernel.assert_nothing_open()

    keyd.write_config(config(uuid, "always"))
    keyd.ok("unlock", "raid5", "--key-file", "-", input=KEY_FILE)
    assert "[3/2] [UU_]" in kernel.mdstat()
    assert kernel.checksums(MOUNTPOINT) == written
    report = keyd.status("raid5")
    assert report["state"] == "unlocked (degraded)", report
    assert report["by_name"]["md0"]["degraded"] is True
    assert "degraded (2 of 3)" in report["by_name"]["md0"]["detail"]
    assert "degraded" in keyd.ok("status").stdout

    # The member comes back; slow recovery down so that it is seen while it runs.
    guest.sh("echo 1000 > /proc/sys/dev/raid/speed_limit_max")
    try:
        member = guest.reattach(SERIALS[2])
        guest.sh("udevadm settle")
        array = report["by_name"]["md0"]["device"]
        if "[3/2]" in kernel.mdstat():  # udev's `mdadm --incremental` did not re-add it
            guest.check(["mdadm", "--add", array, member])
        guest.sh("for i in $(seq 100); do grep -q recovery /proc/mdstat && exit 0; sleep 0.2; "
                 "done; exit 1")
        detail = keyd.status("raid5")["by_name"]["md0"]["detail"]
        assert "recovering" in detail, (detail, kernel.mdstat())
        assert "recovering" in keyd.ok("status", "raid5").stdout
    finally:
        guest.sh("echo 200000 > /proc/sys/dev/raid/speed_limit_max")
    keyd.ok("lock", "raid5")
    kernel.assert_nothing_open()


def test_members_udev_gathered_into_an_inactive_array_are_taken_over_and_stopped_on_lock(
        guest: GuestLab) -> None:
    kernel = Kernel(guest)
    uuid, _, written = build_seed(guest, kernel)
    # Boot with one disk dead: the two others come up and udev's `mdadm --incremental` gathers
    # them into an inactive array. (Debian's mdadm-last-resort timer would start it degraded
    # after 30 s whatever keyd's policy says; keep it out of this test.)
    guest.sh("systemctl mask --runtime mdadm-last-resort@md127.timer "
             "mdadm-last-resort@md126.timer >/dev/null 2>&1 || true")
    try:
        for serial in SERIALS:
            guest.detach(serial)
        guest.sh("udevadm settle")
        for serial in SERIALS[:2]:
            guest.reattach(serial)
        guest.sh("udevadm settle")
        assert "inactive" in kernel.mdstat(), kernel.mdstat()
        keyd = Keydctl(guest).write_config(config(uuid, "never"))
        refused = keyd("unlock", "raid5", "--key-file", "-", input=KEY_FILE)
        assert refused.rc == 1 and "2 of 3 members" in refused.stderr, (refused, kernel.mdstat())
        kernel.assert_nothing_open()

        keyd.write_config(config(uuid, "always"))
        keyd.ok("unlock", "raid5", "--key-file", "-", input=KEY_FILE)
        md0 = keyd.status("raid5")["by_name"]["md0"]
        assert md0["owned"] and md0["degraded"], md0
        assert guest.sh("readlink -f /dev/md/keyd-raid5-md0").strip() == md0["device"]
        assert "inactive" not in kernel.mdstat() and "[3/2]" in kernel.mdstat()
        assert kernel.checksums(MOUNTPOINT) == written
        keyd.ok("lock", "raid5")
        kernel.assert_nothing_open()
        assert not re.search(r"^md\d+ :", kernel.mdstat(), re.M), kernel.mdstat()  # none left
    finally:
        guest.sh("systemctl unmask --runtime mdadm-last-resort@md127.timer "
                 "mdadm-last-resort@md126.timer >/dev/null 2>&1 || true")
