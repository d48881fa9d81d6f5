"""keyd's part of ``update-initramfs``: what the initramfs needs to unlock the root volume.

Called by /usr/share/initramfs-tools/hooks/keyd (through ``keydctl initramfs-hook``).
Without a ``boot = "root"`` volume it adds nothing. Otherwise it writes into the
image, itself:

- ``/usr/lib/python3XY.zip``: the Python modules the unlock imports, found by
  importing them in a fresh interpreter and compiled (the interpreter finds its
  standard library there at start-up: nothing else of /usr/lib/python3 is copied);
- keyd.toml, keyd's GnuPG home, its revocation list and trust state (the same
  trust as the daemon's, as of this update-initramfs: re-run it after changing them);
- ``/usr/lib/keyd/initramfs-unlock``, the command scripts/local-top/keyd runs;

and prints, one per line, what the shell hook adds with initramfs-tools' own
functions (programs with their libraries, kernel modules): ``exec PATH [TARGET]``,
``module NAME``, ``modules-dir DIR``, ``load NAME`` (a module loaded at boot).
"""

from __future__ import annotations

import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from keyd.boot.unlock import NoRootVolume, root_volume
from keyd.config.model import Config, Volume
from keyd.config.parse import load_config
from keyd.engine import doctor
from keyd.errors import ProgramMissing
from keyd.programs import PROGRAMS as PROGRAMS_BY_NAME
from keyd.trust.settings import DEFAULT_STATE_DIR

# What the unlock in the initramfs imports, the trust pipeline's lazy imports included.
ENTRY_MODULES = ("keyd.boot.unlock", "keyd.boot.wiring", "keyd.trust.gpg",
                 "keyd.trust.stick_mount", "keyd.trust.verify", "keyd.trust.manifest",
                 # Codecs are imported by name when first used (python-gnupg: latin-1).
                 "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
                 "encodings.utf_8_sig", "encodings.idna", "encodings.cp437",
                 "encodings.unicode_escape", "encodings.raw_unicode_escape")
UNLOCK_COMMAND = "usr/lib/keyd/initramfs-unlock"
PROGRAMS = ("gpg", "gpg-agent", "udevadm")
# busybox's applets of these names are in the image first (and initramfs-tools never copies
# over a file), but lack options keyd uses: keyd's copies go to a directory of its own.
SHADOWED = ("mount", "umount", "losetup", "sync")
OWN_BIN = "/usr/lib/keyd/bin"
# The stick's vfat needs the kernel's default codepage and iocharset (cp437, ascii).
MODULES = ("dm_crypt", "loop", "fuse", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1",
           "nls_utf8", "ext4", "usb_storage", "uas", "sd_mod", "xhci_pci", "ehci_pci")
MODULE_DIRS = ("kernel/crypto", "kernel/arch/x86/crypto")
# Loaded at boot: nothing else would (their device nodes appear only once they are loaded).
LOADED = ("loop", "fuse", "dm_mod", "dm_crypt")
_COLLECT = ("import importlib, json, sys\n"
            "for name in sys.argv[1:]: importlib.import_module(name)\n"
            "print(json.dumps({n: [getattr(m, '__file__', None), hasattr(m, '__path__')]\n"
            "                  for n, m in list(sys.modules.items())}))\n")


def imported_modules(python: str, entries: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """name -> (file, is a package) of every module a fresh ``python`` has after importing
    ``entries`` (built-in modules, which have no file, are left out)."""
    out = subprocess.run([python, "-c", _COLLECT, *entries], check=True, capture_output=True,
                         text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}).stdout
    found = json.loads(out)
    return {name: (path, package) for name, (path, package) in found.items() if path}


