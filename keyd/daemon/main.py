"""``keyd``: the daemon process. One GLib main loop for udev, D-Bus, timers and signals.

Start-up order: publish on D-Bus, start the udev monitor (so nothing is missed),
reconcile every volume with the kernel, coldplug the sticks present, and send
``READY=1`` once those checks and the unlocks they started are done (or after
``--ready-timeout``). ``WATCHDOG=1`` comes from a loop timer at half of
``WATCHDOG_USEC``, so a stuck loop gets keyd restarted. SIGTERM/SIGINT stop the
loop; running unlocks finish (or roll back) before keyd exits. Nothing is
locked on shutdown: storage stays as it is across restarts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gi.repository import GLib

from keyd import __version__
from keyd.adapters.real import real_engine
from keyd.audit.sink import JournalSink
from keyd.boot.records import BOOT_AUDIT, forward_records
from keyd.config.model import DEFAULT_CONFIG, Config
from keyd.config.parse import load_config
from keyd.daemon.adapters import AskPassword, SystemctlUnits, SystemdUnits, TrustChecker
from keyd.daemon.client import bus_at, system_bus
from keyd.daemon.core import Announcers, Daemon, DaemonPorts
from keyd.daemon.dbus_api import ManagerService, publish
from keyd.daemon.glib_loop import GLibScheduler, UdevWatch
from keyd.daemon.leftovers import cgroup_processes, wait_for_leftovers
from keyd.daemon.ports import Announcer, UnitManager
from keyd.daemon_view import StateFile
from keyd.engine.lockfile import DEFAULT_RUN_DIR
from keyd.errors import KeydError, user_message
from keyd.runner import SubprocessRunner
from keyd.trust.settings import DEFAULT_STATE_DIR, TrustSettings

log = logging.getLogger("keyd.daemon")

Notify = Callable[[str], Any]
LEFTOVER_WAIT = 90.0  # seconds; keyd.service's TimeoutStartSec is 120


def sd_notify(state: str) -> Any:
    """Tell systemd (NOTIFY_SOCKET); a no-op when not run by systemd."""
    return importlib.import_module("systemd.daemon").notify(state)


def watchdog_interval(environ: dict[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), if systemd asked for them."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2e6


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """keyd's command line."""
    parser = argparse.ArgumentParser(prog="keyd", description="Unlock storage stacks when a "
                                     "trusted, signed USB key stick is plugged in.")
    parser.add_argument("--version", action="version", version=f"keyd {__version__}")
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, metavar="DIR")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR")
    parser.add_argument("--bus", metavar="ADDRESS", help="D-Bus address (default: system bus)")
    parser.add_argument("--no-dbus", action="store_true",
                        help="no D-Bus API; units via systemctl")
    parser.add_argument("--ready-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="send READY=1 after this long even if coldplug unlocks still run")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def trust_settings(config: Config, args: argparse.Namespace) -> TrustSettings:
    """TrustSettings from keyd.toml's [trust] and the command line."""
    return TrustSettings(signers=config.trust.signers, gnupghome=config.trust.gnupghome,
                         revocations_file=config.trust.revocations,
                         state_dir=args.state_dir, run_dir=args.run_dir, source=config.file)


@dataclass
class Runtime:
    """The running daemon's parts, for shutdown."""

    daemon: Daemon
    scheduler: GLibScheduler
    watch: UdevWatch
    publication: Any
    loop: Any
    state_file: StateFile


def build(args: argparse.Namespace, config: Config) -> Runtime:
    """Wire the real adapters around the core."""
    runner = SubprocessRunner()
    bus = None if args.no_dbus else (bus_at(args.bus) if args.bus else system_bus)()
    units: UnitManager = SystemdUnits(bus) if bus is not None else SystemctlUnits(runner)
    scheduler = GLibScheduler()
    ports = DaemonPorts(real_engine(runner, args.run_dir), units,
                        TrustChecker(runner, trust_settings(config, args)), AskPassword(runner),
                        JournalSink())
    daemon = Daemon(config, ports, scheduler)
    state_file = StateFile(args.run_dir, daemon.volumes)
    announcers: list[Announcer] = [state_file]
    publication = None
    if bus is not None:
        service = ManagerService(daemon)
        announcers.append(service)
        publication = publish(bus, service)
    ports.announcer = Announcers(announcers)
    watch = UdevWatch(daemon.handle_uevent, lambda: list(daemon.sticks))
    return Runtime(daemon, scheduler, watch, publication, GLib.MainLoop(), state_file)


def run(runtime: Runtime, notify: Notify, ready_timeout: float) -> None:
    """Start up, serve until SIGTERM/SIGINT, shut down."""
    ready_sent: list[bool] = []

    def ready() -> bool:
        if not ready_sent:
            ready_sent.append(True)
            notify(f"READY=1\nSTATUS=serving {len(runtime.daemon.volumes)} volume(s)")
        return False

    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, _quitter(runtime.loop))
    interval = watchdog_interval(dict(os.environ), os.getpid())
    if interval is not None:
        GLib.timeout_add(int(interval * 1000), lambda: bool(notify("WATCHDOG=1")) or True)
    runtime.watch.start()
    # A cryptsetup/mount left by a killed keyd must finish before the kernel is read.
    wait_for_leftovers(cgroup_processes, timeout=LEFTOVER_WAIT)
    runtime.daemon.start(runtime.watch.present_sticks(), on_settled=ready)
    if not ready_sent:
        GLib.timeout_add(int(ready_timeout * 1000), ready)
    runtime.loop.run()
    notify("STOPPING=1")
    runtime.watch.stop()
    runtime.scheduler.shutdown()  # running unlocks finish or roll back
    runtime.daemon.stop()
    runtime.state_file.remove()
    if runtime.publication is not None:
        runtime.publication.unpublish()


def _quitter(loop: Any) -> Callable[[], bool]:
    def quit_loop() -> bool:
        log.info("stopping")
        loop.quit()
        return False
    return quit_loop


def main(argv: Sequence[str] | None = None, notify: Notify = sd_notify) -> int:
    """Run keyd; returns its exit status (systemd restarts it on failure)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="keyd: %(message)s", stream=sys.stderr)
    logging.getLogger("pydbus").setLevel(logging.CRITICAL)  # our own errors say enough
    try:
        config = load_config(args.config)  # with the daemon's keys ([daemon], per volume)
        runtime = build(args, config)
    except KeydError as exc:
        print(f"keyd: {user_message(exc)}", file=sys.stderr)
        notify(f"STATUS=failed: {exc.message}")
        return exc.exit_code
    except GLib.Error as exc:
        print(f"keyd: cannot use D-Bus: {exc.message}", file=sys.stderr)
        return 1
    forward_records(Path(args.run_dir) / BOOT_AUDIT, runtime.daemon.audit)
    run(runtime, notify, args.ready_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
