"""The D-Bus API end to end on a private dbus-daemon: service in a second process, real client.

Skipped where dbus-daemon is not installed. The caller's uid is checked by the
service itself: a client running as user nobody is denied.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyd.daemon.client import (
    DaemonAccessDenied,
    DaemonBadRequest,
    DaemonBusy,
    DaemonError,
    DaemonKeyRejected,
    DaemonNoSuchVolume,
    KeydClient,
    bus_at,
    choose,
    connect,
    lock_outcome,
    remote_lock,
    remote_unlock,
    translate_error,
    unlock_outcome,
)
from tests.support.daemon_fakes import GOOD_KEY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None,
                                reason="dbus-daemon is not installed")

def test_connect_says_none_when_no_daemon_owns_the_name(bus_address: str) -> None:
    assert connect(bus_at(bus_address)) is None


def test_connect_says_none_without_a_bus(tmp_path: Path) -> None:
    assert connect(bus_at(f"unix:path={tmp_path}/nothing")) is None


def test_list_and_get_volumes(client: KeydClient) -> None:
    volumes = {name: state for name, state, _ in client.list_volumes()}
    assert volumes == {"tank": "unlocked", "work": "waiting-for-key"}
    info = client.get_volume("tank")
    assert (info["state"], info["mountpoint"], info["dependents"]) == \
        ("unlocked", "/srv/tank", "skip")


def test_unknown_volume_is_a_clear_error(client: KeydClient) -> None:
    with pytest.raises(DaemonNoSuchVolume, match="configured: tank, work"):
        client.get_volume("nas9")


def test_unlock_with_a_key_passed_as_a_unix_fd_then_lock(client: KeydClient) -> None:
    assert client.unlock_key("work", GOOD_KEY) == "unlocking"
    assert client.wait("work", timeout=20) == ("unlocked", "")
    assert client.lock("work") == "locking"
    assert client.wait("work", timeout=20)[0] == "locked"


def test_keys_by_key_name_each_in_its_own_fd(client: KeydClient) -> None:
    assert client.get_volume("work")["key_names"] == "crypt1"
    with pytest.raises(DaemonBadRequest, match="volume work has no key named 'tc9'") as caught:
        client.unlock_keys("work", {"crypt1": GOOD_KEY, "tc9": b"x"})
    assert caught.value.fix == "its key names are: crypt1"
    assert client.get_volume("work")["state"] != "unlocking"
    assert client.unlock_keys("work", {"crypt1": GOOD_KEY, "": b"unused"}) == "unlocking"
    assert client.wait("work", timeout=20) == ("unlocked", "")
    assert client.lock("work") == "locking"
    assert client.wait("work", timeout=20)[0] == "locked"


def test_a_wrong_passphrase_ends_locked_with_the_reason(client: KeydClient) -> None:
    assert client.unlock_passphrase("work", "not it") == "unlocking"
    state, detail = client.wait("work", timeout=20)
    assert (state, detail) == ("locked", "wrong key")


UNPRIVILEGED = textwrap.dedent("""
    import sys
    from keyd.daemon.client import DaemonAccessDenied, bus_at, connect
    client = connect(bus_at(sys.argv[1]))
    try:
        client.lock("tank")
    except DaemonAccessDenied as exc:
        print("denied:", exc.message)
    else:
        print("allowed")
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run a client as nobody")
def test_an_unprivileged_caller_is_denied_by_the_daemon_itself(client: KeydClient,
                                                                bus_address: str) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": "/"}
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", UNPRIVILEGED, bus_address],
                          capture_output=True, text=True, env=env, timeout=30, check=False)
    assert done.stdout.strip() == "denied: uid 65534 may not Lock volumes", done.stderr
    assert client.get_volume("tank")["state"] == "unlocked"


@pytest.mark.parametrize(("text", "cls", "message"), [
    ("GDBus.Error:org.keyd.Keyd1.Error.AccessDenied: uid 5 may not Lock volumes\n  fix: x",
     DaemonAccessDenied, "uid 5 may not Lock volumes"),
    ("GDBus.Error:org.keyd.Keyd1.Error.NoSuchVolume: no volume named 'x'", DaemonNoSuchVolume,
     "no volume named 'x'"),
    ("GDBus.Error:org.freedesktop.DBus.Error.NoReply: timeout", DaemonError, "timeout"),
    ("something else", DaemonError, "something else"),
])
def test_remote_error_names_map_to_typed_errors(text: str, cls: type, message: str) -> None:
    error = translate_error(Exception(text))
    assert type(error) is cls and error.message == message


def test_remote_unlock_and_lock_report_like_direct_mode(client: KeydClient) -> None:
    assert remote_unlock(client, "work", {"": GOOD_KEY}, timeout=20) == "volume work unlocked"
    assert remote_lock(client, "work", timeout=20) == "volume work locked"
    with pytest.raises(DaemonKeyRejected) as caught:
        remote_unlock(client, "work", {"crypt1": b"nope"}, timeout=20)
    assert caught.value.exit_code == 6


def test_direct_mode_is_chosen_by_flag_or_by_a_missing_daemon(bus_address: str,
                                                              client: KeydClient) -> None:
    assert choose(True, bus_at(bus_address)) is None
    assert choose(False, bus_at(bus_address)) is not None


@pytest.mark.parametrize(("state", "detail", "error"), [
    ("locked", "wrong key", DaemonKeyRejected),
    ("waiting-for-key", "wrong key", DaemonKeyRejected),
    ("failed", "STORAGE", DaemonError), ("waiting-for-members", "", DaemonError),
])
def test_unlock_outcomes_map_to_exit_codes(state: str, detail: str, error: type) -> None:
    with pytest.raises(error):
        unlock_outcome("tank", state, detail)


def test_busy_lock_maps_to_exit_code_5() -> None:
    with pytest.raises(DaemonBusy) as caught:
        lock_outcome("tank", "unlocked", "lock refused, volume busy: 42 (bash)")
    assert caught.value.exit_code == 5
    assert lock_outcome("tank", "locked", "") == "volume tank locked"


def test_the_api_version_is_a_property(client: KeydClient) -> None:
    assert client.proxy.Version == "1"
