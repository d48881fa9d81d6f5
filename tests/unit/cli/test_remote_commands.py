"""keydctl unlock/lock through keyd: key sources, outcomes, exit codes, and when direct mode is used.

keyd is a small fake here (the calls keydctl makes on it, outcomes as keyd reports them);
its errors go through the real D-Bus error translation. The same commands over a real
private bus are in tests/unit/daemon/test_daemon_cli.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyd.cli import main as keydctl
from keyd.cli.remote import system_bus_socket
from keyd.cli.volume_commands import Environment
from keyd.daemon.client import FINAL_STATES, translate_error
from keyd.errors import KeydError, user_message

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class FakeKeyd:
    """keyd as keydctl sees it: records requests, answers with a scripted end state."""

    outcome: tuple[str, str] = ("unlocked", "")
    refuse: str | None = None  # a D-Bus error text every request fails with
    key_names: str = "crypt0"
    calls: list[tuple[str, str, dict[str, bytes]]] = field(default_factory=list)
    ends: dict[str, tuple[str, str]] = field(default_factory=dict)  # by volume, at shutdown

    def _request(self, method: str, volume: str, keys: dict[str, bytes] | None = None) -> str:
        if self.refuse is not None:
            raise translate_error(Exception(self.refuse), method)
        self.calls.append((method, volume, keys or {}))
        return "unlocking" if method.startswith("Unlock") else "locking"

    def unlock_keys(self, volume: str, keys: Mapping[str, bytes | bytearray]) -> str:
        return self._request("UnlockWithKeys", volume, {n: bytes(k) for n, k in keys.items()})

    def lock(self, volume: str) -> str:
        return self._request("Lock", volume)

    def prepare_shutdown(self) -> list[str]:
        self._request("PrepareShutdown", "")
        return list(self.ends)

    def get_volume(self, volume: str) -> dict[str, str]:
        return {"name": volume, "state": self.outcome[0], "mountpoint": "/srv/tank",
                "key_names": self.key_names}

    def wait(self, volume: str, *, until: object = FINAL_STATES, timeout: float = 300.0,
             done: object = None) -> tuple[str, str]:
        return self.ends.get(volume, self.outcome)


@dataclass
class Run:
    tmp: Path
    keyd: FakeKeyd | None = field(default_factory=FakeKeyd)
    stdin: bytes = b""
    tty: bool = False
    asked: list[str] = field(default_factory=list)
    buses: list[str | None] = field(default_factory=list)
    out: io.StringIO = field(default_factory=io.StringIO)
    err: io.StringIO = field(default_factory=io.StringIO)

    def connect(self, bus: str | None) -> FakeKeyd | None:
        self.buses.append(bus)
        return self.keyd

    def ask(self, prompt: str) -> str:
        self.asked.append(prompt)
        return "open sesame"

    def __call__(self, *argv: str) -> int:
        args = keydctl.build_parser().parse_args(
            [*argv[:1], "--config", str(self.tmp / "absent.toml"), *argv[1:]])
        args.environment = Environment(
            None, None, None, None, None, io.BytesIO(self.stdin), self.out, self.err,  # type: ignore[arg-type]
            self.tty, ask=self.ask, daemon=self.connect)
        try:
            return int(args.func(args))
        except KeydError as exc:
            self.err.write(user_message(exc) + "\n")
            return exc.exit_code


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


def test_unlock_hands_the_key_file_to_keyd_unchanged(run: Run) -> None:
    key = run.tmp / "key"
    key.write_bytes(b"\x00binary\nkey\n")
    assert run("unlock", "tank", "--key-file", str(key)) == 0
    assert run.keyd is not None and run.keyd.calls == [
        ("UnlockWithKeys", "tank", {"": b"\x00binary\nkey\n"})]
    assert run.out.getvalue() == "volume tank unlocked at /srv/tank (through keyd)\n"
    assert run.buses == [None]  # the system bus


def test_key_sources_stdin_named_and_passphrase(run: Run) -> None:
    run.stdin = b"from stdin"
    assert run("unlock", "tank", "--key-file", "-") == 0
    key = run.tmp / "key"
    key.write_bytes(b"named")
    assert run("unlock", "tank", "--key-file", f"crypt0={key}", "--bus", "unix:path=/x") == 0
    run.tty = True
    assert run("unlock", "tank", "--passphrase") == 0
    run.tty, run.stdin = False, b"piped line\n"
    assert run("unlock", "tank", "--passphrase") == 0
    assert run.keyd is not None
    assert [call[2] for call in run.keyd.calls] == [
        {"": b"from stdin"}, {"crypt0": b"named"}, {"": b"open sesame"}, {"": b"piped line"}]
    assert run.asked == ["Passphrase for tank: "] and run.buses[1] == "unix:path=/x"


def test_a_volume_with_two_key_names_gets_a_key_for_each(run: Run) -> None:
    run.keyd = FakeKeyd(key_names="k1,k2")
    for name in ("k1", "k2"):
        (run.tmp / name).write_bytes(f"key of {name}".encode())
    assert run("unlock", "tank", "--key-file", f"k1={run.tmp / 'k1'}",
               "--key-file", f"k2={run.tmp / 'k2'}") == 0
    run.tty = True
    assert run("unlock", "tank", "--passphrase") == 0
    run.tty, run.stdin = False, b"first\nsecond\n"
    assert run("unlock", "tank", "--passphrase") == 0
    assert [call[2] for call in run.keyd.calls] == [
        {"k1": b"key of k1", "k2": b"key of k2"}, {"k1": b"open sesame", "k2": b"open sesame"},
        {"k1": b"first", "k2": b"second"}]
    assert run.asked == ["Passphrase for tank/k1: ", "Passphrase for tank/k2: "]


@pytest.mark.parametrize(("argv", "stdin", "words"), [
    (("--key-file", "a=/k1", "--key-file", "crypt0=/k2"), b"", "has no key named 'a'"),
    (("--key-file", "crypt0=/k1", "--key-file", "crypt0=/k2"), b"", "is given twice"),
    (("--key-file", "-", "--key-file", "crypt0=-"), b"", "stdin can carry only one key"),
    ((), b"", "needs a key"),
])
def test_what_keyd_cannot_take_is_a_usage_error(run: Run, argv: tuple[str, ...], stdin: bytes,
                                                words: str) -> None:
    run.stdin = stdin
    assert run("unlock", "tank", *argv) == 2
    assert words in run.err.getvalue()
    assert run.keyd is not None and run.keyd.calls == []


def test_unreadable_keys_exit_6_like_direct_mode(run: Run) -> None:
    assert run("unlock", "tank", "--key-file", str(run.tmp / "nope")) == 6
    assert f"cannot read key file {run.tmp}/nope" in run.err.getvalue()
    assert run("unlock", "tank", "--passphrase") == 6
    assert "no passphrase on stdin for volume tank" in run.err.getvalue()
    assert run.keyd is not None and run.keyd.calls == []


@pytest.mark.parametrize(("outcome", "code", "words"), [
    (("locked", "wrong key"), 6, "wrong key for volume tank"),
    (("waiting-for-members", "missing"), 1, "RAID members or devices are missing"),
    (("failed", "cryptsetup exited 1"), 1, "was not unlocked (failed): cryptsetup exited 1"),
])
def test_unlock_outcomes_map_to_direct_mode_exit_codes(run: Run, outcome: tuple[str, str],
                                                       code: int, words: str) -> None:
    run.keyd = FakeKeyd(outcome=outcome)
    run.stdin = b"k"
    assert run("unlock", "tank", "--key-file", "-") == code
    assert words in run.err.getvalue()


def test_lock_through_keyd_and_busy_exits_5(run: Run) -> None:
    run.keyd = FakeKeyd(outcome=("locked", ""))
    assert run("lock", "tank") == 0
    assert run.out.getvalue() == "volume tank locked (through keyd)\n"
    run.keyd = FakeKeyd(outcome=("unlocked", "busy: 42 (bash)"))
    assert run("lock", "tank") == 5
    assert "volume tank is busy: busy: 42 (bash)" in run.err.getvalue()
    assert "keyd never kills processes" in run.err.getvalue()


@pytest.mark.parametrize(("refusal", "code", "words"), [
    ("GDBus.Error:org.keyd.Keyd1.Error.AccessDenied: uid 1000 may not Unlock volumes", 7,
     "uid 1000 may not Unlock volumes\n  fix: run as root or as a member of keyd's admin group"),
    ("GDBus.Error:org.freedesktop.DBus.Error.AccessDenied: Rejected send message, 2 matched "
     "rules; type=\"method_call\"", 7, f"keyd's D-Bus policy does not let uid {os.getuid()} call "
     "Unlock"),
    ("GDBus.Error:org.keyd.Keyd1.Error.NoSuchVolume: no volume named 'nas9' (configured: tank)",
     3, "no volume named 'nas9' (configured: tank)"),
])
def test_refusals_by_keyd_or_the_bus_are_clear(run: Run, refusal: str, code: int,
                                               words: str) -> None:
    run.keyd = FakeKeyd(refuse=refusal)
    run.stdin = b"k"
    assert run("unlock", "tank", "--key-file", "-") == code
    assert words in run.err.getvalue()


def test_direct_flag_or_no_keyd_means_direct_mode(run: Run) -> None:
    # Direct mode reads the configuration (absent here); keyd never does for keydctl.
    assert run("unlock", "tank", "--direct", "--key-file", "-") == 3
    assert run.buses == [] and "configuration file does not exist" in run.err.getvalue()
    run.keyd = None
    assert run("lock", "tank") == 3
    assert run.buses == [None]


@pytest.mark.parametrize(("environ", "path"), [
    ({}, "/run/dbus/system_bus_socket"),
    ({"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/tmp/bus,guid=ab"}, "/tmp/bus"),
    ({"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/a;unix:path=/b"}, "/a"),
    ({"DBUS_SYSTEM_BUS_ADDRESS": "tcp:host=localhost,port=1"}, None),
])
def test_the_system_bus_socket_is_found_without_dbus_libraries(environ: dict[str, str],
                                                               path: str | None) -> None:
    assert system_bus_socket(environ) == path


def test_without_a_system_bus_keydctl_loads_no_dbus_library(tmp_path: Path) -> None:
    probe = ("import sys\nfrom keyd.cli.remote import connect_daemon\n"
             "print(connect_daemon(None), 'gi' in sys.modules, 'pydbus' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["None", "False", "False"]


def test_shutdown_through_keyd_reports_each_volume_and_fails_if_one_stays_open(run: Run) -> None:
    assert run.keyd is not None
    run.keyd.ends = {"tank": ("locked", ""),
                     "work": ("unlocked", "busy at shutdown, left open: 42 (sh): cwd in /w")}
    assert run("shutdown") == 1
    assert run.keyd.calls == [("PrepareShutdown", "", {})]
    assert run.out.getvalue() == "volume tank locked (through keyd)\n"
    assert run.err.getvalue() == ("keydctl: volume work left open: busy at shutdown, left "
                                  "open: 42 (sh): cwd in /w\n")
    run.keyd.ends = {"tank": ("locked", "")}
    assert run("shutdown") == 0
