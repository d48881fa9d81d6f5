"""No stick within key_timeout: keyd asks through systemd-ask-password, answered by a password agent."""

from __future__ import annotations

from keyd_lab.daemon_setup import (
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
    wait_until,
)

from .conftest import GuestLab
from .guest.daemon_lab import (
    format_volume,
    volume_toml,
)

VOLUME = "golf"
# What an agent does (systemd-tty-ask-password-agent, Plymouth): find the question by its
# Id= in /run/systemd/ask-password/ask.*, answer on the Socket= it names.
AGENT = f"""
f=$(grep -l '^Id=keyd:{VOLUME}$' /run/systemd/ask-password/ask.* | head -n1)
sock=$(sed -n 's/^Socket=//p' "$f")
/lib/systemd/systemd-reply-password 1 "$sock"
"""


def test_passphrase_fallback_is_answered_through_the_ask_password_agent_interface(
        guest: GuestLab, signer: Signer) -> None:
    disk = guest.disk("DISKGOLF", 64)
    format_volume(guest, disk, volume_key(VOLUME))
    policy = "key_timeout = 3\npassphrase = true\npassphrase_timeout = 300\n"
    start = cursor(guest)
    install_keyd(guest, signer, config_toml(signer, volume_toml(VOLUME, disk, policy=policy)))
    try:
        start_keyd(guest)
        asked = f"grep -qx 'Id=keyd:{VOLUME}' /run/systemd/ask-password/ask.*"
        assert wait_until(guest, asked, 180), journal_text(guest, "keyd.service")
        question = guest.sh(f"cat $(grep -l 'Id=keyd:{VOLUME}' /run/systemd/ask-password/ask.*)")
        print(f"\nthe question keyd asked:\n{question}")
        assert f"Passphrase for keyd volume {VOLUME}" in question

        guest.check(["sh", "-ec", AGENT], input=volume_key(VOLUME), timeout=60)

        assert wait_until(guest, f"findmnt /mnt/t/{VOLUME}", 180), journal_text(guest, "keyd.service")
        assert volume_state(guest, VOLUME) == "unlocked"
        trail = events(audit_records(guest, start), VOLUME)
        print(f"audit trail: {trail}")
        assert trail.index("key-timeout") < trail.index("passphrase-fallback") \
            < trail.index("unlock-started") < trail.index("unlock-finished"), trail
    finally:
        stop_keyd(guest)
