"""Edge translation: udev properties + action -> keyd events, as a table."""

from __future__ import annotations

import pytest

from keyd.daemon.uevents import (
    MemberAdded,
    MemberRemoved,
    StickAdded,
    StickGone,
    StickInfo,
    UEvent,
    translate,
)

STICK = {"SUBSYSTEM": "block", "DEVTYPE": "partition", "DEVNAME": "/dev/sdc1", "ID_BUS": "usb",
         "ID_FS_USAGE": "filesystem", "ID_FS_TYPE": "vfat", "ID_SERIAL_SHORT": "4C530001",
         "ID_SERIAL": "SanDisk_Cruzer_4C530001-0:0", "ID_FS_UUID": "1234-ABCD",
         "ID_FS_LABEL": "KEYS"}
STICK_INFO = StickInfo("/dev/sdc1", "vfat", "4C530001", "1234-ABCD", "KEYS")
DISK = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/sdb", "ID_BUS": "ata",
        "ID_FS_TYPE": "linux_raid_member", "ID_FS_USAGE": "raid"}


def with_(base: dict[str, str], **changes: str | None) -> dict[str, str]:
    merged = {**base, **changes}
    return {k: v for k, v in merged.items() if v is not None}


CASES: list[tuple[str, str, dict[str, str], UEvent | None]] = [
    ("usb partition with vfat is a stick", "add", STICK, StickAdded(STICK_INFO)),
    ("usb stick gaining a filesystem (change) is a stick", "change", STICK, StickAdded(STICK_INFO)),
    ("unpartitioned usb stick (whole disk fs)", "add",
     with_(STICK, DEVTYPE="disk", DEVNAME="/dev/sdc"),
     StickAdded(StickInfo("/dev/sdc", "vfat", "4C530001", "1234-ABCD", "KEYS"))),
    ("serial falls back to ID_SERIAL", "add", with_(STICK, ID_SERIAL_SHORT=None),
     StickAdded(StickInfo("/dev/sdc1", "vfat", "SanDisk_Cruzer_4C530001-0:0", "1234-ABCD",
                          "KEYS"))),
    ("usb stick removed", "remove", STICK, StickGone("/dev/sdc1", "4C530001")),
    ("usb medium gone (change without fs)", "change",
     with_(STICK, ID_FS_TYPE=None, ID_FS_USAGE=None), StickGone("/dev/sdc1", "4C530001")),
    ("usb disk with LUKS is a member, not a stick", "add",
     with_(STICK, ID_FS_TYPE="crypto_LUKS", ID_FS_USAGE="crypto"), MemberAdded("/dev/sdc1")),
    ("usb partition-table disk without fs is a member", "add",
     with_(STICK, DEVTYPE="disk", DEVNAME="/dev/sdc", ID_FS_TYPE=None, ID_FS_USAGE=None),
     MemberAdded("/dev/sdc")),
    ("sata raid member appears", "add", DISK, MemberAdded("/dev/sdb")),
    ("sata raid member goes", "remove", DISK, MemberRemoved("/dev/sdb")),
    ("ext4 on a sata disk is not a stick", "add",
     with_(DISK, ID_FS_TYPE="ext4", ID_FS_USAGE="filesystem"), MemberAdded("/dev/sdb")),
    ("dm device is noise", "add", with_(DISK, DEVNAME="/dev/dm-3", DM_NAME="keyd-tank-c"), None),
    ("dm named by DM_NAME only is noise", "add", with_(DISK, DM_NAME="x"), None),
    ("md array is noise", "add", with_(DISK, DEVNAME="/dev/md127"), None),
    ("md level set is noise", "change", with_(DISK, MD_LEVEL="raid5"), None),
    ("loop device is noise", "add", with_(DISK, DEVNAME="/dev/loop7", ID_BUS=None), None),
    ("loop removal is noise", "remove", with_(DISK, DEVNAME="/dev/loop7"), None),
    ("usb loop? still noise", "add", with_(STICK, DEVNAME="/dev/loop0"), None),
    ("ram/zram/nbd/sr are noise", "add", with_(DISK, DEVNAME="/dev/zram0"), None),
    ("cd-rom is noise", "add", with_(STICK, DEVNAME="/dev/sr0", DEVTYPE="disk"), None),
    ("non-block subsystem is noise", "add", with_(STICK, SUBSYSTEM="usb"), None),
    ("no DEVTYPE is noise", "add", with_(STICK, DEVTYPE=None), None),
    ("no DEVNAME is noise", "add", with_(STICK, DEVNAME=None), None),
    ("bind/move/online actions do nothing", "move", DISK, None),
    ("sata change is a member event", "change", DISK, MemberAdded("/dev/sdb")),
]


@pytest.mark.parametrize(("action", "props", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_translate(action: str, props: dict[str, str], expected: UEvent | None) -> None:
    assert translate(action, props) == expected


@pytest.mark.parametrize(("info", "key"), [
    (STICK_INFO, "4C530001"),
    (StickInfo("/dev/sdc1", "vfat", None, "1234-ABCD"), "fs:1234-ABCD"),
    (StickInfo("/dev/sdc1", "vfat"), "/dev/sdc1"),
])
def test_stick_identity_for_backoff_prefers_serial_then_fs_uuid(info: StickInfo, key: str) -> None:
    assert info.key == key
