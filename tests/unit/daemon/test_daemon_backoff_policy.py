"""Per-stick backoff (injected clock values) and the daemon policy parser."""

from __future__ import annotations

import tomllib

import pytest

from keyd.daemon.backoff import Backoff
from keyd.daemon.policy import DaemonPolicy, VolumePolicy, load_policy, parse_policy
from keyd.errors import ConfigError


def test_backoff_doubles_per_failure_up_to_the_cap() -> None:
    book = Backoff(base=2, maximum=20)
    assert [book.delay(n) for n in range(7)] == [0, 2, 4, 8, 16, 20, 20]


def test_a_failed_stick_waits_and_others_do_not() -> None:
    book = Backoff(base=2, maximum=600).failed("S1", now=100.0).failed("S1", now=103.0)
    assert book.failures("S1") == 2
    assert book.wait("S1", now=103.0) == 4.0
    assert book.wait("S1", now=105.5) == 1.5
    assert book.wait("S1", now=200.0) == 0.0
    assert book.wait("S2", now=103.0) == 0.0


def test_success_forgets_the_failures() -> None:
    book = Backoff().failed("S1", 0.0).failed("S2", 0.0).succeeded("S1")
    assert (book.failures("S1"), book.wait("S1", 0.0), book.failures("S2")) == (0, 0.0, 1)


def test_huge_failure_counts_do_not_overflow() -> None:
    assert Backoff(base=1, maximum=60).delay(10_000) == 60


def parse(text: str) -> DaemonPolicy:
    return parse_policy(tomllib.loads(text), "daemon.toml")


def test_empty_policy_is_the_defaults() -> None:
    assert parse("") == DaemonPolicy()


def test_volume_tables_override_the_daemon_wide_defaults() -> None:
    policy = parse("""
[daemon]
key_timeout = 10
admin_group = "keyd"
backoff_base = 0.5
[daemon.volume.tank]
lock_on_removal = true
grace = 5
dependents = "degraded"
""")
    tank = policy.for_volume("tank")
    assert (tank.lock_on_removal, tank.grace, tank.key_timeout, tank.dependents) == \
        (True, 5.0, 10.0, "degraded")
    assert policy.for_volume("other") == VolumePolicy(key_timeout=10)
    assert (policy.admin_group, policy.backoff_base) == ("keyd", 0.5)


@pytest.mark.parametrize(("text", "key"), [
    ("[daemon]\ngrase = 5", "daemon.grase"),
    ("[other]\n", "other"),
    ("[daemon]\nlock_on_removal = 1", "daemon.lock_on_removal"),
    ("[daemon]\ngrace = -1", "daemon.grace"),
    ("[daemon]\ngrace = true", "daemon.grace"),
    ("[daemon]\nlock_retries = 1.5", "daemon.lock_retries"),
    ("[daemon]\ndependents = 'hang'", "daemon.dependents"),
    ("[daemon]\nbackoff_base = 0", "daemon.backoff_base"),
    ("[daemon]\nadmin_group = ''", "daemon.admin_group"),
    ("[daemon.volume.tank]\nwhat = 1", "daemon.volume.tank.what"),
    ("[daemon]\nvolume = { tank = 3 }", "daemon.volume.tank"),
    ("daemon = 3", "daemon"),
])
def test_bad_policy_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.key == key and caught.value.fix


def test_a_missing_policy_file_means_defaults(tmp_path: object) -> None:
    assert load_policy(f"{tmp_path}/absent.toml") == DaemonPolicy()
