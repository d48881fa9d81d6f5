"""keydctl's volume commands: unlock, lock, status, doctor, check-config.

unlock and lock go through keyd when it runs (keyd.cli.remote), else (and with
``--direct``) they run here in direct mode; status, doctor and check-config
always read the kernel and the configuration directly.

Handlers take their I/O from an :class:`Environment` (real programs by
default; unit tests put a fake one in ``args.environment``). Errors are
KeydErrors; keyd.cli.main turns them into messages and exit codes.

The adapters, executor and doctor are imported inside the handlers that use
them, so ``keydctl status`` loads only config, observation and reporting
(about a third less import time; its latency is one of issue 4's bars).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from keyd.cli import remote
from keyd.cli.key_args import UsageError, parse_key_files
from keyd.config.model import DEFAULT_CONFIG, Config, MountLayer, Volume
from keyd.config.parse import load_config
from keyd.daemon_view import read_view
from keyd.engine.errors import KeyRejected, VolumeBusy
from keyd.engine.lockfile import DEFAULT_RUN_DIR
from keyd.engine.status import render_table, to_json
from keyd.errors import ConfigError, KeydError
from keyd.trust.settings import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from keyd.engine.keys import FileKeys, PromptKeys
    from keyd.engine.observe import Observer
    from keyd.engine.ports import HolderPort, ServicePort, Storage
    from keyd.engine.service import Engine
    from keyd.runner import Runner

@dataclass
class Environment:
    """Everything the commands touch outside the process."""

    runner: Runner
    observer: Observer
    storage: Storage
    holders: HolderPort
    services: ServicePort
    stdin: BinaryIO
    stdout: TextIO
    stderr: TextIO
    stdin_is_tty: bool
    ask: Callable[[str], str] = getpass.getpass
    sleep: Callable[[float], None] | None = field(default=None)
    root: Path = Path("/")
    daemon: remote.Connector | None = None  # how to reach keyd; None: never (direct mode)


def real_environment() -> Environment:
    """The production environment: real programs, /proc and /sys."""
    from keyd.adapters.real import real_storage  # noqa: PLC0415 (see module doc)
    from keyd.adapters.system import ProcHolders, Systemctl  # noqa: PLC0415
    from keyd.engine.observe import KernelObserver  # noqa: PLC0415
    from keyd.runner import SubprocessRunner  # noqa: PLC0415

    runner = SubprocessRunner()
    return Environment(runner, KernelObserver(runner), real_storage(runner), ProcHolders(),
                       Systemctl(runner),
                       sys.stdin.buffer, sys.stdout, sys.stderr, sys.stdin.isatty(),
                       daemon=remote.connect_daemon)


class StderrProgress:
    """Progress of slow steps on stderr."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def started(self, text: str) -> None:
        """Announce a slow step."""
        print(f"keydctl: {text} ...", file=self.stream, flush=True)

    def finished(self, text: str, seconds: float) -> None:
        """Report how long it took."""
        print(f"keydctl: {text}: done ({seconds:.1f} s)", file=self.stream, flush=True)


def _env(args: argparse.Namespace) -> Environment:
    env: Environment | None = getattr(args, "environment", None)
    return env if env is not None else real_environment()


def _engine(env: Environment, args: argparse.Namespace) -> Engine:
    from keyd.engine.service import Engine  # noqa: PLC0415 (see module doc)

    engine = Engine(env.observer, env.storage, env.holders, env.services,
                    run_dir=args.run_dir, lock_timeout=getattr(args, "wait", 30.0),
                    progress=StderrProgress(env.stderr))
    if env.sleep is not None:
        engine.sleep = env.sleep
    return engine


def _key_source(args: argparse.Namespace, env: Environment,
                volume: Volume) -> FileKeys | PromptKeys:
    from keyd.engine.keys import FileKeys, PromptKeys, open_binary  # noqa: PLC0415 (see module doc)
    from keyd.engine.plan import vdev_keys  # noqa: PLC0415

    names = volume.key_names
    if args.passphrase:
        return PromptKeys(env.ask if env.stdin_is_tty else _line_reader(env.stdin))
    files = parse_key_files(args.key_file or [], volume.name, names)
    # A zfs layer's vdev keys may be missing: its degraded policy decides (keyd.engine.plan).
    if names and files.default is None and set(names) - set(files.by_name) - vdev_keys(volume):
        raise UsageError(f"volume {volume.name} needs a key ({', '.join(names)})",
                         fix="pass --key-file PATH (or - for stdin), or --passphrase")
    return FileKeys(files.default, files.by_name, env.stdin, open_binary)


