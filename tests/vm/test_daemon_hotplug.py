"""keyd.service on a real kernel: hot-plugged sticks, rejected bundles, the D-Bus API, the audit trail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyd_lab.daemon_setup import (
    GUEST_BIN,
    Signer,
    audit_records,
    config_toml,
    cursor,
    events,
    install_keyd,
    journal_text,
    make_signer,
    make_stick,
    start_keyd,
    volume_key,
    volume_state,
    wait_until,
)

from .conftest import GuestLab
from .guest.daemon_lab import (
    dbus_call,
    dummy_unit,
    format_volume,
    mappings,
    volume_toml,
)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DBUS_CALL = ["busctl", "call", "org.keyd.Keyd1", "/org/keyd/Keyd1", "org.keyd.Keyd1.Manager"]


def policy(*, lock_on_removal: bool) -> str:
    """The volume's daemon keys (in its [volume.NAME] table of keyd.toml)."""
    return f"lock_on_removal = {str(lock_on_removal).lower()}\ngrace = 1\nlock_retry_delay = 1\n"


def unlocked(volume: str) -> str:
    return (f"test -e /dev/mapper/keyd-{volume}-crypt && findmnt /mnt/t/{volume} && "
            f"systemctl is-active keyd-dummy-{volume}.service")


def setup_volume(guest: GuestLab, signer: Signer, volume: str, serial: str, *,
                 lock_on_removal: bool) -> None:
    disk = guest.disk(serial, 64)
    format_volume(guest, disk, volume_key(volume))
    unit = f"keyd-dummy-{volume}.service"
    volumes = volume_toml(volume, disk, [unit], policy(lock_on_removal=lock_on_removal))
    install_keyd(guest, signer, config_toml(signer, volumes) + "\n[daemon]\nbackoff_base = 30\n",
                 {unit: dummy_unit(volume)})
    start_keyd(guest)


@pytest.mark.parametrize("lock_on_removal", [True, False], ids=["lock-on-removal", "stay-unlocked"])
def test_hotplugged_signed_stick_unlocks_starts_the_dependent_and_removal_follows_policy(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None,
        lock_on_removal: bool) -> None:
    volume, serial = "alpha", "KEYDHOT" + ("L" if lock_on_removal else "S")
    setup_volume(guest, signer, volume, f"DISK{serial}", lock_on_removal=lock_on_removal)
    stick = make_stick(tmp_path, signer, serial, {volume: volume_key(volume)})
    start = cursor(guest)

    guest.plug(stick)

    assert wait_until(guest, unlocked(volume), 180), journal_text(guest, "keyd.service")
    assert guest.check(["cat", f"/run/dummy-{volume}.out"]).stdout == "hello\n"
    # keyd starts keyd-unlocked@VOLUME.target too; its keyd-wait@ check is a (slow) keydctl run.
    assert wait_until(guest, f"systemctl is-active keyd-unlocked@{volume}.target", 180), \
        journal_text(guest, f"keyd-wait@{volume}.service")
    assert volume_state(guest, volume) == "unlocked"
    order = ["stick-inserted", "bundle-accepted", "unlock-started", "unlock-finished"]
    records = audit_records(guest, start, order)
    trail = events(records)
    assert [e for e in trail if e in order] == order, trail
    accepted = next(r for r in records if r["KEYD_EVENT"] == "bundle-accepted")
    assert accepted["KEYD_STICK_SERIAL"] == serial and accepted["KEYD_VOLUME"] == volume
    assert accepted["KEYD_SIGNER"] == signer.fingerprint and accepted["KEYD_BUNDLE_ID"]
    finished = next(r for r in records if r["KEYD_EVENT"] == "unlock-finished")
    assert int(finished["KEYD_DURATION_MS"]) >= 0
    # keydctl audit reads the same records back from the journal.
    read_back = json.loads(guest.check([str(GUEST_BIN / "keydctl"), "audit", "--json",
                                        "--volume", volume], timeout=120).stdout)
    assert [e["event"] for e in read_back][-len(events(records, volume)):] == \
        events(records, volume), read_back

    removed = cursor(guest)
    guest.unplug(serial)

    if lock_on_removal:
        gone = f"! test -e /dev/mapper/keyd-{volume}-crypt && ! findmnt /mnt/t/{volume}"
        assert wait_until(guest, gone, 120), journal_text(guest, "keyd.service")
        assert wait_until(guest, f"! systemctl is-active keyd-dummy-{volume}.service", 60)
        after = events(audit_records(guest, removed, ("stick-removed", "grace-started", "lock-started",
                                                      "lock-finished")))
        assert after[0] == "stick-removed" and "grace-started" in after, after
        assert after.index("lock-started") < after.index("lock-finished"), after
        assert volume_state(guest, volume) == "locked"
    else:
        # This stick's removal: the boot's journal also holds earlier tests' removals.
        assert wait_until(guest, f"journalctl -b -u keyd.service -g 'stick {serial} removed from' -q",
                          120)
        guest.sh("sleep 3")  # longer than the 1 s grace a locking policy would have used
        assert guest.run(["sh", "-c", unlocked(volume)]).rc == 0
        assert volume_state(guest, volume) == "unlocked"
        assert events(audit_records(guest, removed, ("stick-removed",))) == ["stick-removed"]


