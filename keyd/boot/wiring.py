"""The initramfs unlock with real programs: the daemon's trust checker and engine adapters."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from keyd.adapters.real import real_engine
from keyd.boot.unlock import (
    Found,
    ask_console,
    below_root,
    boot_record,
    load,
    passphrases,
    wait_for_stick,
    write_outputs,
)
from keyd.config.model import Volume
from keyd.daemon.adapters import TrustChecker
from keyd.daemon.workers import mapping_keys
from keyd.engine.errors import DevicesMissing, KeyRejected
from keyd.engine.service import Engine, Outcome
from keyd.runner import SubprocessRunner
from keyd.trust.settings import TrustSettings

PASSPHRASE_TRIES = 3
DEVICE_POLL = 0.5


def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Find a key, open the stack below the root, tell initramfs-tools what to mount."""
    config, volume = load(args.config)
    below, root = below_root(volume)
    runner = SubprocessRunner()
    checker = TrustChecker(runner, TrustSettings(
        signers=config.trust.signers, gnupghome=config.trust.gnupghome,
        revocations_file=config.trust.revocations, source=config.file))
    engine = real_engine(runner)
    started = time.monotonic()
    timeout = volume.policy.key_timeout if args.timeout is None else args.timeout
    found = wait_for_stick(volume, runner, checker, timeout=timeout, say=say)
    opened = _with_stick(engine, below, found, checker, say) if found is not None else None
    if found is None or opened is None:
        say("no key stick opened it: asking for the passphrase on the console")
        found, opened = _with_passphrase(engine, below, volume, args.console, say)
    device = _device(below, opened)
    say(f"volume {volume.name} unlocked; the root file system is {device}")
    write_outputs(args, volume, device, root,
                  boot_record(volume.name, found, time.monotonic() - started))
    return 0


def _with_stick(engine: Engine, below: Volume, found: Found, checker: TrustChecker,
                say: Callable[[str], None]) -> Outcome | None:
    """Open with the stick's key and record the generation it used; None if the key is wrong
    (a bundle enrolled with an old passphrase): the console is asked then."""
    try:
        outcome = _open(engine, below, found)
    except KeyRejected as exc:
        say(exc.message)
        return None
    if found.report is not None:
        checker.commit(found.report)
    return outcome


def _open(engine: Engine, below: Volume, found: Found) -> Outcome:
    keys = mapping_keys(below, found.keys, found.volume_uuid)
    # The disks may come up after the stick: wait for them as long as for RAID members.
    deadline = time.monotonic() + below.policy.member_wait
    try:
        while True:
            try:
                return engine.unlock(below, keys)
            except DevicesMissing:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(DEVICE_POLL)
    finally:
        found.keys.wipe()
        if found.report is not None:
            found.report.wipe()


def _with_passphrase(engine: Engine, below: Volume, volume: Volume, console: str,
                     say: Callable[[str], None]) -> tuple[Found, Outcome]:
    for attempt in range(1, PASSPHRASE_TRIES + 1):
        found = passphrases(volume, lambda prompt: ask_console(prompt, console))
        try:
            return found, _open(engine, below, found)
        except KeyRejected as exc:
            if attempt == PASSPHRASE_TRIES:
                raise
            say(f"{exc.message}; try again")
    raise AssertionError("unreachable")


def _device(below: Volume, outcome: Outcome) -> str:
    """The block device of the layer the root file system sits on."""
    device = outcome.devices.get(below.top, "")
    if not device.startswith("/dev/"):
        raise KeyRejected(f"layer {below.top} of volume {below.name} is open but keyd does "
                          f"not know its device ({device or 'none'})",
                          fix="report a bug; `losetup --list` shows the loop devices")
    return device
