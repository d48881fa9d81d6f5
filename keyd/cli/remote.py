"""keydctl unlock/lock through the running daemon (D-Bus), and the choice between it and direct mode.

When keyd owns ``org.keyd.Keyd1``, unlock and lock are requests to it: it keeps
the volume's state, starts and stops its services and writes the audit record
(naming the caller's uid). ``--direct``, or no daemon, means direct mode
(keyd.cli.volume_commands). Direct mode next to a running keyd does not race it:
both take the engine's per-volume lock file in the run directory.

The check for a daemon is cheap on purpose: without a system bus socket (or a
``--bus`` address) nothing of gi/pydbus is imported.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from keyd.cli.key_args import UsageError, parse_key_files
from keyd.engine.errors import KeyRejected
from keyd.engine.keys import read_key_file, read_limited

if TYPE_CHECKING:
    from keyd.cli.volume_commands import Environment
    from keyd.daemon.client import DaemonLink

Connector = Callable[[str | None], "DaemonLink | None"]
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
DEFAULT_TIMEOUT = 300.0
BUSY_STATES = ("locking", "unlocking")


def system_bus_socket(environ: dict[str, str]) -> str | None:
    """The system bus's socket path (DBUS_SYSTEM_BUS_ADDRESS or the default), if a unix path."""
    address = environ.get("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={SYSTEM_BUS_SOCKET}")
    for part in address.split(";")[0].removeprefix("unix:").split(","):
        if part.startswith("path="):
            return part[len("path="):]
    return None


def connect_daemon(bus: str | None) -> DaemonLink | None:
    """The running keyd on ``bus`` (default: the system bus), or None: use direct mode."""
    if bus is None:
        socket = system_bus_socket(dict(os.environ))
        if socket is not None and not Path(socket).exists():
            return None  # no system bus: no keyd either, and no gi import (keydctl's latency)
    from keyd.daemon.client import bus_at, connect, system_bus  # noqa: PLC0415 (see module doc)

    return connect(bus_at(bus) if bus else system_bus)


Keys = dict[str, bytearray]  # by key name; "" serves every name without its own


def _read(path: str, stdin: BinaryIO) -> bytearray:
    return read_limited(stdin, "the key on stdin") if path == "-" else read_key_file(path)


def _key_files(entries: list[str], volume: str, names: list[str], stdin: BinaryIO) -> Keys:
    files = parse_key_files(entries, volume, names or None)
    paths = {"": files.default} if files.default is not None else {}
    paths.update(files.by_name)
    if list(paths.values()).count("-") > 1:
        raise UsageError("stdin can carry only one key", fix="give the other keys as files")
    return _gather({name: partial(_read, path, stdin) for name, path in paths.items()})


def _passphrase(label: str, ask: Callable[[str], str], stdin: BinaryIO, tty: bool) -> bytearray:
    """The passphrase for ``label`` (VOLUME or VOLUME/NAME): asked, or one line of stdin."""
    if tty:
        return bytearray(ask(f"Passphrase for {label}: ").encode("utf-8"))
    line = stdin.readline()
    if not line:
        raise KeyRejected(f"no passphrase on stdin for volume {label}",
                          fix="pipe one line per key name, or run on a terminal")
    return bytearray(line.removesuffix(b"\n").removesuffix(b"\r"))


def _passphrases(volume: str, names: list[str], env: Environment) -> Keys:
    """One passphrase, or one per key name when the volume has several (in config order)."""
    if len(names) <= 1:
        return {"": _passphrase(volume, env.ask, env.stdin, env.stdin_is_tty)}
    return _gather({name: partial(_passphrase, f"{volume}/{name}", env.ask, env.stdin,
                                  env.stdin_is_tty) for name in names})


def _gather(reads: dict[str, Callable[[], bytearray]]) -> Keys:
    """Each key read in turn; what was read is wiped if a later one fails."""
    keys: Keys = {}
    try:
        for name, read in reads.items():
            keys[name] = read()
    except BaseException:
        wipe(keys)
        raise
    return keys


def read_keys(args: argparse.Namespace, env: Environment, names: list[str]) -> Keys:
    """The keys (or passphrases) to hand to keyd, by key name, from --key-file or --passphrase."""
    if args.passphrase:
        return _passphrases(args.volume, names, env)
    if args.key_file:
        return _key_files(args.key_file, args.volume, names, env.stdin)
    raise UsageError(f"volume {args.volume} needs a key",
                     fix="pass --key-file PATH (or - for stdin), or --passphrase")


def wipe(keys: Keys) -> None:
    """Overwrite every key read."""
    for key in keys.values():
        key[:] = bytes(len(key))


def unlock(link: DaemonLink, args: argparse.Namespace, env: Environment) -> int:
    """keydctl unlock through keyd: hand over the key, wait for the outcome, report it."""
    from keyd.daemon.client import remote_unlock  # noqa: PLC0415 (see module doc)

    info = link.get_volume(args.volume)
    names = [name for name in info.get("key_names", "").split(",") if name]
    keys = read_keys(args, env, names)
    try:
        message = remote_unlock(link, args.volume, keys, timeout=args.timeout)
    finally:
        wipe(keys)
    mountpoint = info.get("mountpoint", "")
    _say(env.stdout, f"{message}{f' at {mountpoint}' if mountpoint else ''} (through keyd)")
    return 0


def lock(link: DaemonLink, args: argparse.Namespace, env: Environment) -> int:
    """keydctl lock through keyd (it stops the volume's services first, like --force)."""
    from keyd.daemon.client import remote_lock  # noqa: PLC0415 (see module doc)

    _say(env.stdout, f"{remote_lock(link, args.volume, timeout=args.timeout)} (through keyd)")
    return 0


def shutdown(link: DaemonLink, args: argparse.Namespace, env: Environment) -> int:
    """keydctl shutdown through keyd: it locks every open volume; report each one's end."""
    left_open = 0
    for volume in link.prepare_shutdown():
        state, detail = link.wait(volume, timeout=args.timeout,
                                  done=lambda state, _detail: state not in BUSY_STATES)
        if state == "unlocked":
            left_open += 1
            print(f"keydctl: volume {volume} left open: {detail}", file=env.stderr, flush=True)
        else:
            _say(env.stdout, f"volume {volume} {state} (through keyd)")
    return 1 if left_open else 0


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)


def choose(args: argparse.Namespace, connector: Connector | None) -> DaemonLink | None:
    """keyd when it runs and --direct was not given; None for direct mode."""
    if args.direct or connector is None:
        return None
    return connector(args.bus)


def add_options(parser: argparse.ArgumentParser) -> None:
    """--direct, --bus and --timeout of unlock and lock."""
    parser.add_argument("--direct", action="store_true",
                        help="do it in this process even if keyd runs (default: ask keyd)")
    parser.add_argument("--bus", metavar="ADDRESS",
                        help="keyd's D-Bus address (default: the system bus)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"wait this long for keyd's outcome (default {DEFAULT_TIMEOUT:g})")
