"""The modern default on a real kernel: RAID1 -> LUKS2 -> ext4, driven only through keydctl.

Each test builds the stack from scratch in the guest (mdadm --create, luksFormat,
mkfs), writes a keyd.toml over the channel, runs ``keydctl`` in the guest and
checks the result in the kernel (/proc/mdstat, dmsetup, /proc/self/mountinfo).
The ``Keydctl``/``Kernel`` helpers live in fixtures/keydctl.py.
"""

from __future__ import annotations

import re

from tests.configs import luks_on_raid

from .conftest import GuestLab
from .fixtures.keydctl import Kernel, Keydctl, create_array, stop_array

FAST_LUKS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
KEY = b"\x00\x01binary luks key\nwith a newline\xff"


def luks2_raid1_ext4(guest: GuestLab, tag: str) -> str:
    """Build RAID1 (2 x 64 MB) -> LUKS2 (KEY) -> ext4 in the guest; return the array UUID."""
    members = [guest.disk(f"L2{tag}A", 64), guest.disk(f"L2{tag}B", 64)]
    uuid = create_array(guest, "fixture", 1, members)
    guest.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST_LUKS,
                 "--key-file=-", "/dev/md/fixture"], input=KEY, timeout=120)
    guest.check(["cryptsetup", "open", "--key-file=-", "/dev/md/fixture", "fixture"], input=KEY,
                timeout=120)
    guest.check(["mkfs.ext4", "-q", "-L", "home", "/dev/mapper/fixture"], timeout=120)
    guest.check(["cryptsetup", "close", "fixture"])
    stop_array(guest, "fixture")
    return uuid


def config(uuid: str, *, fstype: str = "ext4", mountpoint: str = "/mnt/t/home") -> str:
    """keyd.toml for volume ``home`` on the array ``uuid``."""
    return luks_on_raid(uuid, fstype=fstype, mountpoint=mountpoint, options=["nodev", "nosuid"],
                        description="LUKS2 on RAID1, ext4")


def test_unlock_write_lock_unlock_keeps_data_and_a_second_unlock_changes_nothing(
        guest: GuestLab) -> None:
    uuid = luks2_raid1_ext4(guest, "RT")
    keyd, kernel = Keydctl(guest).write_config(config(uuid)), Kernel(guest)
    assert keyd.status("home")["state"] == "locked"

    first = keyd.ok("unlock", "home", "--key-file", "-", input=KEY)
    assert "volume home unlocked at /mnt/t/home" in first.stdout
    assert kernel.dm() == ["keyd-home-luks"]
    [array] = kernel.active_arrays()
    assert guest.sh("readlink -f /dev/md/keyd-home-md").strip() == f"/dev/{array}"
    assert "raid1" in kernel.mdstat() and "[2/2] [UU]" in kernel.mdstat()
    mounts = kernel.mounts_under()
    assert mounts["/mnt/t/home"][1:] == ("/dev/mapper/keyd-home-luks", "ext4")
    assert guest.check(["dmsetup", "info", "-c", "--noheadings", "-o", "uuid",
                        "keyd-home-luks"]).stdout.startswith("CRYPT-LUKS2-")
    written = kernel.write_files("/mnt/t/home")
    report = keyd.status("home")
    assert report["state"] == "unlocked", (report, keyd.ok("status").stdout, kernel.mdstat())
    assert {n: (layer["state"], layer["owned"]) for n, layer in report["by_name"].items()} == {
        "md": ("open", True), "luks": ("open", True), "fs": ("open", True)}

    # Unlocking again is a no-op: no key needed, same array, mapping and mount (same mount id).
    dm_before = guest.sh("dmsetup info -c --noheadings -o major,minor,open keyd-home-luks")
    again = keyd.ok("unlock", "home", "--key-file", "-", input=b"not even read")
    assert "already unlocked" in again.stdout
    assert kernel.mounts_under() == mounts and kernel.active_arrays() == [array]
    assert guest.sh("dmsetup info -c --noheadings -o major,minor,open keyd-home-luks") == dm_before

    assert "volume home locked" in keyd.ok("lock", "home").stdout
    kernel.assert_nothing_open()
    assert keyd.status("home")["state"] == "locked"
    assert "already locked" in keyd.ok("lock", "home").stdout

    keyd.ok("unlock", "home", "--key-file", "-", input=KEY)
    assert kernel.checksums("/mnt/t/home") == written
    keyd.ok("lock", "home")
    kernel.assert_nothing_open()


