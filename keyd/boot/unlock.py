"""keyd in the initramfs: open the root volume's stack below the root file system.

Run by initramfs-tools' ``scripts/local-top/keyd`` before the root is mounted, with
the same configuration, trust rules and engine as the daemon: it waits for a key
stick (verified exactly as keyd.service verifies one: pinned signers, keyd's GnuPG
keys and trust state copied in by ``update-initramfs``), falls back to asking for the
passphrase on the console, then opens every layer of the ``boot = "root"`` volume
except its top one. initramfs-tools mounts that one as the root: this writes ROOT,
ROOTFSTYPE and ROOTFLAGS to ``/conf/param.conf``, which initramfs-tools reads after
the local-top scripts. The volume's other mounts (seed 003: the NTFS holding the
root image) are listed in ``/run/keyd/boot-mounts`` for ``scripts/init-bottom/keyd``
to move into the root; FUSE drivers run as root storage daemons (argv[0] '@') and
survive the switch to the root. What happened is kept in ``/run/keyd/boot-audit.json``
for keyd.service to write to the journal when it starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from keyd.boot.records import BOOT_AUDIT, write_records
from keyd.config.model import DEFAULT_CONFIG, Config, MountLayer, Volume
from keyd.config.parse import load_config
from keyd.daemon.uevents import StickAdded, StickInfo, translate
from keyd.errors import KeydError, user_message
from keyd.runner import Runner
from keyd.trust.report import StickReport
from keyd.trust.secret import KeySet, SecretBytes

PARAMS = "/conf/param.conf"
MOUNTS = "/run/keyd/boot-mounts"
AUDIT = f"/run/keyd/{BOOT_AUDIT}"
CONSOLE = "/dev/console"
POLL = 0.5


class NoRootVolume(KeydError):
    """keyd.toml names no ``boot = "root"`` volume (the hook then adds nothing)."""


def root_volume(config: Config) -> Volume:
    """The volume whose top layer is the root file system."""
    for volume in config.volumes:
        if volume.boot == "root":
            return volume
    raise NoRootVolume(f"{config.file} has no volume with boot = \"root\"",
                       fix='add boot = "root" to the root file system\'s volume, or remove '
                           "keyd's initramfs hook")


def below_root(volume: Volume) -> tuple[Volume, MountLayer]:
    """The volume without its top layer (what keyd opens), and that top layer (the root)."""
    root = volume.layer(volume.top)
    assert isinstance(root, MountLayer), "the config parser checks boot = \"root\" volumes"
    layers = tuple(layer for layer in volume.layers if layer.name != root.name)
    return replace(volume, layers=layers, top=root.below[0], services=()), root


def parse_udev_db(text: str) -> Iterator[dict[str, str]]:
    """Each device's properties from ``udevadm info --export-db`` (its ``E:`` lines)."""
    props: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if props:
                yield props
            props = {}
        elif line.startswith("E: ") and "=" in line:
            key, _, value = line[3:].partition("=")
            props[key] = value


def present_sticks(runner: Runner) -> list[StickInfo]:
    """The candidate key sticks udev knows now (the daemon's own rules: keyd.daemon.uevents)."""
    db = runner.run(["udevadm", "info", "--export-db"], timeout=30).stdout
    return [event.stick for props in parse_udev_db(db)
            if isinstance(event := translate("add", props), StickAdded)]


class StickChecker(Protocol):
    """What keyd.daemon.adapters.TrustChecker offers: check one stick, record its use."""

    def check(self, stick: StickInfo) -> StickReport:
        """Verify the stick's bundles."""
        ...

    def commit(self, report: StickReport) -> str | None:
        """Record the generation used."""
        ...


@dataclass
class Found:
    """A key for the root volume and where it came from (for the audit record)."""

    keys: KeySet
    source: str
    stick: StickInfo | None = None
    report: StickReport | None = None
    volume_uuid: str | None = None


def key_from_sticks(volume: str, sticks: Sequence[StickInfo], checker: StickChecker,
                    say: Callable[[str], None]) -> Found | None:
    """The first accepted key for ``volume`` on any of ``sticks``; refusals are said."""
    for stick in sticks:
        report = checker.check(stick)
        if report.reason is not None:
            say(f"stick {stick.key} refused: {report.message}")
            continue
        for verdict in report.accepted:
            if verdict.entry.volume == volume and verdict.keys is not None:
                return Found(verdict.keys, "stick", stick, report, verdict.entry.volume_uuid)
        report.wipe()  # keys for other volumes: not needed here
        say(f"stick {stick.key} has no accepted key for volume {volume}")
    return None


