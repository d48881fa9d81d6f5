"""The real ``keyd`` process on this host: READY=1 via NOTIFY_SOCKET, D-Bus, watchdog, SIGTERM.

It runs with the real engine, udev monitor and trust pipeline; the configured
volume's devices do not exist here, so it is reconciled as locked and waits for
a key. A private dbus-daemon stands in for the system bus.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.daemon.client import bus_at, connect

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None,
                                reason="dbus-daemon is not installed")


class Notifications:
    """The NOTIFY_SOCKET end systemd would hold."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def until(self, wanted: str) -> list[str]:
        seen = []
        while True:
            message = self.sock.recv(4096).decode()
            seen.append(message)
            if wanted in message.splitlines():
                return seen


@pytest.fixture
def keyd(tmp_path: Path, bus_address: str) -> Iterator[tuple[subprocess.Popen[str], Notifications]]:
    config = tmp_path / "keyd.toml"
    config.write_text(textwrap.dedent("""
        [daemon]
        key_timeout = 3600
        [volume.tank]
        [volume.tank.layer.crypt0]
        kind = "crypt"
        type = "luks"
        device = "/dev/disk/by-uuid/00000000-0000-4000-8000-000000000000"
        [volume.tank.layer.data]
        kind = "mount"
        below = ["crypt0"]
        fstype = "ext4"
        mountpoint = "/srv/keyd-test-tank"
    """))
    notes = Notifications(tmp_path / "notify")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(notes.path),
           "WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyd.daemon.main", "--config", str(config),
         "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
         "--bus", bus_address], env=env, stderr=subprocess.PIPE, text=True)
    yield proc, notes
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_keyd_becomes_ready_serves_dbus_pings_the_watchdog_and_stops_cleanly(
        keyd: tuple[subprocess.Popen[str], Notifications], bus_address: str) -> None:
    proc, notes = keyd
    ready = notes.until("READY=1")
    assert any("STATUS=serving 1 volume(s)" in m for m in ready)
    client = connect(bus_at(bus_address))
    assert client is not None
    assert client.list_volumes() == [("tank", "waiting-for-key", "")]
    notes.until("WATCHDOG=1")
    proc.send_signal(signal.SIGTERM)
    notes.until("STOPPING=1")
    assert proc.wait(30) == 0
    assert connect(bus_at(bus_address)) is None


def test_a_broken_config_exits_with_the_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "keyd.toml"
    bad.write_text("[volume.tank]\nlayer = 3\n")
    done = subprocess.run([sys.executable, "-m", "keyd.daemon.main", "--config", str(bad),
                           "--no-dbus"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 3
    assert str(bad) in done.stderr
