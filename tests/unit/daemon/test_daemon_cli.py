"""keydctl unlock/lock over a real private bus to the real service and core (fake storage ports).

keydctl runs as a separate process (``--bus ADDRESS``), as root and as user nobody.
Skipped where dbus-daemon is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyd.daemon.client import KeydClient
from tests.support.daemon_fakes import GOOD_KEY

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None,
                                reason="dbus-daemon is not installed")


def keydctl(bus: str, *argv: str, key: bytes = b"", nobody: bool = False,
            ) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if nobody else []
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": "/"}
    command = [*prefix, sys.executable, "-m", "keyd.cli.main", *argv[:2], "--bus", bus,
               "--timeout", "20", *argv[2:]]
    return subprocess.run(command, input=key.decode("latin-1"), capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_unlock_and_lock_go_through_keyd(client: KeydClient, bus_address: str) -> None:
    done = keydctl(bus_address, "unlock", "work", "--key-file", "-", key=GOOD_KEY)
    assert (done.returncode, done.stdout) == (0, "volume work unlocked (through keyd)\n"), \
        done.stderr
    assert client.get_volume("work")["state"] == "unlocked"
    done = keydctl(bus_address, "lock", "work")
    assert (done.returncode, done.stdout) == (0, "volume work locked (through keyd)\n"), \
        done.stderr
    assert client.get_volume("work")["state"] == "locked"


def test_a_wrong_passphrase_exits_6_like_direct_mode(client: KeydClient,
                                                     bus_address: str) -> None:
    done = keydctl(bus_address, "unlock", "work", "--passphrase", key=b"not it\n")
    assert done.returncode == 6, done.stderr
    assert "keydctl: wrong key for volume work" in done.stderr
    assert client.get_volume("work")["state"] == "locked"


def test_an_unknown_volume_exits_3_with_keyds_list(server: subprocess.Popen[str],
                                                   bus_address: str) -> None:
    done = keydctl(bus_address, "lock", "nas9")
    assert done.returncode == 3
    assert "no volume named 'nas9' (configured: tank, work)" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run keydctl as nobody")
def test_user_nobody_is_denied_with_exit_7(client: KeydClient, bus_address: str) -> None:
    done = keydctl(bus_address, "lock", "tank", nobody=True)
    assert done.returncode == 7, done.stderr
    assert "keydctl: uid 65534 may not Lock volumes" in done.stderr
    assert "fix: run as root or as a member of keyd's admin group" in done.stderr
    assert client.get_volume("tank")["state"] == "unlocked"
