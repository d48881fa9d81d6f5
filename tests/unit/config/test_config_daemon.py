"""The daemon's keys in keyd.toml: [daemon] (daemon-wide + defaults) and each volume's policy keys."""

from __future__ import annotations

import pytest

from keyd.config import parse_config
from keyd.config.model import Config, DaemonSettings, VolumePolicy
from keyd.errors import ConfigError
from tests import configs


def volume(name: str, keys: str = "") -> str:
    return f"[volume.{name}]\n{keys}\n" + configs.layer(
        name, "data", "mount", fstype="ext4", mountpoint=f"/srv/{name}", device=f"/dev/{name}")


def parse(text: str) -> Config:
    return parse_config(text, "keyd.toml")


def test_no_daemon_keys_means_the_defaults() -> None:
    config = parse(volume("tank"))
    assert config.daemon == DaemonSettings()
    assert config.volumes[0].policy == VolumePolicy()


def test_volume_keys_override_the_daemon_wide_defaults() -> None:
    config = parse("[daemon]\nkey_timeout = 10\nadmin_group = \"keyd\"\nbackoff_base = 0.5\n"
                   "backoff_max = 60\n" +
                   volume("tank", "lock_on_removal = true\ngrace = 5\ndependents = \"degraded\"\n"
                                  "lock_retries = 4\n") + volume("other"))
    tank, other = (v.policy for v in config.volumes)
    assert tank == VolumePolicy(lock_on_removal=True, grace=5.0, key_timeout=10.0,
                                dependents="degraded", lock_retries=4)
    assert other == VolumePolicy(key_timeout=10.0) == config.daemon.defaults
    assert (config.daemon.admin_group, config.daemon.backoff_base,
            config.daemon.backoff_max) == ("keyd", 0.5, 60.0)


def test_every_volume_key_can_be_set_in_the_volume_table() -> None:
    keys = ("auto_unlock = false\nlock_on_removal = true\ngrace = 1\nkey_timeout = 2\n"
            "passphrase = true\npassphrase_timeout = 3\ndependents = \"degraded\"\n"
            "member_wait = 4\nlock_retries = 5\nlock_retry_delay = 6\n")
    assert parse(volume("tank", keys)).volumes[0].policy == VolumePolicy(
        False, True, 1.0, 2.0, True, 3.0, "degraded", 4.0, 5, 6.0)


@pytest.mark.parametrize(("text", "key", "fix"), [
    ("[daemon]\ngrase = 5\n", "daemon.grase", "did you mean 'grace'"),
    (volume("tank", "lock_on_remove = true"), "volume.tank.lock_on_remove", "lock_on_removal"),
    ("[daemon]\nlock_on_removal = 1\n", "daemon.lock_on_removal", "true or false"),
    (volume("tank", "grace = -1"), "volume.tank.grace", ">= 0"),
    (volume("tank", "grace = true"), "volume.tank.grace", "a number"),
    (volume("tank", "passphrase = \"secret\""), "volume.tank.passphrase", "true or false"),
    ("[daemon]\nlock_retries = 1.5\n", "daemon.lock_retries", "an integer"),
    ("[daemon]\ndependents = 'hang'\n", "daemon.dependents", "degraded, skip"),
    ("[daemon]\nbackoff_base = 0\n", "daemon.backoff_base", "> 0"),
    ("[daemon]\nadmin_group = ' '\n", "daemon.admin_group", "name a group"),
    ("[daemon.volume.tank]\ngrace = 1\n", "daemon.volume", "remove it"),
    ("daemon = 3\n", "daemon", "a table"),
])
def test_bad_daemon_keys_name_the_key_and_the_fix(text: str, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.key == key
    assert fix in (caught.value.fix or "")
