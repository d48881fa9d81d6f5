"""The daemon's production adapters with scripted programs and a fake bus."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyd.daemon.adapters import AskPassword, SystemctlUnits, SystemdUnits, TrustChecker
from keyd.daemon.uevents import StickInfo
from keyd.errors import KeydError
from keyd.trust.errors import Reason
from keyd.trust.settings import TrustSettings
from tests.support.scripted_runner import Reply, ScriptedRunner

SIGNER = "0123456789ABCDEF0123456789ABCDEF01234567"


def test_ask_password_uses_an_id_a_timeout_and_agents_only() -> None:
    runner = ScriptedRunner().on("systemd-ask-password", reply=Reply(stdout="hunter2"))
    keys = AskPassword(runner).ask("tank", ["crypt0"], 120)
    secret = keys.get("crypt0") if keys else None
    assert secret is not None and bytes(secret.buffer) == b"hunter2"
    [call] = runner.calls
    assert call.argv[:6] == ("systemd-ask-password", "--id=keyd:tank", "--timeout=120",
                             "--icon=drive-harddisk", "--no-tty", "-n")
    assert call.timeout > 120


def test_a_volume_with_two_key_names_is_asked_once_per_name() -> None:
    ask = "systemd-ask-password"
    runner = ScriptedRunner().on(ask, "--id=keyd:secret:k1", reply=Reply(stdout="one")) \
        .on(ask, "--id=keyd:secret:k2", reply=Reply(stdout="two"))
    keys = AskPassword(runner).ask("secret", ["k1", "k2"], 120)
    assert keys is not None and keys.names == {"k1", "k2"}
    assert [bytes(s.buffer) for name in ("k1", "k2") if (s := keys.get(name))] == [b"one", b"two"]
    assert [call.argv[1] for call in runner.calls] == ["--id=keyd:secret:k1",
                                                       "--id=keyd:secret:k2"]
    assert runner.calls[1].argv[-1] == "Passphrase for keyd volume secret, key k2:"


def test_an_unanswered_prompt_is_none() -> None:
    runner = ScriptedRunner().on("systemd-ask-password", reply=Reply(returncode=1))
    assert AskPassword(runner).ask("tank", ["crypt0"], 5) is None
    runner = ScriptedRunner().on("systemd-ask-password", "--id=keyd:secret:k1",
                                 reply=Reply(stdout="one")) \
        .on("systemd-ask-password", reply=Reply(returncode=1))
    assert AskPassword(runner).ask("secret", ["k1", "k2"], 5) is None


def test_systemctl_units_never_block() -> None:
    runner = ScriptedRunner()
    units = SystemctlUnits(runner)
    units.start("keyd-unlocked@tank.target")
    units.stop("smbd.service")
    assert runner.argvs() == [
        ("systemctl", "start", "--no-block", "--", "keyd-unlocked@tank.target"),
        ("systemctl", "stop", "--no-block", "--", "smbd.service")]


@dataclass
class FakeManager:
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    refuse: bool = False

    def StartUnit(self, unit: str, mode: str) -> str:
        return self._call("StartUnit", unit, mode)

    def StopUnit(self, unit: str, mode: str) -> str:
        return self._call("StopUnit", unit, mode)

    def _call(self, method: str, unit: str, mode: str) -> str:
        self.calls.append((method, unit, mode))
        if self.refuse:
            raise RuntimeError(f"Unit {unit} not found.")
        return "/org/freedesktop/systemd1/job/1"


@dataclass
class FakeBus:
    manager: FakeManager
    looked_up: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str, path: str) -> FakeManager:
        self.looked_up.append((name, path))
        return self.manager


def test_systemd_units_go_through_the_manager_with_mode_replace() -> None:
    bus = FakeBus(FakeManager())
    units = SystemdUnits(bus)
    assert bus.looked_up == []  # looked up on first use: systemd may not be on the bus yet
    units.start("keyd-unlocked@tank.target")
    units.stop("smbd.service")
    assert bus.manager.calls == [("StartUnit", "keyd-unlocked@tank.target", "replace"),
                                 ("StopUnit", "smbd.service", "replace")]
    assert bus.looked_up == [("org.freedesktop.systemd1", "/org/freedesktop/systemd1")]


def test_a_refused_unit_is_a_keyd_error_naming_it() -> None:
    units = SystemdUnits(FakeBus(FakeManager(refuse=True)))
    with pytest.raises(KeydError, match=r"StartUnit nope\.service") as caught:
        units.start("nope.service")
    assert "systemctl status nope.service" in (caught.value.fix or "")


STICK = StickInfo("/dev/sdc1", "vfat", "S1", "1234-ABCD")


def settings(tmp_path: Path, signers: tuple[str, ...] = (SIGNER,)) -> TrustSettings:
    return TrustSettings(signers=signers, gnupghome=str(tmp_path / "gnupg"),
                         state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                         revocations_file=str(tmp_path / "revoked.toml"))


def test_without_pinned_signers_nothing_is_mounted_or_trusted(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    report = TrustChecker(runner, settings(tmp_path, ())).check(STICK)
    assert report.accepted == () and runner.calls == []


def test_a_stick_that_does_not_mount_is_a_refusal_report(tmp_path: Path) -> None:
    runner = ScriptedRunner().on("mount", reply=Reply(returncode=32, stderr="wrong fs type"))
    report = TrustChecker(runner, settings(tmp_path)).check(STICK)
    assert report.reason is Reason.MOUNT_FAILED
    assert runner.argvs("mount")[0][:5] == ("mount", "-t", "vfat", "-o",
                                            "ro,nosuid,nodev,noexec,noatime")


def test_an_unsupported_filesystem_is_refused_before_mounting(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    stick = StickInfo("/dev/sdc1", "ext2", "S1")
    assert TrustChecker(runner, settings(tmp_path)).check(stick).reason is \
        Reason.UNSUPPORTED_FILESYSTEM
    assert runner.calls == []
