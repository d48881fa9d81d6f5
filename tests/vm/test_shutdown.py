"""Power-off with volumes open: keyd locks them top-down before the file systems below go.

One guest opens seed 003's stack (TrueCrypt -> NTFS through ntfs-3g -> ext3 image on a
loop device) and a RAID1 -> LUKS2 -> XFS one through keyd.service, while a process that
belongs to no keyd-managed service keeps a file open for writing in the ext3 image (a
user's shell, a backup job). Then the guest is powered off through systemd. A second,
fresh guest on the same disk images checks what the first one left: the NTFS consistent,
the ext3 image and the XFS clean (no journal or log to replay), the data written before
the power-off intact. The first guest's journal, written to a disk of its own by a unit
that stops after keyd, shows keyd's lock records in order.
"""

from __future__ import annotations

import json
from pathlib import Path

from keyd.audit.ids import EVENT_BY_ID
from keyd_lab.build import Artifacts, new_run_dir
from keyd_lab.daemon_setup import (
    GUEST_BIN,
    Signer,
    config_toml,
    install_keyd,
    start_keyd,
    wait_state,
    write,
)
from keyd_lab.vm import Lab, LabOptions
from tests.configs import luks_on_raid, seed_003

from .conftest import GuestLab
from .fixtures.keydctl import Kernel, create_array, stop_array
from .fixtures.seed_003 import PASSPHRASE, build_seed_003

NTFS, ROOT, HOME = "/mnt/t/winroot", "/mnt/t/debian", "/mnt/t/home"
TC, MD_A, MD_B, JOURNAL = "SHUTTC", "SHUTMDA", "SHUTMDB", "SHUTJOURNAL"
LUKS_KEY = b"keyd shutdown test luks key"
FAST_LUKS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
# Writes a line every 0.2 s into the ext3 image until it is killed: nothing tells keyd or
# systemd to stop it before the volume goes (KillMode=none: its unit's stop leaves it).
HOLDER = ["systemd-run", "--unit=shutdown-holder", "-p", "KillMode=none",
          "-p", "DefaultDependencies=no", "sh", "-c",
          f"exec 3>>{ROOT}/held; while :; do date >&3; sleep 0.2; done"]
# Stops after keyd.service (and keyd-shutdown.service, where there is one): it was started
# before them, so systemd stops it after them. Its stop writes this boot's journal to a disk.
JOURNAL_UNIT = f"""[Unit]
Description=keyd lab: keep the journal of the power-off
DefaultDependencies=no
Before=keyd.service keyd-shutdown.service shutdown.target
Conflicts=shutdown.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c 'journalctl -b -o json --no-pager > /dev/disk/by-id/virtio-{JOURNAL}; sync'
"""


def boot(lab_artifacts: Artifacts, name: str) -> Lab:
    # loglevel=6: systemd-shutdown's last steps (what it kills, unmounts, detaches) reach
    # the console log.
    options = LabOptions(boot_timeout=600, extra_append="loglevel=6")
    return Lab.boot(lab_artifacts.kernel, lab_artifacts.initramfs, new_run_dir(name), options)


def build_raid_luks_xfs(guest: GuestLab) -> str:
    """RAID1 (2 x 320 MB) -> LUKS2 -> XFS; returns the array's UUID."""
    members = [guest.disk(MD_A, 320), guest.disk(MD_B, 320)]
    uuid = create_array(guest, "shut", 1, members)
    guest.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST_LUKS,
                 "--key-file=-", "/dev/md/shut"], input=LUKS_KEY, timeout=120)
    guest.check(["cryptsetup", "open", "--key-file=-", "/dev/md/shut", "shutsetup"],
                input=LUKS_KEY, timeout=120)
    guest.check(["mkfs.xfs", "-q", "/dev/mapper/shutsetup"], timeout=120)
    guest.check(["cryptsetup", "close", "shutsetup"])
    stop_array(guest, "shut")
    return uuid


def open_both(guest: GuestLab, signer: Signer, tc_disk: str, uuid: str) -> None:
    """keyd.service with both volumes configured, unlocked through it, data written."""
    volumes = (seed_003(tc_disk, ntfs=NTFS, root=ROOT)
               + luks_on_raid(uuid, fstype="xfs", mountpoint=HOME))
    install_keyd(guest, signer, config_toml(signer, volumes),
                 units={"keyd-lab-journal.service": JOURNAL_UNIT})
    start_keyd(guest)
    assert guest.run(["systemctl", "is-active", "keyd-shutdown.service"]).stdout.strip() \
        == "active"
    guest.check(["systemctl", "start", "keyd-lab-journal.service"])
    keydctl = str(GUEST_BIN / "keydctl")
    guest.check([keydctl, "unlock", "work", "--passphrase"], input=PASSPHRASE + "\n", timeout=600)
    write(guest, "/run/home.key", LUKS_KEY, mode="0600")
    guest.check([keydctl, "unlock", "home", "--key-file", "/run/home.key"], timeout=600)
    assert wait_state(guest, "work", "unlocked") and wait_state(guest, "home", "unlocked")


