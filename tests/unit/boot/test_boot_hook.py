"""keyd's initramfs hook: nothing without a root volume; otherwise a Python that starts from
the zip alone, keyd's trust, and the programs and modules of the root volume's stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from keyd.boot.hook import build, imported_modules, write_zip
from tests import configs

TRUST = configs.trust_header(["0123456789ABCDEF0123456789ABCDEF01234567"],
                             gnupghome="/nonexistent/gnupg")


def test_nothing_is_added_without_a_config_or_a_root_volume(tmp_path: Path) -> None:
    assert build(str(tmp_path / "absent.toml"), tmp_path / "dest") == []
    config = tmp_path / "keyd.toml"
    config.write_text(TRUST + configs.seed_003("/dev/sdb"))
    assert build(str(config), tmp_path / "dest") == []
    assert not (tmp_path / "dest").exists()


def test_the_zip_alone_starts_the_interpreter_and_imports_the_modules(tmp_path: Path) -> None:
    modules = imported_modules(sys.executable, ["keyd.config.parse"])
    assert "keyd.config.parse" in modules and "encodings" in modules
    home = tmp_path / "usr"
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    extensions = write_zip(modules, home / f"lib/python{version}.zip")
    assert all(path.endswith(".so") for path in extensions)
    dynload = home / f"lib/python{sys.version_info.major}.{sys.version_info.minor}"
    dynload.mkdir(parents=True)
    (dynload / "lib-dynload").symlink_to(Path(extensions[0]).parent if extensions
                                        else tmp_path)
    started = subprocess.run(
        [os.path.realpath(sys.executable), "-S", "-c",
         "import encodings, keyd.config.parse as p; print(p.__loader__.archive)"],
        env={"PYTHONHOME": str(home)}, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert started.stdout.strip() == str(home / f"lib/python{version}.zip")


def test_a_root_volume_brings_its_programs_modules_and_trust(tmp_path: Path) -> None:
    config = tmp_path / "keyd.toml"
    config.write_text(TRUST + configs.seed_003("/dev/sdb", root="/"))
    lines = build(str(config), tmp_path / "dest")
    dest = tmp_path / "dest"
    assert {"exec /usr/bin/ntfs-3g", "module dm_crypt", "module fuse", "module nls_utf8",
            "modules-dir kernel/crypto", "load loop", "exec /usr/sbin/losetup "
            "/usr/lib/keyd/bin/losetup"} <= set(lines)
    assert lines[0].startswith("exec /usr/bin/python3")
    assert (dest / str(config).lstrip("/")).read_text() == config.read_text()
    assert (dest / "var/lib/keyd").is_dir()  # where the generation used is recorded
    command = (dest / "usr/lib/keyd/initramfs-unlock").read_text()
    assert f"-m keyd.boot.unlock --config {config}" in command
