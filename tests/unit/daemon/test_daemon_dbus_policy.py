"""keyd's real D-Bus policy file on a bus with the system bus's default policy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyd.daemon.client import bus_at, connect

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs dbus-daemon, root and setpriv (to act as root and as nobody)")

AS_NOBODY = textwrap.dedent("""
    import sys
    from keyd.daemon.client import DaemonError, bus_at, connect
    client = connect(bus_at(sys.argv[1]))
    print("states:", sorted(state for _, state, _ in client.list_volumes()))
    for call in (lambda: client.lock("tank"), lambda: client.unlock_passphrase("work", "x")):
        try:
            call()
            print("allowed")
        except DaemonError as exc:
            print(type(exc).__name__)
""")


@pytest.fixture(scope="module")
def served(system_like_bus: str,
           serve: Callable[[str], subprocess.Popen[str]]) -> Iterator[str]:
    proc = serve(system_like_bus)
    yield system_like_bus
    proc.terminate()
    proc.wait(10)


def test_nobody_may_read_states_but_not_change_them(served: str) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": "/"}
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", AS_NOBODY, served], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.stdout.splitlines() == ["states: ['unlocked', 'waiting-for-key']",
                                        "DaemonAccessDenied", "DaemonAccessDenied"], done.stderr


def test_root_may_change_states(served: str) -> None:
    client = connect(bus_at(served))
    assert client is not None
    assert client.lock("tank") == "locking"
    assert client.wait("tank", timeout=20)[0] == "locked"