def test_a_failure_in_the_top_layer_rolls_back_everything_this_run_opened(
        guest: GuestLab) -> None:
    uuid = luks2_raid1_ext4(guest, "RB")
    keyd, kernel = Keydctl(guest), Kernel(guest)

    keyd.write_config(config(uuid, fstype="xfs"))  # the filesystem is ext4: mount fails
    failed = keyd("unlock", "home", "--key-file", "-", input=KEY)
    assert failed.rc == 1, failed
    assert "could not mount layer fs of volume home (xfs) at /mnt/t/home" in failed.stderr
    assert "rolled back" in failed.stderr and "Traceback" not in failed.stderr
    kernel.assert_nothing_open()

    guest.sh("mkdir -p /mnt/t && echo not a directory > /mnt/t/file")
    keyd.write_config(config(uuid, mountpoint="/mnt/t/file/home"))  # cannot be created
    failed = keyd("unlock", "home", "--key-file", "-", input=KEY)
    assert failed.rc == 1, failed
    assert "/mnt/t/file/home" in failed.stderr and "rolled back" in failed.stderr
    assert "Traceback" not in failed.stderr, failed.stderr
    kernel.assert_nothing_open()

    keyd.write_config(config(uuid))  # fixed: now it opens
    keyd.ok("unlock", "home", "--key-file", "-", input=KEY)
    assert keyd.status("home")["state"] == "unlocked"


def test_a_wrong_key_is_named_exit_6_and_leaves_nothing_open(guest: GuestLab) -> None:
    uuid = luks2_raid1_ext4(guest, "WK")
    keyd, kernel = Keydctl(guest).write_config(config(uuid)), Kernel(guest)

    wrong = keyd("unlock", "home", "--key-file", "-", input=b"not the key")
    assert wrong.rc == 6, wrong
    assert "wrong key for volume home (cryptsetup exit 2)" in wrong.stderr
    assert "not the key" not in wrong.stderr + wrong.stdout
    kernel.assert_nothing_open()
    assert keyd.status("home")["state"] == "locked"


def test_lock_refuses_while_a_process_works_inside_and_names_its_pid(guest: GuestLab) -> None:
    uuid = luks2_raid1_ext4(guest, "BZ")
    keyd, kernel = Keydctl(guest).write_config(config(uuid)), Kernel(guest)
    keyd.ok("unlock", "home", "--key-file", "-", input=KEY)
    pid = guest.sh("cd / && setsid sh -c 'cd /mnt/t/home && exec sleep 600' "
                   "</dev/null >/dev/null 2>&1 & echo $!").strip()
    guest.sh(f"for i in $(seq 50); do [ \"$(readlink /proc/{pid}/cwd)\" = /mnt/t/home ] && "
             "exit 0; sleep 0.1; done; exit 1")

    busy = keyd("lock", "home")
    assert busy.rc == 5, busy
    assert "volume home is busy" in busy.stderr
    assert re.search(rf"pid {pid} \(sleep\): cwd in /mnt/t/home", busy.stderr), busy.stderr
    assert keyd.status("home")["state"] == "unlocked"  # nothing was closed
    assert kernel.dm() == ["keyd-home-luks"]

    guest.check(["kill", pid])
    guest.sh(f"while [ -e /proc/{pid} ]; do sleep 0.1; done")
    keyd.ok("lock", "home")
    kernel.assert_nothing_open()
