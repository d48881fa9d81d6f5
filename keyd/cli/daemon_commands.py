"""keydctl verbs around the daemon: ``install`` (units, rules, policy, catalog) and ``wait``.

``install`` copies the files from the source tree to their standard places
under ``--root`` (``/`` by default), pointing the units at the installed keyd;
with the real root it then reloads systemd, udev and the journal catalog.
``wait`` is what keyd-wait@.service runs at boot: it returns once the volume is
unlocked, or once keyd gave up waiting for its key (0 if its dependents may
start degraded, 1 if they are to be skipped).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from keyd.daemon.client import DaemonError, bus_at, connect, system_bus
from keyd.errors import KeydError, ProgramError
from keyd.runner import Runner, SubprocessRunner

SOURCE = Path(__file__).resolve().parents[2]
_UNIT_DIR = "usr/lib/systemd/system"
# (file in the source tree, destination below the root, rewrite program paths?)
FILES: tuple[tuple[str, str, bool], ...] = (
    ("systemd/keyd.service", f"{_UNIT_DIR}/keyd.service", True),
    ("systemd/keyd-unlocked@.target", f"{_UNIT_DIR}/keyd-unlocked@.target", False),
    ("systemd/keyd-wait@.service", f"{_UNIT_DIR}/keyd-wait@.service", True),
    ("systemd/keyd-shutdown.service", f"{_UNIT_DIR}/keyd-shutdown.service", True),
    ("udev/70-keyd.rules", "usr/lib/udev/rules.d/70-keyd.rules", False),
    ("initramfs-tools/hooks/keyd", "usr/share/initramfs-tools/hooks/keyd", True),
    ("initramfs-tools/scripts/local-top/keyd",
     "usr/share/initramfs-tools/scripts/local-top/keyd", False),
    ("initramfs-tools/scripts/init-bottom/keyd",
     "usr/share/initramfs-tools/scripts/init-bottom/keyd", False),
    ("systemd/org.keyd.Keyd1.conf", "usr/share/dbus-1/system.d/org.keyd.Keyd1.conf", False),
    ("systemd/keyd.catalog", "usr/lib/systemd/catalog/keyd.catalog", False),
    ("systemd/tmpfiles.d/keyd.conf", "usr/lib/tmpfiles.d/keyd.conf", False),
    ("systemd/sysusers.d/keyd.conf", "usr/lib/sysusers.d/keyd.conf", False),
    ("systemd/keyd.toml.example", "etc/keyd/keyd.toml.example", False),
    ("docs/keyd.8.md", "usr/share/doc/keyd/keyd.8.md", False),
    ("docs/dbus-api.md", "usr/share/doc/keyd/dbus-api.md", False),
)
# The keyd group first, then dbus re-reads its policy: it read the new file (inotify) before
# the group existed, and would ignore the group's rule until its next reload.
RELOADS = (("systemd-sysusers", "/usr/lib/sysusers.d/keyd.conf"),
           ("systemctl", "daemon-reload"), ("udevadm", "control", "--reload"),
           ("journalctl", "--update-catalog"),
           ("systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/keyd.conf"),
           ("systemctl", "reload", "dbus.service"))
_PROGRAM = re.compile(r"/usr/s?bin/(keydctl|keyd)\b")


@dataclass(frozen=True)
class Item:
    """One file to install: where it comes from, where it goes, its final text."""

    source: Path
    destination: Path
    text: str


def plan_install(source: Path, root: Path, bindir: str) -> list[Item]:
    """The files to write (reads the sources; writes nothing)."""
    items = []
    for relative, destination, rewrite in FILES:
        path = source / relative
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeydError(f"cannot read {path}: {exc.strerror}",
                            fix="run keydctl install from a keyd source checkout") from None
        if rewrite:
            text = _PROGRAM.sub(lambda m: f"{bindir.rstrip('/')}/{m.group(1)}", text)
        items.append(Item(path, root / destination, text))
    return items


def write_atomically(item: Item) -> None:
    """Write one file (0644, or 0755 if its source is executable: initramfs-tools' hooks and
    scripts) via a temporary file and rename, creating directories."""
    item.destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=item.destination.parent, prefix=".keyd-install-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(item.text)
        os.chmod(temp, 0o755 if os.access(item.source, os.X_OK) else 0o644)
        os.replace(temp, item.destination)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def reload_system(runner: Runner, out: TextIO) -> None:
    """Tell systemd, udev and journald about the new files; failures are warnings."""
    for argv in RELOADS:
        try:
            runner.run(list(argv), timeout=60)
        except ProgramError as exc:
            print(f"keydctl: warning: {' '.join(argv)}: {exc.message}", file=out)


def default_bindir() -> str:
    """Where the keyd and keydctl programs of this installation are."""
    here = Path(sys.executable).parent
    return str(here) if (here / "keyd").exists() else "/usr/bin"


def _install(args: argparse.Namespace) -> int:
    out: TextIO = args.stdout or sys.stdout
    root = Path(args.root)
    items = plan_install(Path(args.source), root, args.bindir or default_bindir())
    for item in items:
        write_atomically(item)
        print(f"installed {item.destination}", file=out)
    if root.resolve() == Path("/") and not args.no_reload:
        reload_system(args.runner or SubprocessRunner(), out)
        print("next: systemctl enable --now keyd.service", file=out)
    return 0


def decide(state: str, detail: str) -> bool:
    """Whether ``keydctl wait`` may stop: unlocked, failed, or the key timeout passed."""
    return state in ("unlocked", "failed") or detail.startswith("key-timeout")


def wait_exit(state: str, dependents: str) -> int:
    """0: dependents may start (unlocked, or degraded allowed); 1: skip them."""
    if state == "unlocked":
        return 0
    return 0 if dependents == "degraded" else 1


def _wait(args: argparse.Namespace) -> int:
    out: TextIO = args.stdout or sys.stdout
    client = connect(bus_at(args.bus) if args.bus else system_bus)
    if client is None:
        raise DaemonError("keyd is not running", fix="systemctl start keyd.service")
    state, detail = client.wait(args.volume, timeout=args.timeout, done=decide)
    dependents = client.get_volume(args.volume).get("dependents", "skip")
    code = wait_exit(state, dependents)
    verdict = "unlocked" if state == "unlocked" else \
        f"{state} ({detail or 'no key'}): dependents {'start degraded' if code == 0 else 'skipped'}"
    print(f"volume {args.volume}: {verdict}", file=out)
    return code


def register(subparsers: Any) -> None:
    """Add ``install`` and ``wait`` to keydctl."""
    install = subparsers.add_parser(
        "install", help="install keyd's units, udev rules, D-Bus policy and catalog",
        description="Copy keyd.service, keyd-shutdown.service, keyd-unlocked@.target, "
                    "keyd-wait@.service, the udev "
                    "rules, the D-Bus policy, the journal catalog, tmpfiles.d, sysusers.d (the "
                    "keyd group) and example configuration to their standard places under ROOT.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    install.add_argument("--root", default="/", metavar="DESTDIR",
                         help="install below DESTDIR (packaging); no reloads unless it is /")
    install.add_argument("--bindir", metavar="DIR",
                         help="where keyd and keydctl are (default: next to this Python)")
    install.add_argument("--source", default=str(SOURCE), metavar="DIR",
                         help=argparse.SUPPRESS)
    install.add_argument("--no-reload", action="store_true",
                         help="do not reload systemd, udev and the catalog")
    install.set_defaults(func=_install, stdout=None, runner=None)
    wait = subparsers.add_parser(
        "wait", help="wait until keyd unlocked VOLUME (used by keyd-wait@.service)",
        description="Exit 0 once VOLUME is unlocked, or once keyd gave up waiting for its key "
                    "and its dependents may start degraded; exit 1 if they are to be skipped.")
    wait.add_argument("volume", metavar="VOLUME")
    wait.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS")
    wait.add_argument("--bus", metavar="ADDRESS", help=argparse.SUPPRESS)
    wait.set_defaults(func=_wait, stdout=None)

