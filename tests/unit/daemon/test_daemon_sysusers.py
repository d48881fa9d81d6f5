"""The keyd group: declared for systemd-sysusers, named by the D-Bus policy, created by install."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from keyd.cli.daemon_commands import SOURCE, reload_system
from keyd.config import parse_config
from tests.support.scripted_runner import Reply, ScriptedRunner


def sysusers_groups() -> set[str]:
    """Groups the shipped sysusers.d file creates (``g NAME ...`` lines)."""
    text = (SOURCE / "systemd/sysusers.d/keyd.conf").read_text()
    return {m.group(1) for m in re.finditer(r"^g\s+(\S+)", text, re.MULTILINE)}


def test_the_d_bus_policy_names_only_groups_that_sysusers_creates() -> None:
    policy = ET.parse(SOURCE / "systemd/org.keyd.Keyd1.conf").getroot()
    named = {p.get("group") for p in policy.iter("policy") if p.get("group")}
    assert named and named <= sysusers_groups()


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_systemd_sysusers_creates_the_group_from_the_shipped_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(SOURCE / "systemd/sysusers.d/keyd.conf")], check=True, capture_output=True)
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert [line.split(":")[0] for line in groups] == sorted(sysusers_groups())


def test_the_example_admin_group_is_the_created_group() -> None:
    config = parse_config((SOURCE / "systemd/keyd.toml.example").read_text(), "example")
    assert config.daemon.admin_group in sysusers_groups()


def test_install_creates_the_group_before_dbus_rereads_its_policy() -> None:
    runner = ScriptedRunner()
    reload_system(runner, io.StringIO())
    argvs = runner.argvs()
    sysusers = argvs.index(("systemd-sysusers", "/usr/lib/sysusers.d/keyd.conf"))
    assert sysusers < argvs.index(("systemctl", "reload", "dbus.service"))


def test_a_failed_group_creation_is_only_a_warning() -> None:
    runner = ScriptedRunner().on("systemd-sysusers", reply=Reply(returncode=1, stderr="no"))
    out = io.StringIO()
    reload_system(runner, out)
    assert "warning: systemd-sysusers" in out.getvalue()
    assert ("systemctl", "daemon-reload") in runner.argvs()
