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
    answer_question,
    asked,
    format_volume,
    volume_toml,
)

VOLUME = "golf"


def test_passphrase_fallback_is_answered_through_the_ask_password_agent_interface(
        guest: GuestLab, signer: Signer) -> None:
    disk = guest.disk("DISKGOLF", 64)
    format_volume(guest, disk, volume_key(VOLUME))
    policy = "key_timeout = 3\npassphrase = true\npassphrase_timeout = 300\n"
    start = cursor(guest)
    install_keyd(guest, signer, config_toml(signer, volume_toml(VOLUME, disk, policy=policy)))
    try:
        start_keyd(guest)
        assert wait_until(guest, asked(f"keyd:{VOLUME}"), 180), journal_text(guest, "keyd.service")
        question = guest.sh(f"cat $(grep -l 'Id=keyd:{VOLUME}' /run/systemd/ask-password/ask.*)")
        print(f"\nthe question keyd asked:\n{question}")
        assert f"Passphrase for keyd volume {VOLUME}" in question

        answer_question(guest, f"keyd:{VOLUME}", volume_key(VOLUME))

        assert wait_until(guest, f"findmnt /mnt/t/{VOLUME}", 180), journal_text(guest, "keyd.service")
        assert volume_state(guest, VOLUME) == "unlocked"
        order = ("key-timeout", "passphrase-fallback", "unlock-started", "unlock-finished")
        trail = events(audit_records(guest, start, order, VOLUME), VOLUME)
        print(f"audit trail: {trail}")
        assert trail.index("key-timeout") < trail.index("passphrase-fallback") \
            < trail.index("unlock-started") < trail.index("unlock-finished"), trail
    finally:
        stop_keyd(guest)
