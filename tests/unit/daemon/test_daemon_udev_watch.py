"""UdevWatch with a fake monitor: translation, noise dropped, overflow handled by a rescan."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from keyd.daemon.glib_loop import UdevWatch
from keyd.daemon.uevents import MemberAdded, StickAdded, StickGone, StickInfo, UEvent

STICK = {"SUBSYSTEM": "block", "DEVTYPE": "partition", "DEVNAME": "/dev/sdc1", "ID_BUS": "usb",
         "ID_FS_USAGE": "filesystem", "ID_FS_TYPE": "vfat", "ID_SERIAL_SHORT": "S1"}
LOOP = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/loop3"}
DISK = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/sdb", "ID_BUS": "ata"}


@dataclass
class Device:
    properties: dict[str, str]
    action: str | None = "add"
    sys_path: str = "/sys/fake"


@dataclass
class FakeMonitor:
    """Yields scripted devices (or raises scripted errors), then None."""

    script: list[Any] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)

    def filter_by(self, subsystem: str) -> None:
        self.filters.append(subsystem)

    def set_receive_buffer_size(self, size: int) -> None:
        raise PermissionError(1, "Operation not permitted")  # no CAP_NET_ADMIN

    def poll(self, timeout: float = 0) -> Device | None:
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]


@dataclass
class FakeContext:
    devices: list[Device] = field(default_factory=list)

    def list_devices(self, subsystem: str) -> list[Device]:
        assert subsystem == "block"
        return self.devices


def watch(script: list[Any], present: list[Device], known: list[str]) -> tuple[UdevWatch,
                                                                               list[UEvent]]:
    seen: list[UEvent] = []
    w = UdevWatch(seen.append, lambda: known, context=FakeContext(present),
                  monitor=FakeMonitor(script))
    return w, seen


def test_events_are_translated_and_noise_dropped() -> None:
    w, seen = watch([Device(LOOP), Device(STICK), Device(LOOP, "remove"), Device(DISK)], [], [])
    assert w._readable() is True
    assert seen == [StickAdded(StickInfo("/dev/sdc1", "vfat", "S1")), MemberAdded("/dev/sdb")]
    assert w.monitor.filters == ["block"]


def test_a_buffer_overflow_rescans_adds_present_sticks_and_drops_vanished_ones() -> None:
    overflow = OSError(errno.ENOBUFS, "No buffer space available")
    w, seen = watch([overflow], [Device(STICK), Device(LOOP)], known=["/dev/sdd1"])
    w._readable()
    assert seen == [StickGone("/dev/sdd1"), StickAdded(StickInfo("/dev/sdc1", "vfat", "S1"))]


def test_other_read_errors_keep_the_watch_alive() -> None:
    w, seen = watch([OSError(errno.EIO, "I/O error"), Device(STICK)], [], [])
    assert w._readable() is True and seen == []
    w._readable()  # the fd is still readable: the loop calls again
    assert seen == [StickAdded(StickInfo("/dev/sdc1", "vfat", "S1"))]


def test_coldplug_lists_only_sticks() -> None:
    w, _ = watch([], [Device(STICK), Device(LOOP), Device(DISK)], [])
    assert list(w.present_sticks()) == [StickInfo("/dev/sdc1", "vfat", "S1")]
