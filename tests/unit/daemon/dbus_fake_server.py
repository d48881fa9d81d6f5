"""A second process for the D-Bus tests: the real service and core on fake ports.

Usage: python dbus_fake_server.py BUS_ADDRESS
Publishes org.keyd.Keyd1 on the given bus, prints "ready" and serves until
SIGTERM. pydbus calls into a service published by the same process would
block its own loop, hence the separate process.
"""

from __future__ import annotations

import signal
import sys

import pydbus
from gi.repository import GLib

from keyd.config.model import DaemonSettings
from keyd.daemon.dbus_api import ManagerService, publish
from keyd.daemon.glib_loop import GLibScheduler
from tests.support.daemon_fakes import harness


def main(address: str) -> None:
    scheduler = GLibScheduler(workers=1)
    h = harness(DaemonSettings(admin_group="keyd-test-admins"), loop=scheduler)
    h.engine.open.add("tank")
    h.engine.busy.append(False)
    service = ManagerService(h.daemon, groups_of=lambda uid: set())
    h.daemon.ports.announcer = service
    bus = pydbus.connect(address)
    publication = publish(bus, service)
    h.daemon.start([])
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, lambda: loop.quit() or False)
    print("ready", flush=True)
    loop.run()
    publication.unpublish()
    scheduler.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