def write_zip(modules: dict[str, tuple[str, bool]], target: Path) -> list[str]:
    """Compile the pure-Python modules into ``target``; return the extension modules' files."""
    extensions = []
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, \
            zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, (path, package) in sorted(modules.items()):
            if not path.endswith(".py"):
                extensions.append(path)
                continue
            compiled = os.path.join(scratch, "m.pyc")
            py_compile.compile(path, cfile=compiled, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            arcname = name.replace(".", "/") + ("/__init__.pyc" if package else ".pyc")
            archive.write(compiled, arcname)
        # Namespace packages (keyd.engine has no __init__.py) have no file to copy;
        # zipimport needs one.
        for parent in _parents(modules) - {n for n, (p, pkg) in modules.items() if pkg}:
            archive.writestr(parent.replace(".", "/") + "/__init__.py", "")
    return extensions


def _parents(modules: Iterable[str]) -> set[str]:
    return {name.rsplit(".", i)[0] for name in modules for i in range(1, name.count(".") + 1)}


def programs(volume: Volume) -> list[str]:
    """What keyd runs in the initramfs: the stack's programs (as keydctl doctor lists them),
    gpg for the bundles and udevadm for the sticks."""
    return list(dict.fromkeys([*doctor.needed_programs(_alone(volume)), *PROGRAMS, *SHADOWED]))


def modules(volume: Volume) -> list[str]:
    """Kernel modules: the stack's (as keydctl doctor lists them) and the stick's (MODULES)."""
    return list(dict.fromkeys([*MODULES, *doctor.needed_modules(_alone(volume))]))


def _alone(volume: Volume) -> Config:
    return Config(file="", volumes=(volume,))


def copy_trust(config: Config, destdir: Path) -> None:
    """keyd.toml, the GnuPG home (no sockets), revocations and trust state, same paths."""
    _copy(Path(config.file), destdir)
    for path in files_under(Path(config.trust.gnupghome)):
        _copy(path, destdir)
    for path in (Path(config.trust.revocations), *files_under(Path(DEFAULT_STATE_DIR))):
        if path.is_file():
            _copy(path, destdir)
    # keyd refuses a stick unless it can record the generation used (fail closed).
    (destdir / DEFAULT_STATE_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True, mode=0o700)


def files_under(directory: Path) -> list[Path]:
    """The files below ``directory`` (none if it is missing), without gpg-agent's sockets."""
    if not directory.is_dir():
        return []
    return [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("S.")]


def _copy(path: Path, destdir: Path) -> None:
    target = destdir / str(path.resolve()).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(path, target)


def unlock_command(python: str, config: str) -> str:
    """The script that runs the unlock with the copied interpreter and modules only."""
    return ("#!/bin/sh\n# Written by keyd's initramfs hook.\n"
            f"PATH={OWN_BIN}:/usr/sbin:/usr/bin:/sbin:/bin PYTHONHOME=/usr "
            "PYTHONDONTWRITEBYTECODE=1 "
            f'exec {python} -S -m keyd.boot.unlock --config {config} "$@"\n')


def build(config_path: str, destdir: Path) -> list[str]:
    """Write keyd's files into ``destdir``; the lines for the shell hook (none: no root
    volume, nothing added)."""
    if not Path(config_path).exists():  # keyd is not configured (yet): nothing to add
        return []
    try:
        config = load_config(config_path)
        volume = root_volume(config)
    except NoRootVolume:
        return []
    python = os.path.realpath(sys.executable)
    imported = imported_modules(sys.executable, ENTRY_MODULES)
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    extensions = write_zip(imported, destdir / f"usr/lib/python{version}.zip")
    copy_trust(config, destdir)
    command = destdir / UNLOCK_COMMAND
    command.parent.mkdir(parents=True, exist_ok=True)
    command.write_text(unlock_command(python, str(Path(config.file).resolve())))
    command.chmod(0o755)
    return ([f"exec {python}"] + [f"exec {path}" for path in extensions]
            + [f"exec {_which(name)}" + (f" {OWN_BIN}/{name}" if name in SHADOWED else "")
               for name in programs(volume)]
            + [f"module {name}" for name in modules(volume)]
            + [f"modules-dir {name}" for name in MODULE_DIRS]
            + [f"load {name}" for name in LOADED])


def _which(name: str) -> str:
    path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise ProgramMissing(name, PROGRAMS_BY_NAME[name].package
                             if name in PROGRAMS_BY_NAME else "the package providing it")
    return path