def wait_for_stick(volume: Volume, runner: Runner, checker: StickChecker, *,
                   timeout: float, say: Callable[[str], None],
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> Found | None:
    """Poll for key sticks until one carries a key for ``volume``, or ``timeout`` passed."""
    tried: set[StickInfo] = set()
    deadline = clock() + timeout
    say(f"waiting up to {timeout:g} s for a key stick for volume {volume.name}")
    while True:
        fresh = [stick for stick in present_sticks(runner) if stick not in tried]
        tried.update(fresh)
        found = key_from_sticks(volume.name, fresh, checker, say) if fresh else None
        if found is not None or clock() >= deadline:
            return found
        sleep(POLL)


def ask_console(prompt: str, path: str = CONSOLE) -> SecretBytes:
    """One line typed on the console, echo off (the initramfs has no agent to ask)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        try:
            saved = termios.tcgetattr(fd)
        except termios.error:  # not a terminal (a pipe in tests): read as it comes
            saved = None
        if saved is not None:  # echo off before the prompt: nothing typed is ever shown
            quiet = list(saved)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        try:
            os.write(fd, prompt.encode())
            line = _read_line(fd)
        finally:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
            os.write(fd, b"\n")
    finally:
        os.close(fd)
    return SecretBytes(line)


def _read_line(fd: int) -> bytearray:
    line = bytearray()
    while (byte := os.read(fd, 1)) not in (b"", b"\n", b"\r"):
        line += byte
    return line


def passphrases(volume: Volume, ask: Callable[[str], SecretBytes]) -> Found:
    """The passphrase of each key name of ``volume`` (one question for a single name)."""
    names = volume.key_names
    if len(names) <= 1:
        return Found(KeySet.single(ask(f"Passphrase for {volume.name}: ")), "passphrase")
    asked: dict[str | None, SecretBytes] = {
        name: ask(f"Passphrase for {volume.name}/{name}: ") for name in names}
    return Found(KeySet(asked), "passphrase")


def root_params(device: str, root: MountLayer) -> str:
    """What /conf/param.conf must say for initramfs-tools to mount ``device`` as the root."""
    lines = [f"ROOT='{device}'", f"ROOTFSTYPE='{root.fstype}'"]
    if root.options:
        lines.append(f"ROOTFLAGS='-o {','.join(root.options)}'")
    return "".join(line + "\n" for line in lines)


def boot_record(volume: str, found: Found, seconds: float) -> dict[str, str]:
    """The audit record of the boot-time unlock, for keyd.service to journal."""
    record = {"event": "unlock-finished", "volume": volume, "result": "unlocked",
              "message": f"unlocked in the initramfs with a key from {found.source}",
              "reason": "initramfs", "duration_ms": str(round(seconds * 1000))}
    if found.stick is not None:
        record["serial"] = found.stick.key
    if found.report is not None and found.report.signer:
        record["signer"] = found.report.signer
    return record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line scripts/local-top/keyd uses (paths changeable for tests)."""
    parser = argparse.ArgumentParser(prog="keyd-initramfs")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--params", default=PARAMS)
    parser.add_argument("--mounts", default=MOUNTS)
    parser.add_argument("--audit", default=AUDIT)
    parser.add_argument("--console", default=CONSOLE)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for a stick (default: the volume's key_timeout)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Unlock the root volume; 0 when initramfs-tools can mount the root."""
    from keyd.boot.wiring import run  # noqa: PLC0415 (the adapters, only when run for real)

    args = parse_args(argv)
    try:
        return run(args, lambda text: print(f"keyd: {text}", file=sys.stderr, flush=True))
    except KeydError as exc:
        print(f"keyd: {user_message(exc)}", file=sys.stderr, flush=True)
        return 1


def write_outputs(args: argparse.Namespace, volume: Volume, device: str, root: MountLayer,
                  record: dict[str, str]) -> None:
    """param.conf for initramfs-tools, the mounts to move, the audit record."""
    with open(args.params, "a", encoding="utf-8") as params:
        params.write(root_params(device, root))
    mounts = [layer.mountpoint for layer in volume.layers
              if isinstance(layer, MountLayer) and layer is not root]
    Path(args.mounts).parent.mkdir(parents=True, exist_ok=True)
    Path(args.mounts).write_text("".join(f"{point}\n" for point in mounts))
    write_records(Path(args.audit), [record])


def load(path: str) -> tuple[Config, Volume]:
    """The configuration and its root volume."""
    config = load_config(path)
    return config, root_volume(config)


if __name__ == "__main__":
    sys.exit(main())
