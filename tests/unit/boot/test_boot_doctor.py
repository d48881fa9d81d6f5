"""keydctl doctor on the boot set-up: hook, initramfs against keyd.toml and trust, the stack."""

from __future__ import annotations

import os
from pathlib import Path

from keyd.boot.doctor import HOOK, check_boot
from keyd.config.parse import parse_config
from keyd.engine.status import VolumeReport
from tests import configs

RELEASE = "6.1.0-57-amd64"


def config_in(root: Path, *, boot_root: bool = True) -> object:
    home = root / "etc/keyd/gnupg"
    home.mkdir(parents=True)
    (home / "pubring.kbx").write_bytes(b"keys")
    text = configs.trust_header(["0123456789ABCDEF0123456789ABCDEF01234567"],
                                gnupghome="/etc/keyd/gnupg")
    text += configs.seed_003("/dev/sdb", root="/" if boot_root else "/srv/debian")
    path = root / "etc/keyd/keyd.toml"
    path.write_text(text)
    return parse_config(text, str(path))


def test_no_root_volume_no_boot_checks(tmp_path: Path) -> None:
    assert check_boot(config_in(tmp_path, boot_root=False), tmp_path, RELEASE, {}) == []  # type: ignore[arg-type]


def test_hook_initramfs_age_and_stack(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    [missing] = check_boot(config, tmp_path, RELEASE, {})  # type: ignore[arg-type]
    assert missing.status == "fail" and "initramfs hook" in missing.text
    (tmp_path / HOOK).parent.mkdir(parents=True)
    (tmp_path / HOOK).write_text("#!/bin/sh\n")
    image = tmp_path / "boot" / f"initrd.img-{RELEASE}"
    image.parent.mkdir()
    image.write_bytes(b"old")
    os.utime(image, (1, 1))  # older than keyd.toml and the keyring
    opened = {"work": VolumeReport("work", "unlocked", (), ())}
    stale, stack = check_boot(config, tmp_path, RELEASE, opened)  # type: ignore[arg-type]
    assert stale.status == "fail" and stale.fix == "update-initramfs -u"
    assert "keyd.toml" in stale.text and "pubring.kbx" in stale.text
    assert stack.status == "ok"
    os.utime(image)  # rebuilt now
    fresh, other = check_boot(config, tmp_path, RELEASE,  # type: ignore[arg-type]
                              {"work": VolumeReport("work", "locked", (), ())})
    assert fresh.status == "ok" and other.status == "warn" and "did not boot from it" in other.text