def _line_reader(stream: BinaryIO) -> Callable[[str], str]:
    def read(prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise KeyRejected(f"no passphrase on stdin ({prompt.strip()})",
                              fix="pipe one line per key, or run on a terminal")
        return line.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
    return read


def _report_rollback(env: Environment, error: BaseException) -> None:
    failures = getattr(error, "rollback_failures", None)
    if failures is None:
        return
    if not failures:
        print("keydctl: rolled back: everything this run opened is closed again",
              file=env.stderr)
    for failure in failures:
        print(f"keydctl: warning: rollback failed: {failure}", file=env.stderr)
    if failures:
        print("keydctl: warning: some devices may still be open; see `keydctl status`",
              file=env.stderr)


def _unlock(args: argparse.Namespace) -> int:
    env = _env(args)
    link = remote.choose(args, env.daemon)
    if link is not None:
        return remote.unlock(link, args, env)
    volume = load_config(args.config).volume(args.volume)
    keys = _key_source(args, env, volume)
    try:
        outcome = _engine(env, args).unlock(volume, keys, start_services=args.start_services)
    except BaseException as error:
        _report_rollback(env, error)
        raise
    finally:
        keys.wipe()
    state = "unlocked" if outcome.changed else "already unlocked"
    print(f"volume {volume.name} {state}{_mounted(volume)}", file=env.stdout)
    for line in outcome.mended:
        print(f"volume {volume.name}: {line}", file=env.stdout)
    for line in outcome.degraded:
        print(f"keydctl: warning: {line}", file=env.stderr)
    return 0


def _mounted(volume: Volume) -> str:
    top = volume.layer(volume.top)
    return f" at {top.mountpoint}" if isinstance(top, MountLayer) else ""


def _lock(args: argparse.Namespace) -> int:
    env = _env(args)
    link = remote.choose(args, env.daemon)
    if link is not None:
        return remote.lock(link, args, env)
    volume = load_config(args.config).volume(args.volume)
    outcome = _engine(env, args).lock(volume, force=args.force)
    print(f"volume {volume.name} {'locked' if outcome.changed else 'already locked'}",
          file=env.stdout)
    return 0


def _shutdown(args: argparse.Namespace) -> int:
    env = _env(args)
    link = remote.choose(args, env.daemon)
    if link is not None:
        return remote.shutdown(link, args, env)
    engine, left_open = _engine(env, args), 0
    # The last configured first; the root file system's volume stays (keyd(8), BOOT).
    for volume in [v for v in reversed(load_config(args.config).volumes) if v.boot != "root"]:
        try:
            if engine.lock(volume, force=True, quiesce=True).changed:
                print(f"volume {volume.name} locked", file=env.stdout)
        except VolumeBusy as busy:
            left_open += 1
            print(f"keydctl: volume {volume.name} left open: {busy.message}", file=env.stderr)
            for line in busy.quiesced:
                print(f"keydctl:   {line}", file=env.stderr)
        except KeydError as exc:
            left_open += 1
            print(f"keydctl: volume {volume.name} left open: {exc.message}", file=env.stderr)
    return 1 if left_open else 0


def _status(args: argparse.Namespace) -> int:
    env = _env(args)
    config = load_config(args.config)
    volumes = [config.volume(args.volume)] if args.volume else list(config.volumes)
    reports = _engine(env, args).status(volumes)  # with keyd's records of imported pools
    daemon = read_view(args.run_dir)  # what keyd waits for: a key, more k-of-n sticks
    if args.json:
        print(json.dumps(to_json(reports, daemon), indent=2), file=env.stdout)
    elif not reports:
        print(f"no volumes configured in {args.config}", file=env.stdout)
    else:
        print(render_table(reports, daemon), end="", file=env.stdout)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from keyd.adapters.crypt_backends import DmCryptProbe  # noqa: PLC0415
    from keyd.adapters.usercrypt import FUSE_FIX, fuse_problems  # noqa: PLC0415
    from keyd.boot.doctor import check_boot  # noqa: PLC0415 (see module doc)
    from keyd.engine import doctor  # noqa: PLC0415
    from keyd.engine.status import report  # noqa: PLC0415

    env = _env(args)
    findings: list[doctor.Finding] = []
    try:
        config = load_config(args.config)
        findings.append(doctor.Finding("ok", "config", f"{args.config}: valid, "
                                                       f"{len(config.volumes)} volume(s)"))
    except ConfigError as exc:
        findings.append(doctor.Finding("fail", "config", exc.message, exc.fix))
        config = Config(file=args.config)
    findings += doctor.check_programs(env.runner, doctor.needed_programs(config))
    dm_crypt = DmCryptProbe(env.runner)()
    modules = doctor.needed_modules(config)
    if not dm_crypt and not doctor.needs_dm_crypt(config):
        # Every crypt layer (if any) can go to userspace: see the crypt finding.
        modules = [module for module in modules if module != "dm_crypt"]
    findings += doctor.check_modules(env.runner, modules, env.root)
    findings += doctor.check_crypt_backends(config, dm_crypt, fuse_problems(), FUSE_FIX)
    findings += doctor.check_hashes(env.runner, config)
    observed = env.observer.observe(config.volumes)
    findings += doctor.check_devices(config, observed)
    findings += doctor.check_last_resort(config, env.root)
    findings += check_boot(config, env.root, os.uname().release,
                           {v.name: report(v, observed) for v in config.volumes})
    findings.append(doctor.check_run_dir(args.run_dir))
    findings.append(doctor.check_state_dir(DEFAULT_STATE_DIR))
    print(doctor.render(findings), end="", file=env.stdout)
    return 1 if any(f.status == "fail" for f in findings) else 0


def _check_config(args: argparse.Namespace) -> int:
    env = _env(args)
    config = load_config(args.config)
    print(f"{args.config}: valid; {len(config.volumes)} volume(s), "
          f"{len(config.trust.signers)} trusted signer(s)", file=env.stdout)
    for volume in config.volumes:
        stack = " -> ".join(f"{layer.name} ({layer.kind})" for layer in volume.layers)
        services = f"; services: {', '.join(volume.services)}" if volume.services else ""
        print(f"  {volume.name}: {stack}{services}", file=env.stdout)
    return 0


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG,
                        help=f"configuration file (default: {DEFAULT_CONFIG})")
    common.add_argument("--run-dir", metavar="DIR", default=DEFAULT_RUN_DIR,
                        help=f"directory for per-volume lock files (default: {DEFAULT_RUN_DIR})")
    return common


