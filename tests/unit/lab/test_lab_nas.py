"""The demo NAS without a VM: keyd's config for it, reading the audit trail back, the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyd.audit.reader import AuditEntry, render_table
from keyd.config.model import MountLayer, RaidLayer
from keyd.config.parse import parse_config
from keyd_lab.nas import (
    EXPECTED_TRAIL,
    NasSpec,
    Step,
    keyd_toml,
    missing_from_trail,
    policy_lines,
    render_body,
    render_summary,
    render_title,
    timeline,
    trail_from_table,
)

FPR = "39B945CBD66CC5153A84D7DAA2611B3FC90A9EC2"
MD_UUID = "e7ca3947:09768151:4d3ffcd0:164f12cf"


def test_the_config_is_raid5_then_luks_then_xfs_with_the_removal_policy() -> None:
    spec = NasSpec(volume="vault", mountpoint="/mnt/t/vault", grace=7)
    config = parse_config(keyd_toml(spec, FPR, "/etc/keyd/gnupg", MD_UUID), "keyd.toml")
    volume = config.volume("vault")
    assert [(layer.name, layer.kind) for layer in volume.layers] == \
        [("md0", "raid"), ("crypt", "crypt"), ("data", "mount")]
    raid, _, mount = volume.layers
    assert isinstance(raid, RaidLayer) and isinstance(mount, MountLayer)
    assert raid.uuid == MD_UUID.replace(":", "")  # keyd keeps mdadm's UUID without colons
    assert (mount.fstype, mount.mountpoint) == ("xfs", "/mnt/t/vault")
    assert volume.policy.lock_on_removal is True and volume.policy.grace == 7
    assert config.trust.signers == (FPR,)


def test_the_policy_keys_are_lines_of_the_volume_table() -> None:
    volume_keys = policy_lines(NasSpec(grace=2.5))
    assert "grace = 2.5" in volume_keys and "lock_on_removal = true" in volume_keys


def _entries(*events: str) -> list[AuditEntry]:
    start = datetime(2026, 11, 23, 16, 0, tzinfo=UTC)
    return [AuditEntry(start + timedelta(seconds=i), event, f"message about {event}", volume="nas",
                       serial="KEYSTICK01") for i, event in enumerate(events)]


def test_the_trail_is_read_back_from_keydctl_audits_table() -> None:
    table = render_table(_entries("daemon-started", "stick-inserted", "bundle-accepted"))
    assert trail_from_table(table) == ["daemon-started", "stick-inserted", "bundle-accepted"]
    assert trail_from_table("no keyd audit records\n") == []


@pytest.mark.parametrize(("trail", "missing"), [
    (list(EXPECTED_TRAIL), []),
    (["daemon-started", *EXPECTED_TRAIL[:4], "reconciled", *EXPECTED_TRAIL[4:]], []),
    (list(EXPECTED_TRAIL[:4]), list(EXPECTED_TRAIL[4:])),
    ([*EXPECTED_TRAIL[4:], *EXPECTED_TRAIL[:4]], list(EXPECTED_TRAIL[4:])),
    ([e for e in EXPECTED_TRAIL if e != "bundle-accepted"], ["bundle-accepted"]),
    ([], list(EXPECTED_TRAIL)),
], ids=["complete", "others-between", "never-locked", "out-of-order", "one-missing", "empty"])
def test_missing_from_trail_wants_every_event_in_order(trail: list[str], missing: list[str]) -> None:
    assert missing_from_trail(trail) == missing


def test_a_step_shows_its_number_outcome_time_and_indented_output() -> None:
    step = Step("keydctl status", "what keyd reports", 2.345, "$ keydctl status\nnas  unlocked\n")
    assert render_title(5, step.title) == "5. keydctl status"
    assert render_body(step).splitlines() == [
        "   -> what keyd reports  [2.3 s]", "   | $ keydctl status", "   | nas  unlocked"]


def test_the_summary_lists_every_step_and_their_total() -> None:
    steps = [Step("boot", "", 30.0), Step("plug the stick", "", 12.5)]
    lines = render_summary(steps).splitlines()
    assert lines[1].split() == ["1.", "boot", "30.0", "s"]
    assert lines[2].split() == ["2.", "plug", "the", "stick", "12.5", "s"]
    assert lines[3].split() == ["total", "42.5", "s"]


def test_the_timeline_gives_each_wanted_event_once_in_seconds_after_the_start() -> None:
    start = 1_700_000_000_000_000
    records = [{"KEYD_EVENT": event, "__REALTIME_TIMESTAMP": str(start + offset)} for event, offset in
               [("stick-inserted", 1_200_000), ("bundle-accepted", 18_000_000),
                ("bundle-accepted", 19_000_000), ("unlock-finished", 46_520_000)]]
    assert timeline(records, start, ["stick-inserted", "bundle-accepted", "unlock-started",
                                     "unlock-finished"]) == \
        "stick-inserted +1.2 s, bundle-accepted +18.0 s, unlock-finished +46.5 s"
    assert timeline([], start, ["stick-inserted"]) == ""
