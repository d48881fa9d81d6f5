"""keyd.service on a real kernel: backup sticks, re-keying and k-of-n, with hot-plugged sticks.

A backup stick (``keydctl enroll --backup-of``) carries the primary's key at the same
generation: using either never retires the other. Re-keying the primary (a new
generation) retires both once the new stick has been used; a keyd that cannot record the
new generation refuses stick keys (fails closed). Two of three share sticks
(``keydctl enroll --shares 3 --threshold 2``) unlock; one alone does not, and a share of
another enrollment never completes it. A TrueCrypt volume made with a passphrase and a
keyfile (tcplay) opens from a stick that carries both.
"""

from __future__ import annotations

import shutil
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
    make_backup_stick,
    make_share_sticks,
    make_stick,
    start_keyd,
    volume_key,
    volume_state,
    wait_state,
    wait_until,
)
from keyd_lab.media import StickSpec
from tests.configs import TCRYPT, crypt_mount

from .conftest import GuestLab
from .fixtures.keydctl import tcplay
from .guest.daemon_lab import format_volume, volume_toml

VOLUME = "kilo"
OPEN = f"findmnt /mnt/t/{VOLUME}"
SHUT = f"! test -e /dev/mapper/keyd-{VOLUME}-crypt && ! findmnt /mnt/t/{VOLUME}"
POLICY = "lock_on_removal = true\ngrace = 1\nlock_retry_delay = 1\n"


def use(guest: GuestLab, stick: StickSpec) -> list[dict[str, str]]:
    """Plug the stick, wait for the volume to open, pull it, wait for the lock; the records."""
    start = cursor(guest)
    guest.plug(stick)
    assert wait_until(guest, OPEN, 180), journal_text(guest, "keyd.service")
    guest.unplug(stick.serial)
    assert wait_until(guest, SHUT, 120), journal_text(guest, "keyd.service")
    return audit_records(guest, start, ("unlock-finished", "lock-finished"))


def refused(guest: GuestLab, stick: StickSpec) -> list[str]:
    """Plug a stick keyd must refuse; the reasons it gave. The volume stays locked."""
    start = cursor(guest)
    guest.plug(stick)
    # The --after-cursor read as audit_records does it (no match on the command line).
    backoff = f"journalctl -o cat --output-fields=KEYD_EVENT --after-cursor='{start}' " \
              "| grep -qx backoff"
    assert wait_until(guest, backoff, 180), journal_text(guest, "keyd.service")
    guest.unplug(stick.serial)
    assert guest.run(["sh", "-c", OPEN]).rc != 0 and volume_state(guest, VOLUME) == "locked"
    return [r.get("KEYD_REASON", "") for r in audit_records(guest, start, ("bundle-rejected",))
            if r["KEYD_EVENT"] == "bundle-rejected"]


def bundle_id(records: list[dict[str, str]]) -> str:
    return next(r["KEYD_BUNDLE_ID"] for r in records if r["KEYD_EVENT"] == "bundle-accepted")


