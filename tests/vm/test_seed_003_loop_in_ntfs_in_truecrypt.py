"""Seed 003 on a real kernel: an ext3 image inside NTFS (ntfs-3g) inside a TrueCrypt volume.

The stack is built from scratch in the guest the way the seed's author built
his: tcplay makes the TrueCrypt volume, mkntfs the NTFS, mkfs.ext3 an image
file in it. keyd (keydctl only) then opens TrueCrypt -> mounts NTFS with
ntfs-3g (the FUSE driver the seed uses) -> attaches the image to a loop device
-> mounts ext3, and locks in exactly the reverse order. A process working in
the inner mount blocks the lock and is named; nothing is ever killed.
"""

from __future__ import annotations

import json

from keyd_lab.channel import GuestResult
from tests.configs import seed_003

from .conftest import GuestLab
from .fixtures.keydctl import Kernel, Keydctl, programs_run
from .fixtures.seed_003 import PASSPHRASE, build_seed_003

NTFS, ROOT = "/mnt/t/winroot", "/mnt/t/debian"
MAPPING = "keyd-work-tc"


def unlock(keyd: Keydctl) -> GuestResult:
    return keyd.ok("unlock", "work", "--passphrase", input=PASSPHRASE + "\n")


def build_stack(guest: GuestLab) -> Keydctl:
    """A TrueCrypt disk holding NTFS holding an ext3 image; keydctl with its config."""
    disk = guest.disk("TCNTFS003", 96)
    build_seed_003(guest, disk)
    config = seed_003(disk, ntfs=NTFS, root=ROOT,
                      description="seed 003: Debian in an ext3 image on TrueCrypt'ed NTFS")
    return Keydctl(guest, "/etc/keyd/seed003.toml").write_config(config)


def loops(guest: GuestLab) -> dict[str, str]:
    """Loop device -> backing file, from losetup."""
    out = guest.check(["losetup", "--list", "--json"]).stdout
    return {d["name"]: d["back-file"] for d in json.loads(out or '{"loopdevices": []}')
            ["loopdevices"]}


def assert_nothing_open(guest: GuestLab) -> None:
    kernel = Kernel(guest)
    assert kernel.findmnt(ROOT) == "" and kernel.findmnt(NTFS) == ""
    assert loops(guest) == {} and kernel.dm() == []
    assert guest.run(["pgrep", "-x", "ntfs-3g"]).stdout == ""  # the FUSE driver has exited


def test_stack_unlocks_bottom_up_and_locks_top_down_in_order(guest: GuestLab) -> None:
    keyd, kernel = build_stack(guest), Kernel(guest)
    doctor = keyd("doctor")
    assert doctor.rc == 0, doctor  # programs (ntfs-3g, losetup...), modules (fuse, loop...)

    opened = unlock(keyd)

    assert "volume work unlocked at /mnt/t/debian" in opened.stdout
    assert kernel.findmnt(NTFS) == f"/dev/mapper/{MAPPING} fuseblk"  # ntfs-3g
    [(loop, backing)] = loops(guest).items()
    assert backing == f"{NTFS}/rootfs"
    # Detached by the kernel as soon as the ext3 is unmounted, by keyd or at power-off.
    assert guest.check(["losetup", "--noheadings", "-O", "AUTOCLEAR", loop]).stdout.strip() == "1"
    # The FUSE driver runs as a root storage daemon: systemd-shutdown spares it.
    assert guest.sh("cat /proc/$(pgrep -x ntfs-3g)/cmdline | tr '\\0' ' '").startswith(
        f"@ntfs-3g /dev/mapper/{MAPPING} {NTFS}")
    assert kernel.findmnt(ROOT) == f"{loop} ext3"
    assert guest.check(["cat", f"{ROOT}/origin"]).stdout == "installed-by-hand\n"
    assert keyd.status("work")["state"] == "unlocked"
    guest.sh(f"head -c 2097152 /dev/urandom > {ROOT}/blob && sync")
    digest = kernel.sha256(f"{ROOT}/blob")

    locked = keyd("lock", "work")

    assert locked.rc == 0, locked
    closing = [argv for argv in programs_run(locked.stderr)
               if argv[0] in ("umount", "losetup", "cryptsetup")]
    assert closing[0] == ["umount", ROOT], locked.stderr
    assert closing[1] == ["losetup", "--detach", loop], locked.stderr
    assert closing[2] == ["umount", NTFS], locked.stderr
    assert closing[-1] == ["cryptsetup", "close", MAPPING], locked.stderr
    assert {tuple(argv) for argv in closing[3:]} == {("cryptsetup", "close", MAPPING)}
    assert_nothing_open(guest)
    assert keyd.status("work")["state"] == "locked"

    unlock(keyd)
    assert kernel.sha256(f"{ROOT}/blob") == digest
    assert keyd("lock", "work").rc == 0
    assert_nothing_open(guest)


def test_missing_image_rolls_back_the_ntfs_mount_and_the_mapping(guest: GuestLab) -> None:
    config = build_stack(guest).config
    broken = Keydctl(guest, config.replace(".toml", "-broken.toml"))
    guest.sh(f"sed 's/^image = \"rootfs\"/image = \"no-such-image\"/' {config} > {broken.config}")

    failed = broken("unlock", "work", "--passphrase", input=PASSPHRASE + "\n")

    assert failed.rc != 0, failed
    assert "could not attach layer img of volume work" in failed.stderr, failed.stderr
    assert "rolled back" in failed.stderr, failed.stderr
    # Rolled back in reverse: the NTFS unmounted, then the mapping closed (retried while the
    # exiting ntfs-3g still holds it, if need be); nothing else.
    ran = programs_run(failed.stderr)
    undo = ran[ran.index(["umount", NTFS]) + 1:]
    assert undo and all(argv == ["cryptsetup", "close", MAPPING] for argv in undo), ran
    assert_nothing_open(guest)


def test_process_in_the_inner_mount_blocks_the_lock_and_is_named(guest: GuestLab) -> None:
    keyd, kernel = build_stack(guest), Kernel(guest)
    unlock(keyd)
    pid = guest.sh(f"cd {ROOT} && setsid sleep 600 >/dev/null 2>&1 </dev/null & echo $!").strip()
    assert guest.check(["readlink", f"/proc/{pid}/cwd"]).stdout.strip() == ROOT

    refused = keyd("lock", "work")

    assert refused.rc == 5, refused
    assert "volume work is busy" in refused.stderr
    assert f"pid {pid} (sleep): cwd in {ROOT}" in refused.stderr, refused.stderr
    assert "keyd never kills processes" in refused.stderr
    assert not [argv for argv in programs_run(refused.stderr)
                if argv[0] in ("umount", "losetup", "cryptsetup")]  # nothing was touched
    assert guest.check(["kill", "-0", pid]).rc == 0
    assert kernel.findmnt(ROOT).endswith(" ext3") and kernel.findmnt(NTFS).endswith(" fuseblk")
    assert MAPPING in kernel.dm() and len(loops(guest)) == 1

    guest.sh(f"kill {pid}; timeout 10 tail --pid={pid} -f /dev/null")
    locked = keyd("lock", "work")

    assert locked.rc == 0, locked
    assert_nothing_open(guest)