def journal_records(image: Path) -> list[dict[str, str]]:
    """The journal the power-off wrote to the journal disk, one JSON entry per line."""
    text = image.read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def lock_records(records: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(volume, event, result) of keyd's lock records, in journal order."""
    return [(r.get("KEYD_VOLUME", ""), str(EVENT_BY_ID[r["MESSAGE_ID"]]), r.get("KEYD_RESULT", ""))
            for r in records if r.get("SYSLOG_IDENTIFIER") == "keyd"
            and r.get("MESSAGE_ID") in EVENT_BY_ID
            and str(EVENT_BY_ID[r["MESSAGE_ID"]]).startswith("lock-")]


CHECK_NTFS_AND_EXT3 = f"""
cryptsetup open --readonly --type tcrypt /dev/disk/by-id/virtio-{TC} check-tc
ntfsfix --no-action /dev/mapper/check-tc
mkdir -p /mnt/t/check-ntfs
ntfs-3g -o ro /dev/mapper/check-tc /mnt/t/check-ntfs
dumpe2fs -h /mnt/t/check-ntfs/rootfs 2>/dev/null | grep -E '^(Filesystem (state|features)):'
e2fsck -fn /mnt/t/check-ntfs/rootfs >/dev/null && echo ext3-fsck-clean
mkdir -p /mnt/t/check-root
mount -o ro,loop,norecovery /mnt/t/check-ntfs/rootfs /mnt/t/check-root
sha256sum /mnt/t/check-root/blob | cut -d' ' -f1
umount /mnt/t/check-root
"""

CHECK_XFS = """
udevadm settle
for md in $(awk '/^md/ {{print $1}}' /proc/mdstat); do mdadm --stop /dev/$md; done
mdadm --assemble /dev/md/check --run /dev/disk/by-id/virtio-{a} /dev/disk/by-id/virtio-{b}
cryptsetup open --readonly --key-file=/run/home.key /dev/md/check check-home
xfs_repair -n /dev/mapper/check-home >/dev/null 2>&1 && echo xfs-repair-clean
mkdir -p /mnt/t/check-home
mount -o ro,norecovery /dev/mapper/check-home /mnt/t/check-home
sha256sum /mnt/t/check-home/blob | cut -d' ' -f1
"""


def test_power_off_locks_open_volumes_top_down_and_leaves_file_systems_clean(
        lab_artifacts: Artifacts, tmp_path: Path, signer: Signer) -> None:
    first = boot(lab_artifacts, "shutdown-first")
    try:
        guest = GuestLab(first, tmp_path)
        tc_disk = guest.disk(TC, 96)
        build_seed_003(guest, tc_disk)
        uuid = build_raid_luks_xfs(guest)
        guest.disk(JOURNAL, 16)
        open_both(guest, signer, tc_disk, uuid)
        kernel = Kernel(guest)
        guest.sh(f"head -c 1048576 /dev/urandom > {ROOT}/blob; "
                 f"head -c 1048576 /dev/urandom > {HOME}/blob; sync")
        digests = kernel.sha256(f"{ROOT}/blob"), kernel.sha256(f"{HOME}/blob")
        guest.check(HOLDER)
        holder = guest.sh("systemctl show -p MainPID --value shutdown-holder").strip()
        first.power_off()
    finally:
        first.close()
    console = (first.run_dir / "console.log").read_text(errors="replace")
    print("\n--- power-off console ---\n" + "\n".join(console.splitlines()[-60:]))

    records = journal_records(tmp_path / f"{JOURNAL}.img")
    print("keyd lock records:", lock_records(records))

    second = boot(lab_artifacts, "shutdown-second")
    try:
        guest = GuestLab(second, tmp_path)
        guest.reattach(TC)
        guest.reattach(MD_A)
        guest.reattach(MD_B)
        ntfs = guest.check(["sh", "-ec", CHECK_NTFS_AND_EXT3], input=PASSPHRASE + "\n",
                           timeout=300).stdout
        print("fresh guest, seed 003:\n" + ntfs)
        write(guest, "/run/home.key", LUKS_KEY, mode="0600")
        xfs = guest.sh(CHECK_XFS.format(a=MD_A, b=MD_B), timeout=300)
        print("fresh guest, RAID1/LUKS2/XFS:\n" + xfs)
    finally:
        second.close()

    assert "NTFS partition /dev/mapper/check-tc was processed successfully" in ntfs, ntfs
    assert "Filesystem state:         clean" in ntfs and "needs_recovery" not in ntfs, ntfs
    assert "ext3-fsck-clean" in ntfs and digests[0] in ntfs, ntfs
    assert "xfs-repair-clean" in xfs and digests[1] in xfs, xfs
    # keyd locked the idle volume; the busy one it flushed and left to systemd-shutdown,
    # naming the process, which then unmounted it once that process was gone.
    locks = lock_records(records)
    assert [e for v, e, _ in locks if v == "home"] == ["lock-started", "lock-finished"], locks
    assert ("home", "lock-finished", "locked") in locks
    assert [(e, r) for v, e, r in locks if v == "work"] == [
        ("lock-started", ""), ("lock-busy", "left-open")], locks
    [busy] = [r["MESSAGE"] for r in records if r.get("KEYD_VOLUME") == "work"
              and EVENT_BY_ID.get(r.get("MESSAGE_ID", "")) == "lock-busy"]
    assert f"{holder} (sh)" in busy and f"{ROOT}: synced" in busy, busy
