"""keydctl install into a temporary root, the shipped examples, and keydctl wait's decision."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from keyd.cli import daemon_commands
from keyd.cli.daemon_commands import FILES, SOURCE, decide, plan_install, wait_exit
from keyd.config import parse_config
from keyd.errors import KeydError


def run_install(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    daemon_commands.register(parser.add_subparsers())
    args = parser.parse_args(["install", *argv])
    out = io.StringIO()
    args.stdout = out
    return args.func(args), out.getvalue()


INITRAMFS = ("usr/share/initramfs-tools/hooks/keyd",
             "usr/share/initramfs-tools/scripts/local-top/keyd",
             "usr/share/initramfs-tools/scripts/init-bottom/keyd")


def test_install_puts_every_file_in_its_standard_place(tmp_path: Path) -> None:
    code, out = run_install("--root", str(tmp_path), "--bindir", "/opt/keyd/bin")
    assert code == 0
    expected = {
        "usr/lib/systemd/system/keyd.service", "usr/lib/systemd/system/keyd-unlocked@.target",
        "usr/lib/systemd/system/keyd-wait@.service", "usr/lib/systemd/system/keyd-shutdown.service",
        "usr/lib/udev/rules.d/70-keyd.rules", *INITRAMFS,
        "usr/share/dbus-1/system.d/org.keyd.Keyd1.conf", "usr/lib/systemd/catalog/keyd.catalog",
        "usr/lib/tmpfiles.d/keyd.conf", "usr/lib/sysusers.d/keyd.conf",
        "etc/keyd/keyd.toml.example",
        "usr/share/doc/keyd/keyd.8.md",
        "usr/share/doc/keyd/dbus-api.md"}
    found = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert found == expected
    assert out.count("installed ") == len(expected) and "daemon-reload" not in out
    assert all((tmp_path / name).stat().st_mode & 0o777 == (0o755 if name in INITRAMFS else 0o644)
               for name in expected)


def test_units_point_at_the_installed_programs(tmp_path: Path) -> None:
    run_install("--root", str(tmp_path), "--bindir", "/opt/keyd/bin/")
    units = tmp_path / "usr/lib/systemd/system"
    assert "ExecStart=/opt/keyd/bin/keyd\n" in (units / "keyd.service").read_text()
    assert "ExecStart=/opt/keyd/bin/keydctl wait %i\n" in \
        (units / "keyd-wait@.service").read_text()
    assert "ExecStop=/opt/keyd/bin/keydctl shutdown\n" in \
        (units / "keyd-shutdown.service").read_text()
    hook = tmp_path / "usr/share/initramfs-tools/hooks/keyd"
    assert "$(/opt/keyd/bin/keydctl initramfs-hook " in hook.read_text()


def test_installing_twice_replaces_the_files(tmp_path: Path) -> None:
    run_install("--root", str(tmp_path), "--bindir", "/a")
    run_install("--root", str(tmp_path), "--bindir", "/b")
    text = (tmp_path / "usr/lib/systemd/system/keyd.service").read_text()
    assert "ExecStart=/b/keyd\n" in text and not list(tmp_path.rglob(".keyd-install-*"))


def test_a_missing_source_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeydError, match="keyd source checkout"):
        plan_install(tmp_path, tmp_path / "root", "/usr/bin")


def test_shipped_examples_parse() -> None:
    config = parse_config((SOURCE / "systemd/keyd.toml.example").read_text(), "example")
    assert [v.name for v in config.volumes] == ["tank"]
    assert config.volumes[0].policy.lock_on_removal and config.daemon.admin_group == "keyd"


def test_udev_rules_only_set_properties() -> None:
    text = (SOURCE / "udev/70-keyd.rules").read_text()
    rules = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "RUN" not in rules and "mount" not in rules and "PROGRAM" not in rules
    assert 'ENV{SYSTEMD_WANTS}+="keyd.service"' in rules and 'ENV{ID_BUS}!="usb"' in rules


def test_every_installed_source_is_listed_once() -> None:
    sources = [source for source, _, _ in FILES]
    assert len(sources) == len(set(sources))
    assert all((SOURCE / source).is_file() for source in sources)


@pytest.mark.parametrize(("state", "detail", "stop"), [
    ("unlocked", "", True), ("failed", "MEMBERS_MISSING", True),
    ("waiting-for-key", "key-timeout: dependents skip", True),
    ("waiting-for-key", "", False), ("unlocking", "", False),
    ("waiting-for-members", "", False), ("locked", "wrong key", False),
])
def test_wait_stops_when_unlocked_failed_or_timed_out(state: str, detail: str, stop: bool) -> None:
    assert decide(state, detail) is stop


@pytest.mark.parametrize(("state", "dependents", "code"), [
    ("unlocked", "skip", 0), ("unlocked", "degraded", 0),
    ("waiting-for-key", "degraded", 0), ("waiting-for-key", "skip", 1), ("failed", "skip", 1),
])
def test_wait_exit_follows_the_dependents_policy(state: str, dependents: str, code: int) -> None:
    assert wait_exit(state, dependents) == code
