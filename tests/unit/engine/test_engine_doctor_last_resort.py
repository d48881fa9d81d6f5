"""keydctl doctor and Debian's mdadm-last-resort@.timer against a raid layer's degraded = "never"."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyd.config import Config, parse_config
from keyd.engine.doctor import LAST_RESORT, check_last_resort
from tests import configs

UUID = "6b8b4567327b23c6643c986966334873"


def config(degraded: str) -> Config:
    return parse_config(configs.seed_001(UUID, volume="tank", crypt_name="crypt0", key=None,
                                         degraded=degraded, mountpoint="/srv/tank"), "t.toml")


def root_with_timer(tmp_path: Path, *, masked: bool) -> Path:
    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib/systemd/system" / LAST_RESORT).write_text("[Timer]\nOnActiveSec=30\n")
    if masked:
        (tmp_path / "etc/systemd/system").mkdir(parents=True)
        (tmp_path / "etc/systemd/system" / LAST_RESORT).symlink_to("/dev/null")
    return tmp_path


def test_an_unmasked_timer_is_a_warning_with_the_mask_as_fix(tmp_path: Path) -> None:
    (finding,) = check_last_resort(config("never"), root_with_timer(tmp_path, masked=False))
    assert finding.status == "warn" and "tank/md0" in finding.text
    assert finding.fix == f"systemctl mask {LAST_RESORT}"


def test_a_masked_timer_is_ok(tmp_path: Path) -> None:
    (finding,) = check_last_resort(config("never"), root_with_timer(tmp_path, masked=True))
    assert finding.status == "ok"


@pytest.mark.parametrize("degraded", ["always", "after=30"])
def test_a_policy_that_allows_degraded_arrays_needs_no_check(tmp_path: Path, degraded: str) -> None:
    assert check_last_resort(config(degraded), root_with_timer(tmp_path, masked=False)) == []


def test_no_timer_shipped_no_finding(tmp_path: Path) -> None:
    assert check_last_resort(config("never"), tmp_path) == []
