"""keyd.service when events come at awkward moments: the level-triggered daemon on a real kernel.

Each test sets up one LUKS2 + ext4 volume (or RAID1 under it), installs keyd.service and
drives the moment that used to lose intent: disks after the stick, a restart before the
pull, a pull and re-insert during an unlock, a stale stick before a good one, `keydctl
unlock` during the grace, a service slow to stop, a bind mount, an array udev started,
and a mirror side (a zfs vdev, an md member) whose disk comes after the unlock.
"""

from __future__ import annotations

import time
from pathlib import Path

from keyd_lab.daemon_setup import (
    GUEST_BIN,
    Signer,
    audit_records,
    config_toml,
    cursor,
    events,
    install_keyd,
    journal_text,
    make_stick,
    start_keyd,
    volume_key,
    volume_state,
    wait_until,
)
from tests.configs import LUKS, luks_on_raid, zfs_on_crypt

from .conftest import GuestLab
from .fixtures.keydctl import create_array, stop_array
from .fixtures.zfs import export_all, pools
from .guest.daemon_lab import format_volume, volume_toml

KEYDCTL = str(GUEST_BIN / "keydctl")


def is_open(volume: str) -> str:
    return f"test -e /dev/mapper/keyd-{volume}-crypt && findmnt /mnt/t/{volume}"


def is_closed(volume: str) -> str:
    return f"! test -e /dev/mapper/keyd-{volume}-crypt && ! findmnt /mnt/t/{volume}"


def keyd_with_volume(guest: GuestLab, signer: Signer, volume: str, disk: str, policy: str, *,
                     iterations: int = 1000, services: list[str] | None = None,
                     units: dict[str, str] | None = None) -> str:
    """A LUKS2 + ext4 volume on disk ``disk`` (its daemon keys in ``policy``), keyd started on it."""
    device = guest.disk(disk, 64)
    format_volume(guest, device, volume_key(volume), iterations=iterations)
    install_keyd(guest, signer, config_toml(signer, volume_toml(volume, device, services, policy)),
                 units)
    start_keyd(guest)
    return device


