"""The GLib side: a Scheduler over GLib's main loop, and the pyudev monitor watched by fd.

No polling: the udev netlink socket wakes the loop (``GLib.io_add_watch`` on
``Monitor.fileno()``), timers are one-shot GLib sources, worker results come
back with ``GLib.idle_add``. An idle daemon has no wake-ups except the
watchdog's.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyudev
from gi.repository import GLib

from keyd.daemon.uevents import StickAdded, StickGone, StickInfo, UEvent, translate

log = logging.getLogger("keyd.daemon")

UDEV_RECEIVE_BUFFER = 32 * 1024 * 1024  # survive bursts (thousands of loop events) unread


class GLibScheduler:
    """The daemon's :class:`~keyd.daemon.ports.Scheduler` on the default GLib main context."""

    def __init__(self, workers: int = 8) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keyd-worker")

    def call_later(self, seconds: float, callback: Callable[[], None]) -> int:
        """One-shot timer; see Scheduler."""
        def fire() -> bool:
            callback()
            return False  # one-shot
        return int(GLib.timeout_add(max(0, int(seconds * 1000)), fire))

    def cancel(self, handle: Any) -> None:
        """See Scheduler; a timer that already fired is ignored."""
        source = GLib.main_context_default().find_source_by_id(handle)
        if source is not None and not source.is_destroyed():
            source.destroy()

    def run_in_worker(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """See Scheduler; an exception in ``work`` is handed to ``done`` as the result."""
        self.pool.submit(_guarded, work, done)

    def run_in_background(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """See Scheduler: a daemon thread of its own, not waited for at shutdown."""
        threading.Thread(target=_guarded, args=(work, done), daemon=True,
                         name="keyd-background").start()

    def now(self) -> float:
        """See Scheduler."""
        return time.monotonic()

    def shutdown(self) -> None:
        """Wait for running workers (an unlock in progress finishes or rolls back)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _guarded(work: Callable[[], Any], done: Callable[[Any], None]) -> None:
    """Run ``work`` off the loop, then hand its result (or exception) to ``done`` in the loop."""
    try:
        result = work()
    except Exception as exc:  # reported to the loop as the result
        log.error("worker failed: %r", exc)
        result = exc

    def deliver() -> bool:
        done(result)
        return False  # run once
    GLib.idle_add(deliver)


def _props(device: Any) -> dict[str, str]:
    return {str(key): str(value) for key, value in device.properties.items()}


class UdevWatch:
    """Watches block uevents and hands translated keyd events to ``handle``."""

    def __init__(self, handle: Callable[[UEvent], None], known: Callable[[], Iterable[str]],
                 context: Any = None, monitor: Any = None) -> None:
        self.context = context or pyudev.Context()
        self.handle = handle
        self.known = known  # devnodes of the sticks the daemon believes present
        self.monitor = monitor or pyudev.Monitor.from_netlink(self.context)
        self.monitor.filter_by("block")
        try:
            self.monitor.set_receive_buffer_size(UDEV_RECEIVE_BUFFER)
        except Exception as exc:  # needs CAP_NET_ADMIN; the default buffer still works
            log.warning("cannot enlarge the udev receive buffer: %s", exc)
        self.source = 0

    def start(self) -> None:
        """Start receiving (call before coldplug, so nothing falls between the two)."""
        self.monitor.start()
        self.source = GLib.io_add_watch(self.monitor.fileno(), GLib.PRIORITY_DEFAULT,
                                        GLib.IO_IN, self._readable)

    def _readable(self, *_args: Any) -> bool:
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    log.error("reading uevents failed: %s", exc)
                    return True
                # The socket overflowed (a burst of uevents): events were lost, so
                # look at what is plugged in now instead.
                log.warning("udev events were lost (receive buffer overflow): rescanning")
                self.resync()
                continue
            if device is None:
                return True  # keep watching
            try:
                event = translate(device.action or "", _props(device))
            except Exception as exc:  # one odd device must not stop the watch
                log.error("cannot read uevent of %s: %s", device.sys_path, exc)
                continue
            if event is not None:
                self.handle(event)

    def resync(self) -> None:
        """Report every stick present as added and every known stick gone as removed."""
        present = {stick.devnode: stick for stick in self.present_sticks()}
        for devnode in list(self.known()):
            if devnode not in present:
                self.handle(StickGone(devnode))
        for stick in present.values():
            self.handle(StickAdded(stick))

    def present_sticks(self) -> Iterator[StickInfo]:
        """Coldplug: candidate sticks already present."""
        for device in self.context.list_devices(subsystem="block"):
            event = translate("add", _props(device))
            if isinstance(event, StickAdded):
                yield event.stick

    def stop(self) -> None:
        """Stop watching."""
        if self.source:
            GLib.source_remove(self.source)
            self.source = 0