def test_a_backup_stick_and_the_primary_both_work_until_a_re_key_retires_them(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    disk = guest.disk("DISKKILO", 64)
    format_volume(guest, disk, volume_key(VOLUME))
    install_keyd(guest, signer, config_toml(signer, volume_toml(VOLUME, disk, policy=POLICY)))
    start_keyd(guest)
    primary = make_stick(tmp_path, signer, "KEYSPRIMARY", {VOLUME: volume_key(VOLUME)})
    backup = make_backup_stick(tmp_path, signer, "KEYSPRIMARY", "KEYSBACKUP", VOLUME)
    old_primary = StickSpec(Path(shutil.copy(primary.image, tmp_path / "old-primary.img")),
                            primary.serial)

    first = use(guest, primary)
    second = use(guest, backup)
    third = use(guest, primary)

    assert bundle_id(first) == bundle_id(third) != bundle_id(second)
    for records in (first, second, third):
        assert events(records, VOLUME)[:3] == ["bundle-accepted", "unlock-started",
                                               "unlock-finished"], events(records, VOLUME)

    # Re-keyed: the primary's next generation; once used, both older sticks are refused.
    rekeyed = make_stick(tmp_path, signer, "KEYSPRIMARY", {VOLUME: volume_key(VOLUME)})
    assert "generation 2" in next(r["MESSAGE"] for r in use(guest, rekeyed)
                                  if r["KEYD_EVENT"] == "bundle-accepted")
    assert refused(guest, backup) == ["REPLAYED_GENERATION"]
    assert refused(guest, old_primary)[0] in ("REVOKED_BUNDLE", "REPLAYED_GENERATION")

    # keyd cannot record generations (its state directory is read-only): it fails closed.
    newer = make_stick(tmp_path, signer, "KEYSNEWER", {VOLUME: volume_key(VOLUME)},
                       extra=["--generation", "3"])
    guest.sh("mount --bind /var/lib/keyd /var/lib/keyd && "
             "mount -o remount,bind,ro /var/lib/keyd")
    try:
        assert refused(guest, newer) == ["STATE_ERROR"]
    finally:
        guest.sh("umount /var/lib/keyd")


def wait_event(guest: GuestLab, after: str, event: str, count: int = 1) -> None:
    """Wait until keyd audited ``event`` (``count`` times) after the cursor ``after``."""
    seen = (f"test $(journalctl -o cat --output-fields=KEYD_EVENT --after-cursor='{after}' "
            f"| grep -cx {event}) -ge {count}")
    assert wait_until(guest, seen, 180), journal_text(guest, "keyd.service")


def test_two_of_three_share_sticks_unlock_and_one_alone_does_not(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume = "lima"
    disk = guest.disk("DISKLIMA", 64)
    format_volume(guest, disk, volume_key(volume))
    install_keyd(guest, signer, config_toml(signer, volume_toml(volume, disk)))
    start_keyd(guest)
    header = guest.check(["cryptsetup", "luksUUID", disk]).stdout.strip()
    first, second, _ = make_share_sticks(tmp_path, signer, ["SHAREA", "SHAREB", "SHAREC"],
                                         volume, volume_key(volume), threshold=2,
                                         extra=["--volume-uuid", header])
    stranger = make_share_sticks(tmp_path / "other", signer, ["SHAREX", "SHAREY", "SHAREZ"],
                                 volume, volume_key(volume), threshold=2)[1]
    start = cursor(guest)

    # A bundle signed for another volume's UUID: its key opens this one, which is closed again.
    elsewhere = make_stick(tmp_path, signer, "KEYSELSEWHERE", {volume: volume_key(volume)},
                           extra=["--volume-uuid", "0c5c6d83-311e-495d-8b14-84576dd84ca9"])
    guest.plug(elsewhere)
    wait_event(guest, start, "unlock-failed")
    guest.unplug(elsewhere.serial)
    failed = next(r for r in audit_records(guest, start) if r["KEYD_EVENT"] == "unlock-failed")
    assert failed["KEYD_REASON"] == "WRONG_VOLUME", failed
    assert guest.run(["sh", "-c", f"findmnt /mnt/t/{volume}"]).rc != 0
    assert guest.run(["test", "-e", f"/dev/mapper/keyd-{volume}-crypt"]).rc != 0
    start = cursor(guest)

    guest.plug(first)
    wait_event(guest, start, "share-accepted")
    guest.unplug(first.serial)
    status = guest.check([str(GUEST_BIN / "keydctl"), "status", volume], timeout=120).stdout
    print(f"\nkeydctl status with one share held:\n{status}")
    assert "waiting for 1 more stick (1 of 2 shares)" in status
    # A share of another enrollment of the same volume does not complete the first.
    guest.plug(stranger)
    wait_event(guest, start, "share-accepted", 2)
    guest.unplug(stranger.serial)
    assert guest.run(["sh", "-c", f"findmnt /mnt/t/{volume}"]).rc != 0

    guest.plug(second)

    assert wait_until(guest, f"findmnt /mnt/t/{volume}", 180), journal_text(guest, "keyd.service")
    assert guest.check(["cat", f"/mnt/t/{volume}/hello"]).stdout == "hello\n"
    records = audit_records(guest, start, ("shares-combined", "unlock-started", "unlock-finished"), volume)
    trail = events(records, volume)
    print(f"audit trail: {trail}")
    assert trail.count("share-accepted") == 3 and trail.count("shares-combined") == 1, trail
    assert trail.index("shares-combined") < trail.index("unlock-started") \
        < trail.index("unlock-finished"), trail
    held = [r["KEYD_REASON"] for r in records if r["KEYD_EVENT"] == "share-accepted"]
    assert held == ["1 of 2", "1 of 2", "2 of 2"], held
    assert wait_state(guest, volume, "unlocked"), journal_text(guest, "keyd.service")


def test_a_truecrypt_volume_with_a_passphrase_and_a_keyfile_opens_from_one_stick(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, passphrase = "november", "truecrypt with a keyfile"
    keyfile = tmp_path / "november.keyfile"
    keyfile.write_bytes(bytes(range(256)) * 4)
    disk = guest.disk("DISKNOVEMBER", 64)
    guest.check(["sh", "-c", "cat > /root/november.keyfile"], input=keyfile.read_bytes())
    common = ["-d", disk, "-k", "/root/november.keyfile"]
    tcplay(guest, passphrase, "-c", *common, "-z", "-w", "-a", "RIPEMD160", "-b", "AES-256-XTS")
    tcplay(guest, passphrase, "-m", "tcsetup_nov", *common)
    guest.sh("mkfs.ext4 -q /dev/mapper/tcsetup_nov && mkdir -p /mnt/t/setup && "
             "mount /dev/mapper/tcsetup_nov /mnt/t/setup && echo hello > /mnt/t/setup/hello && "
             "umount /mnt/t/setup && tcplay -u tcsetup_nov", timeout=120)
    config = crypt_mount(volume, disk, TCRYPT, names=("tc", "data"), fstype="ext4",
                         mountpoint=f"/mnt/t/{volume}")
    install_keyd(guest, signer, config_toml(signer, config))
    start_keyd(guest)
    stick = make_stick(tmp_path, signer, "KEYSNOVEMBER", {volume: {"tc": passphrase.encode()}},
                       extra=["--tcrypt-keyfile", f"tc={keyfile}"])
    start = cursor(guest)

    guest.plug(stick)

    assert wait_until(guest, f"findmnt /mnt/t/{volume}", 180), journal_text(guest, "keyd.service")
    assert guest.check(["cat", f"/mnt/t/{volume}/hello"]).stdout == "hello\n"
    first = ("bundle-accepted", "unlock-started", "unlock-finished")
    trail = events(audit_records(guest, start, first, volume), volume)
    assert trail[:3] == list(first), trail