@pytest.mark.parametrize("flaw", ["wrong-serial", "unpinned-signer"])
def test_rejected_stick_leaves_the_volume_locked_and_arms_the_backoff(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None, flaw: str) -> None:
    volume, serial = "bravo", "KEYDBAD" + flaw[0].upper()
    setup_volume(guest, signer, volume, f"DISK{serial}", lock_on_removal=True)
    if flaw == "wrong-serial":
        stick = make_stick(tmp_path, signer, serial, {volume: volume_key(volume)},
                           bind_serial="SOMEOTHERSTICK")
        reasons = {"WRONG_STICK"}
    else:
        stranger = next(make_signer(tmp_path / "stranger", "Mallory <m@evil.test>"))
        stick = make_stick(tmp_path, stranger, serial, {volume: volume_key(volume)})
        reasons = {"UNKNOWN_SIGNER", "NO_PUBKEY"}  # not in keyd's keyring either
    start = cursor(guest)

    guest.plug(stick)

    assert wait_until(guest, "journalctl -b -q SYSLOG_IDENTIFIER=keyd KEYD_EVENT=backoff "
                             f"KEYD_STICK_SERIAL={serial} | grep -q .", 180), \
        journal_text(guest, "keyd.service")
    records = audit_records(guest, start, ("stick-inserted", "bundle-rejected", "backoff"))
    trail = events(records)
    rejected = [r for r in records if r["KEYD_EVENT"] == "bundle-rejected"]
    assert rejected, trail
    print(f"\n{flaw}: reasons {[r.get('KEYD_REASON') for r in rejected]}")
    assert any(r.get("KEYD_REASON") in reasons for r in rejected), rejected
    assert trail.index("stick-inserted") < trail.index("bundle-rejected") < trail.index("backoff"), \
        trail
    assert "unlock-started" not in trail
    assert f"keyd-{volume}-crypt" not in mappings(guest)
    assert guest.run(["findmnt", f"/mnt/t/{volume}"]).rc != 0
    assert guest.run(["systemctl", "is-active", f"keyd-dummy-{volume}.service"]).rc != 0
    assert volume_state(guest, volume) != "unlocked"


def test_dbus_root_locks_and_unlocks_and_nobody_is_denied(
        guest: GuestLab, signer: Signer, keyd_stopped: None) -> None:
    volume = "charlie"
    setup_volume(guest, signer, volume, "DISKDBUS", lock_on_removal=False)
    key = volume_key(volume)
    listed = guest.check([*DBUS_CALL, "ListVolumes"]).stdout
    assert f'"{volume}" "waiting-for-key"' in listed, listed
    start = cursor(guest)

    denied = dbus_call(guest, "unlock", volume, as_nobody=True, key=key)
    assert denied["error"] == "DaemonAccessDenied", denied
    readable = dbus_call(guest, "get", volume, as_nobody=True)  # reading is for everyone
    assert readable["ok"] and readable["result"]["state"] == "waiting-for-key", readable
    assert f"keyd-{volume}-crypt" not in mappings(guest)

    unlocking = dbus_call(guest, "unlock", volume, key=key)  # root, key in a memfd
    assert unlocking["ok"] and unlocking["result"] in ("unlocking", "unlocked"), unlocking
    assert wait_until(guest, unlocked(volume), 180), journal_text(guest, "keyd.service")
    assert volume_state(guest, volume) == "unlocked"

    denied_lock = dbus_call(guest, "lock", volume, as_nobody=True)
    assert denied_lock["error"] == "DaemonAccessDenied", denied_lock
    busctl_denied = guest.run([*NOBODY, *DBUS_CALL, "Lock", "s", volume])
    assert busctl_denied.rc != 0 and "ccess denied" in busctl_denied.stderr, busctl_denied
    assert volume_state(guest, volume) == "unlocked"

    locked = guest.run([*DBUS_CALL, "Lock", "s", volume], timeout=120)  # root, plain busctl
    assert locked.rc == 0, locked
    assert wait_until(guest, f"! test -e /dev/mapper/keyd-{volume}-crypt", 180), \
        journal_text(guest, "keyd.service")
    assert wait_until(guest, f"! systemctl is-active keyd-dummy-{volume}.service", 60)
    assert volume_state(guest, volume) == "locked"
    trail = events(audit_records(guest, start, ("lock-started", "lock-finished"), volume), volume)
    print(f"\nD-Bus trail for {volume}: {trail}")
    assert trail[-2:] == ["lock-started", "lock-finished"], trail