def state_becomes(guest: GuestLab, volume: str, state: str, timeout: float = 120) -> bool:
    """Poll keyd's state of ``volume`` over D-Bus until it is ``state``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if volume_state(guest, volume) == state:
            return True
        time.sleep(0.3)
    return False


def test_disks_that_appear_after_the_stick_are_waited_for_even_past_member_wait(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial, disk = "late", "RACELATE1", "RACEDISKLATE"
    keyd_with_volume(guest, signer, volume, disk, "member_wait = 3\n")
    guest.detach(disk)  # as at boot: the USB stick is up, the disks still spin up
    start = cursor(guest)

    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))

    assert state_becomes(guest, volume, "waiting-for-members"), journal_text(guest, "keyd.service")
    assert state_becomes(guest, volume, "failed", 60)  # member_wait ran out; the key is kept
    guest.reattach(disk)
    assert wait_until(guest, is_open(volume), 180), journal_text(guest, "keyd.service")
    trail = events(audit_records(guest, start, ("unlock-failed", "unlock-finished"), volume), volume)
    assert trail.count("unlock-failed") >= 1 and trail[-1] == "unlock-finished", trail


def test_after_a_restart_pulling_the_stick_still_locks(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial = "restart", "RACERESTART"
    keyd_with_volume(guest, signer, volume, "RACEDISKRST", "lock_on_removal = true\ngrace = 2\n")
    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))
    assert wait_until(guest, is_open(volume), 180), journal_text(guest, "keyd.service")

    guest.check(["systemctl", "restart", "keyd.service"], timeout=300)
    start = cursor(guest)
    assert state_becomes(guest, volume, "unlocked")
    guest.unplug(serial)

    assert wait_until(guest, is_closed(volume), 120), journal_text(guest, "keyd.service")
    trail = events(audit_records(guest, start, ("grace-started", "lock-finished"), volume), volume)
    assert [e for e in trail if e in ("grace-started", "lock-finished")] == \
        ["grace-started", "lock-finished"], trail


def test_a_stick_pulled_and_put_back_during_the_unlock_keeps_the_volume_unlocked(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial = "reinsert", "RACEREINS"
    # A slow key derivation under TCG: the unlock runs long enough to pull the stick in it.
    keyd_with_volume(guest, signer, volume, "RACEDISKREIN", "lock_on_removal = true\ngrace = 2\n",
                     iterations=400_000)
    stick = make_stick(tmp_path, signer, serial, {volume: volume_key(volume)})
    start = cursor(guest)

    guest.plug(stick)
    assert state_becomes(guest, volume, "unlocking"), journal_text(guest, "keyd.service")
    guest.unplug(serial)
    guest.plug(stick)

    assert wait_until(guest, is_open(volume), 180), journal_text(guest, "keyd.service")
    time.sleep(6)  # three times the grace
    assert guest.run(["sh", "-c", is_open(volume)]).rc == 0, journal_text(guest, "keyd.service")
    trail = events(audit_records(guest, start, ("stick-removed", "unlock-finished")))
    assert "lock-started" not in trail, trail
    # The pull really happened while the unlock ran.
    assert trail.index("stick-removed") < trail.index("unlock-finished"), trail


def test_a_stale_stick_first_then_the_good_one_unlocks_with_the_second(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume = "twosticks"
    # Trying the stale key must outlast checking the good stick (mount, gpg) under TCG.
    keyd_with_volume(guest, signer, volume, "RACEDISKTWO", "", iterations=1_500_000)
    stale = make_stick(tmp_path, signer, "RACESTALE", {volume: b"the key before the re-key"})
    good = make_stick(tmp_path, signer, "RACEGOOD", {volume: volume_key(volume)})
    start = cursor(guest)

    guest.plug(stale)
    assert state_becomes(guest, volume, "unlocking"), journal_text(guest, "keyd.service")
    guest.plug(good)  # its key arrives while the stale one is being tried

    assert wait_until(guest, is_open(volume), 180), journal_text(guest, "keyd.service")
    records = [r for r in audit_records(guest, start, ("unlock-failed", "unlock-finished"), volume)
               if r.get("KEYD_VOLUME") == volume]
    seen = [(r["KEYD_EVENT"], r.get("KEYD_STICK_SERIAL")) for r in records
            if r["KEYD_EVENT"] in ("bundle-accepted", "unlock-failed", "unlock-finished")]
    outcomes = [s for s in seen if s[0] != "bundle-accepted"]
    assert outcomes == [("unlock-failed", "RACESTALE"), ("unlock-finished", "RACEGOOD")], seen
    # The good stick's key really arrived while the stale one was being tried.
    assert seen.index(("bundle-accepted", "RACEGOOD")) < seen.index(("unlock-failed", "RACESTALE")), seen


def test_keydctl_unlock_during_the_grace_keeps_the_volume_unlocked(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial = "grace", "RACEGRACE"
    keyd_with_volume(guest, signer, volume, "RACEDISKGRC", "lock_on_removal = true\ngrace = 20\n")
    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))
    assert wait_until(guest, is_open(volume), 180), journal_text(guest, "keyd.service")
    start = cursor(guest)
    guest.unplug(serial)
    assert wait_until(guest, "journalctl -q SYSLOG_IDENTIFIER=keyd KEYD_EVENT=grace-started "
                      "KEYD_RESULT=armed | grep -q .", 60)

    done = guest.run([KEYDCTL, "unlock", volume, "--key-file", "-"], input=volume_key(volume),
                     timeout=240)

    assert done.rc == 0, done.stderr
    time.sleep(22)  # past the grace
    assert guest.run(["sh", "-c", is_open(volume)]).rc == 0, journal_text(guest, "keyd.service")
    records = audit_records(guest, start)
    assert "lock-started" not in events(records), events(records)
    assert any(r["KEYD_EVENT"] == "grace-started" and r.get("KEYD_RESULT") == "cancelled"
               for r in records), events(records)


def test_a_service_slow_to_stop_is_waited_for_and_the_lock_completes(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial, unit = "slow", "RACESLOW", "keyd-slow-stop.service"
    # It keeps its working directory on the volume until its ExecStop has taken 15 s.
    service = (f"[Unit]\nPartOf=keyd-unlocked@{volume}.target\n[Service]\n"
               f"ExecStart=/bin/sh -c 'cd /mnt/t/{volume} && exec sleep infinity'\n"
               "ExecStop=/bin/sleep 15\nTimeoutStopSec=60\n")
    keyd_with_volume(guest, signer, volume, "RACEDISKSLOW",
                     "lock_retries = 1\nlock_retry_delay = 1\n", services=[unit],
                     units={unit: service})
    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))
    assert wait_until(guest, f"{is_open(volume)} && systemctl is-active {unit}", 180), \
        journal_text(guest, "keyd.service")
    start = cursor(guest)

    guest.run([KEYDCTL, "lock", volume], timeout=240)

    assert wait_until(guest, is_closed(volume), 120), journal_text(guest, "keyd.service")
    trail = events(audit_records(guest, start, ("lock-finished",), volume), volume)
    assert "lock-finished" in trail and "lock-busy" not in trail, trail


def test_a_bind_mount_of_the_volume_refuses_the_lock_and_nothing_is_half_closed(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial = "bound", "RACEBIND"
    keyd_with_volume(guest, signer, volume, "RACEDISKBIND", "lock_retries = 1\nlock_retry_delay = 1\n")
    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))
    assert wait_until(guest, is_open(volume), 180), journal_text(guest, "keyd.service")
    guest.sh(f"mkdir -p /mnt/t/export && mount --bind /mnt/t/{volume} /mnt/t/export")
    start = cursor(guest)

    guest.run([KEYDCTL, "lock", volume], timeout=240)

    assert wait_until(guest, "journalctl -q SYSLOG_IDENTIFIER=keyd KEYD_EVENT=lock-busy "
                      "KEYD_RESULT=stays-unlocked | grep -q .", 120), journal_text(guest, "keyd.service")
    assert guest.run(["sh", "-c", is_open(volume)]).rc == 0  # nothing closed underneath
    busy = [r for r in audit_records(guest, start) if r["KEYD_EVENT"] == "lock-busy"]
    assert any("/mnt/t/export" in r["MESSAGE"] for r in busy), busy
    assert volume_state(guest, volume) == "unlocked"
    guest.sh("umount /mnt/t/export")
    guest.run([KEYDCTL, "lock", volume], timeout=240)
    assert wait_until(guest, is_closed(volume), 120), journal_text(guest, "keyd.service")


def test_an_array_udev_started_before_keyd_is_not_rolled_back(
        guest: GuestLab, signer: Signer, keyd_stopped: None) -> None:
    volume = "array"
    disks = [guest.disk(serial, 64) for serial in ("RACEMD1", "RACEMD2")]
    # Started under its own name, as udev's incremental assembly does at boot.
    uuid = create_array(guest, "racefmt", 1, disks)
    config = config_toml(signer, luks_on_raid(uuid, volume=volume, mountpoint=f"/mnt/t/{volume}"))
    install_keyd(guest, signer, config)
    start = cursor(guest)

    start_keyd(guest)

    trail = events(audit_records(guest, start), volume)
    assert "reconciled" not in trail and "lock-started" not in trail, trail
    assert guest.run(["test", "-e", "/dev/md/racefmt"]).rc == 0  # left as udev made it
    assert volume_state(guest, volume) == "waiting-for-key"


def test_a_zfs_mirror_side_whose_disk_comes_late_is_brought_back_online(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, pool, serial, key = "mirror", "racepool", "RACEMIRROR", volume_key("mirror")
    disks = [guest.disk(name, 96) for name in ("RACEZFS1", "RACEZFS2")]
    for i, disk in enumerate(disks):
        guest.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                     "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", disk],
                    input=key, timeout=180)
        guest.check(["cryptsetup", "open", "--key-file=-", disk, f"keyd-{volume}-c{i + 1}"],
                    input=key)
    guest.check(["modprobe", "zfs"], timeout=120)
    # Made on the mappings' names keyd gives them: zfs knows a side that is missing later
    # by that path, as it does once keyd has had the pool open whole.
    guest.check(["zpool", "create", "-f", "-o", "ashift=9", "-O", f"mountpoint=/mnt/t/{pool}",
                 pool, "mirror", f"/dev/mapper/keyd-{volume}-c1", f"/dev/mapper/keyd-{volume}-c2"],
                timeout=120)
    guest.sh(f"echo kept > /mnt/t/{pool}/data && zpool export {pool} && "
             f"cryptsetup close keyd-{volume}-c1 && cryptsetup close keyd-{volume}-c2", timeout=120)
    config = zfs_on_crypt(volume, {"c1": disks[0], "c2": disks[1]}, pool=pool, crypt=LUKS,
                          degraded="always")
    install_keyd(guest, signer, config_toml(signer, config))
    start_keyd(guest)
    guest.detach("RACEZFS2")
    start = cursor(guest)
    try:
        guest.plug(make_stick(tmp_path, signer, serial, {volume: key}))
        assert state_becomes(guest, volume, "unlocked"), journal_text(guest, "keyd.service")
        assert pools(guest) == {pool: "DEGRADED"}

        guest.reattach("RACEZFS2")

        assert wait_until(guest, f"zpool list -H -o health {pool} | grep -qx ONLINE", 120), \
            journal_text(guest, "keyd.service") + guest.sh(
                f"zpool status -P {pool}; ls -l /dev/disk/by-id; {KEYDCTL} status --json")
        guest.check(["zpool", "wait", "-t", "resilver", pool], timeout=300)
        assert guest.check(["cat", f"/mnt/t/{pool}/data"]).stdout == "kept\n"
        records = audit_records(guest, start, ("mended",), volume)
        mended = [r for r in records if r["KEYD_EVENT"] == "mended"]
        assert [r["KEYD_RESULT"] for r in mended] == ["mended"], events(records, volume)
        assert "c2 (/dev/mapper/keyd-mirror-c2) is back in zfs pool racepool" in \
            mended[0]["MESSAGE"]
    finally:
        export_all(guest, [pool])


def test_an_md_member_whose_disk_comes_late_is_re_added(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial = "mdlate", "RACEMDLATE"
    disks = [guest.disk(name, 64) for name in ("RACEMDL1", "RACEMDL2")]
    uuid = create_array(guest, "mdlatefmt", 1, disks, bitmap=True)
    format_volume(guest, "/dev/md/mdlatefmt", volume_key(volume))
    stop_array(guest, "mdlatefmt")
    config = luks_on_raid(uuid, volume=volume, mountpoint=f"/mnt/t/{volume}", degraded="always")
    install_keyd(guest, signer, config_toml(signer, config))
    start_keyd(guest)
    guest.detach("RACEMDL2")
    start = cursor(guest)

    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))
    assert state_becomes(guest, volume, "unlocked"), journal_text(guest, "keyd.service")
    assert "[2/1]" in guest.check(["cat", "/proc/mdstat"]).stdout
    guest.reattach("RACEMDL2")

    assert wait_until(guest, "grep -q '\\[2/2\\]' /proc/mdstat", 120), \
        guest.check(["cat", "/proc/mdstat"]).stdout + journal_text(guest, "keyd.service")
    records = audit_records(guest, start, ("mended",), volume)
    mended = [r for r in records if r["KEYD_EVENT"] == "mended"]
    assert [r["KEYD_RESULT"] for r in mended] == ["mended"], events(records, volume)
    assert "was re-added to md array" in mended[0]["MESSAGE"]
