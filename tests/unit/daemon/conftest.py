"""Shared fixtures of the daemon tests: a private dbus-daemon anyone on this host may use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyd.daemon.client import KeydClient, bus_at, connect

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture(scope="module")
def bus_address() -> Iterator[str]:
    """A private bus anyone may use (the socket is outside pytest's 0700 tmp tree)."""
    daemon, address, directory = start_bus(BUS_CONFIG)
    yield address
    daemon.terminate()
    daemon.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


SYSTEM_LIKE = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""
ROOT = Path(__file__).resolve().parents[3]


def start_bus(config_text: str) -> tuple[subprocess.Popen[str], str, Path]:
    """A dbus-daemon with ``config_text`` ({dir} is filled in); returns it, its address, its dir."""
    directory = Path(tempfile.mkdtemp(prefix="keyd-test-bus-"))
    os.chmod(directory, 0o755)
    config = directory / "bus.conf"
    config.write_text(config_text.format(dir=directory, policy=ROOT / "systemd/org.keyd.Keyd1.conf"))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                               "--print-address"], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    return daemon, daemon.stdout.readline().strip(), directory


@pytest.fixture(scope="module")
def system_like_bus() -> Iterator[str]:
    """A bus with the system bus's default policy plus keyd's real policy file."""
    daemon, address, directory = start_bus(SYSTEM_LIKE)
    yield address
    daemon.terminate()
    daemon.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


def start_fake_server(address: str) -> subprocess.Popen[str]:
    """tests/unit/daemon/dbus_fake_server.py on ``address``, once it said "ready"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/unit/daemon/dbus_fake_server.py"),
                             address], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture(scope="module")
def serve() -> Callable[[str], subprocess.Popen[str]]:
    """Starts the fake keyd D-Bus server (a second process) on a bus address."""
    return start_fake_server


@pytest.fixture(scope="module")
def server(bus_address: str,
           serve: Callable[[str], subprocess.Popen[str]]) -> Iterator[subprocess.Popen[str]]:
    """The fake keyd D-Bus server on this module's private bus."""
    proc = serve(bus_address)
    yield proc
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.fixture
def client(server: subprocess.Popen[str], bus_address: str) -> KeydClient:
    """keydctl's client connected to the fake server."""
    found = connect(bus_at(bus_address))
    assert found is not None
    return found
