"""keydctl with keyd.service running on a real kernel: unlock/lock go through the daemon, --direct
bypasses it, and an unprivileged user is refused with a clear message and exit code 7."""

from __future__ import annotations

from collections.abc import Iterator

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
    start_keyd,
    stop_keyd,
    volume_key,
    volume_state,
    write,
)

from .conftest import GuestLab
from .guest.daemon_lab import dummy_unit, format_volume, mappings, volume_toml

VOLUME = "delta"
KEY_FILE = f"/root/{VOLUME}.key"
KEYDCTL = str(GUEST_BIN / "keydctl")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
UNIT = f"keyd-dummy-{VOLUME}.service"


@pytest.fixture
def keyd_running(guest: GuestLab, signer: Signer) -> Iterator[None]:
    """keyd.service serving one LUKS2 volume with a dependent unit; stopped after the test."""
    disk = guest.disk("DISKCLI", 64)
    format_volume(guest, disk, volume_key(VOLUME))
    # key_timeout in the volume's own table: the policy keys now live in keyd.toml.
    volumes = volume_toml(VOLUME, disk, [UNIT], policy="key_timeout = 3600")
    install_keyd(guest, signer, config_toml(signer, volumes), {UNIT: dummy_unit(VOLUME)})
    write(guest, KEY_FILE, volume_key(VOLUME), mode="0600")
    start_keyd(guest)
    yield
    stop_keyd(guest)


def keydctl(guest: GuestLab, *argv: str, nobody: bool = False,
            key: bytes | None = None) -> tuple[int, str, str]:
    result = guest.run([*(NOBODY if nobody else []), KEYDCTL, *argv], input=key, timeout=300)
    return int(result.rc), str(result.stdout), str(result.stderr)


def by_keyd(guest: GuestLab, after: str, awaiting: tuple[str, ...] = ()) -> list[dict[str, str]]:
    return [r for r in audit_records(guest, after, awaiting, VOLUME) if r.get("KEYD_VOLUME") == VOLUME]


def test_keydctl_goes_through_keyd_and_direct_bypasses_it(guest: GuestLab,
                                                          keyd_running: None) -> None:
    assert volume_state(guest, VOLUME) == "waiting-for-key"
    start = cursor(guest)
    rc, out, err = keydctl(guest, "unlock", VOLUME, "--key-file", KEY_FILE)
    assert (rc, out) == (0, f"volume {VOLUME} unlocked at /mnt/t/{VOLUME} (through keyd)\n"), \
        (err, journal_text(guest, "keyd.service"))
    assert volume_state(guest, VOLUME) == "unlocked"
    assert guest.run(["systemctl", "is-active", UNIT]).rc == 0  # keyd starts the services
    records = by_keyd(guest, start, ("unlock-started", "unlock-finished"))
    started = [r for r in records if r.get("KEYD_EVENT") == "unlock-started"]
    assert [r.get("KEYD_REASON") for r in started] == ["D-Bus request by uid 0"], records
    assert events(records)[-1] == "unlock-finished", events(records)
    # The daemon's engine took the same per-volume lock file direct mode takes.
    assert guest.run(["test", "-e", f"/run/keyd/{VOLUME}.lock"]).rc == 0

    start = cursor(guest)
    rc, out, err = keydctl(guest, "lock", VOLUME)
    assert (rc, out) == (0, f"volume {VOLUME} locked (through keyd)\n"), err
    assert f"keyd-{VOLUME}-crypt" not in mappings(guest)
    records = by_keyd(guest, start, ("lock-started", "lock-finished"))
    assert events(records)[-2:] == ["lock-started", "lock-finished"], events(records)
    assert records[-2].get("KEYD_REASON") == "D-Bus request by uid 0", records[-2]

    start = cursor(guest)
    rc, out, err = keydctl(guest, "unlock", VOLUME, "--direct", "--key-file", KEY_FILE)
    assert (rc, out) == (0, f"volume {VOLUME} unlocked at /mnt/t/{VOLUME}\n"), err
    assert f"keyd-{VOLUME}-crypt" in mappings(guest)
    assert by_keyd(guest, start) == []  # keyd saw nothing: it was bypassed ...
    assert volume_state(guest, VOLUME) == "locked"  # ... and still believes it locked
    rc, out, err = keydctl(guest, "lock", VOLUME)  # a lock through keyd closes what is open
    assert (rc, out) == (0, f"volume {VOLUME} locked (through keyd)\n"), err
    assert f"keyd-{VOLUME}-crypt" not in mappings(guest)

    # Locked behind keyd's back: keyd's next unlock asks the engine, which opens it again.
    assert keydctl(guest, "unlock", VOLUME, "--key-file", KEY_FILE)[0] == 0
    rc, out, err = keydctl(guest, "lock", VOLUME, "--direct")
    assert (rc, out) == (0, f"volume {VOLUME} locked\n"), err
    assert volume_state(guest, VOLUME) == "unlocked"
    rc, out, err = keydctl(guest, "unlock", VOLUME, "--key-file", KEY_FILE)
    assert (rc, out) == (0, f"volume {VOLUME} unlocked at /mnt/t/{VOLUME} (through keyd)\n"), err
    assert f"keyd-{VOLUME}-crypt" in mappings(guest)
    assert guest.run(["findmnt", f"/mnt/t/{VOLUME}"]).rc == 0


def test_an_unprivileged_keydctl_unlock_is_refused_with_exit_7(guest: GuestLab,
                                                               keyd_running: None) -> None:
    # nobody has the right key (on stdin); keyd must still say no
    rc, out, err = keydctl(guest, "unlock", VOLUME, "--key-file", "-", nobody=True,
                           key=volume_key(VOLUME))
    assert rc == 7, (out, err)
    assert "keydctl: keyd's D-Bus policy does not let uid 65534 call Unlock" in err, err
    assert "fix: run as root or as a member of keyd's admin group" in err, err
    assert f"keyd-{VOLUME}-crypt" not in mappings(guest)
    assert volume_state(guest, VOLUME) == "waiting-for-key"
