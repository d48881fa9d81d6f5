"""A headless boot with the key stick in: keyd (enabled at boot) unlocks before the dependent starts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from keyd.audit.ids import EVENT_BY_ID
from keyd_lab.build import Artifacts, new_run_dir
from keyd_lab.daemon_setup import (
    Signer,
    config_toml,
    installed_root,
    journal_text,
    make_stick,
    volume_key,
)
from keyd_lab.media import StickSpec, create_disk
from keyd_lab.vm import Lab, LabOptions

VOLUME = "delta"
LUKS_UUID = "5f1a2b3c-0000-4000-8000-00000000d001"
DEPENDENT = "keyd-boot-dependent.service"
DEPENDENT_UNIT = f"""[Unit]
Description=keyd lab: needs volume {VOLUME} at boot
Requires=keyd-unlocked@{VOLUME}.target
After=keyd-unlocked@{VOLUME}.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'test -b /dev/mapper/keyd-{VOLUME}-crypt && echo open > /run/dependent.out'
[Install]
WantedBy=keyd-lab.target
"""


def luks_disk(path: Path, key: bytes) -> Path:
    """A LUKS2 container formatted on the host (no mapping needed to format a file)."""
    create_disk(path, 32)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                    "pbkdf2", "--pbkdf-force-iterations", "1000", "--uuid", LUKS_UUID,
                    "--key-file=-", str(path)], input=key, check=True, capture_output=True)
    return path


def keyd_toml(signer: Signer) -> str:
    return config_toml(signer, f'\n[volume.{VOLUME}]\nkey_timeout = 600\n'
                       f'[volume.{VOLUME}.layer.crypt]\nkind = "crypt"\ntype = "luks"\n'
                       f'device = "UUID={LUKS_UUID}"\n')


def monotonic_us(lab: Lab, unit: str, prop: str) -> int:
    return int(lab.check(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip())


def test_boot_with_the_stick_in_unlocks_before_the_dependent_service_starts(
        lab_artifacts: Artifacts, tmp_path: Path, signer: Signer) -> None:
    key = volume_key(VOLUME)
    disk = StickSpec(luks_disk(tmp_path / "nas-disk.img", key), "NASDISK01", product="NAS Disk")
    stick = make_stick(tmp_path, signer, "KEYDBOOTK", {VOLUME: key})
    run_dir = new_run_dir("daemon-boot")
    options = LabOptions(sticks_at_boot=[stick, disk], extra_root=installed_root(
        tmp_path, signer, keyd_toml(signer), {DEPENDENT: DEPENDENT_UNIT}),
                         boot_timeout=600)
    lab = Lab.boot(lab_artifacts.kernel, lab_artifacts.initramfs, run_dir, options)
    try:
        print(f"\nboot with keyd enabled took {lab.boot_seconds:.1f} s")
        assert lab.run(["systemctl", "is-active", DEPENDENT]).stdout.strip() == "active", \
            journal_text(lab, "keyd.service") + journal_text(lab, DEPENDENT)
        assert lab.check(["cat", "/run/dependent.out"]).stdout == "open\n"
        out = lab.check(["journalctl", "-b", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=keyd"],
                        timeout=120).stdout
        records = [e for e in map(json.loads, out.splitlines()) if e.get("MESSAGE_ID") in EVENT_BY_ID]
        finished = [int(e["__MONOTONIC_TIMESTAMP"]) for e in records
                    if e.get("KEYD_EVENT") == "unlock-finished" and e.get("KEYD_VOLUME") == VOLUME]
        assert len(finished) == 1, [e.get("KEYD_EVENT") for e in records]
        dependent_started = monotonic_us(lab, DEPENDENT, "ExecMainStartTimestampMonotonic")
        ready = monotonic_us(lab, "keyd.service", "ActiveEnterTimestampMonotonic")
        started = monotonic_us(lab, "keyd.service", "ExecMainStartTimestampMonotonic")
        print(f"keyd start -> READY {(ready - started) / 1000:.0f} ms (coldplug: key stick + "
              f"unlock); unlock finished {(dependent_started - finished[0]) / 1000:.0f} ms before "
              "the dependent started")
        assert finished[0] < dependent_started
        assert ready >= finished[0]  # READY=1 only after the coldplug unlock
        assert lab.run(["systemctl", "is-active", f"keyd-unlocked@{VOLUME}.target"]).stdout.strip() \
            == "active"
    finally:
        lab.collect()  # the journal stays in run_dir when the test failed
        lab.close()
    shutil.rmtree(run_dir, ignore_errors=True)