def _add(subparsers: Any, name: str, handler: Callable[[argparse.Namespace], int],
         summary: str, description: str, *,
         parents: Sequence[argparse.ArgumentParser]) -> Any:
    parser = subparsers.add_parser(name, help=summary, description=description,
                                   parents=list(parents),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=handler, environment=None)
    return parser


def register(subparsers: Any) -> None:
    """Add unlock, lock, shutdown, status, doctor and check-config to keydctl."""
    common = [_common()]
    unlock = _add(subparsers, "unlock", _unlock, "open a volume's storage stack bottom-up",
                  "Assemble, open and mount every layer of VOLUME that is not open yet.\n"
                  "If a step fails, everything this run opened is closed again.\n"
                  "When keyd runs, it does the unlock (and starts the volume's services);\n"
                  "--direct does it in this process instead.\n\n"
                  "examples:\n  keydctl unlock tank --key-file /media/stick/passphrase\n"
                  "  keydctl unlock work --passphrase\n"
                  "  keydctl unlock zoo --direct --key-file tc1=/k/one --key-file tc2=/k/two",
                  parents=common)
    unlock.add_argument("volume", metavar="VOLUME", help="volume name from the configuration")
    source = unlock.add_mutually_exclusive_group()
    source.add_argument("--key-file", action="append", metavar="[NAME=]PATH",
                        help="read the key from PATH ('-' = stdin); NAME= gives the key the "
                             "config calls NAME (repeatable)")
    source.add_argument("--passphrase", action="store_true",
                        help="ask for each passphrase (or read one line per key from stdin)")
    unlock.add_argument("--start-services", action="store_true",
                        help="start the volume's configured services afterwards (keyd always "
                             "does)")
    _add_wait(unlock)
    remote.add_options(unlock)
    lock = _add(subparsers, "lock", _lock, "close a volume's storage stack top-down",
                "Unmount, detach, close and stop every layer of VOLUME that keyd opened.\n"
                "Refuses while processes use the volume, and lists them.\n"
                "When keyd runs, it does the lock (stopping the volume's services first);\n"
                "--direct does it in this process instead.", parents=common)
    lock.add_argument("volume", metavar="VOLUME", help="volume name from the configuration")
    lock.add_argument("--force", action="store_true",
                      help="stop the volume's configured services first (never kills; keyd "
                           "always does)")
    _add_wait(lock)
    remote.add_options(lock)
    shutdown = _add(subparsers, "shutdown", _shutdown,
                    "lock every open volume for power-off (keyd-shutdown.service)",
                    "Lock every open volume top-down, as keyd-shutdown.service does when the\n"
                    "system goes down. A busy volume is not waited for: its file systems are\n"
                    "flushed and, where nothing writes, remounted read-only; the processes are\n"
                    "named. Through keyd when it runs (it then opens nothing until it exits).\n"
                    "Exit status 1 if a volume was left open.", parents=common)
    remote.add_options(shutdown)
    status = _add(subparsers, "status", _status, "show volumes and their layers",
                  "Show each volume's state and every layer: device, degraded flag, "
                  "mountpoint.", parents=common)
    status.add_argument("volume", metavar="VOLUME", nargs="?", help="only this volume")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add(subparsers, "doctor", _doctor, "check programs, kernel modules, devices and config",
         "Check that this machine can open the configured volumes; every problem "
         "comes with a fix.", parents=common)
    _add(subparsers, "check-config", _check_config, "validate the configuration file",
         "Parse the configuration and print each volume's stack.", parents=common)


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="wait this long for another keyd run on the volume (default 30)")
