"""OpenZFS in the lab: the DKMS-built modules load on demand, a pool round-trips, nothing auto-imports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import GuestLab

POOL = "zlab"
# The zfs units Debian enables (zfs.target <- multi-user.target); the lab boots keyd-lab.target instead.
ZFS_UNITS = ["zfs.target", "zfs-import-cache.service", "zfs-import-scan.service", "zfs-mount.service",
             "zfs-zed.service", "zfs-load-module.service", "zfs-share.service"]


def pools(guest: GuestLab) -> list[str]:
    """The names of the imported pools (``zpool list -H``)."""
    return [line.split("\t")[0] for line in guest.check(["zpool", "list", "-H"]).stdout.splitlines()]


@pytest.fixture
def zpool_cleanup(guest: GuestLab) -> Iterator[None]:
    """Export the test's pool even on failure: the reset detaches its disk, which would suspend it."""
    yield
    guest.run(["zpool", "export", "-f", POOL], timeout=120)


def test_zfs_units_stay_down_and_modprobe_loads_the_dkms_modules(guest: GuestLab) -> None:
    states = guest.run(["systemctl", "is-active", *ZFS_UNITS]).stdout.split()
    assert states == ["inactive"] * len(ZFS_UNITS), dict(zip(ZFS_UNITS, states, strict=False))

    guest.check(["modprobe", "zfs"], timeout=120)

    release = guest.check(["uname", "-r"]).stdout.strip()
    for module in ("zfs", "spl"):
        path = guest.check(["modinfo", "-F", "filename", module]).stdout.strip()
        assert path == f"/lib/modules/{release}/updates/zfs/{module}.ko", path
        assert guest.run(["test", "-d", f"/sys/module/{module}"]).rc == 0, module
    assert guest.check(["cat", "/sys/module/zfs/parameters/zfs_autoimport_disable"]).stdout.strip() == "1"
    version = guest.check(["cat", "/sys/module/zfs/version"]).stdout.strip()
    assert version.startswith(guest.check(["zfs", "version"]).stdout.split("-")[1]), version


def test_a_pool_on_a_lab_disk_survives_export_and_import(guest: GuestLab, zpool_cleanup: None) -> None:
    # A whole disk gets a GPT whose reserved partition 9 is 16384 *sectors*: 64 MiB on a 4K disk, so
    # a 128 MB 4K disk leaves under ZFS's 64 MiB minimum for partition 1 (found here, OpenZFS 2.1.11).
    disk = guest.disk("ZLABPOOL1", 256, sector_size=4096)
    guest.check(["zpool", "create", "-f", "-o", "ashift=12", "-O", f"mountpoint=/mnt/t/{POOL}", POOL, disk],
                timeout=120)
    guest.sh(f"head -c 3000000 /dev/urandom > /mnt/t/{POOL}/data && sync")
    written = guest.check(["sha256sum", f"/mnt/t/{POOL}/data"]).stdout.split()[0]
    assert guest.check(["zpool", "get", "-H", "-o", "value", "ashift", POOL]).stdout.strip() == "12"

    guest.check(["zpool", "export", POOL], timeout=120)
    assert POOL not in pools(guest)
    guest.check(["zpool", "import", "-d", "/dev/disk/by-id", POOL], timeout=120)

    health = guest.check(["zpool", "list", "-H", "-o", "name,health"]).stdout
    assert health.splitlines() == [f"{POOL}\tONLINE"]
    assert guest.check(["sha256sum", f"/mnt/t/{POOL}/data"]).stdout.split()[0] == written


def test_a_pool_disk_that_appears_is_not_imported_by_anyone(guest: GuestLab, zpool_cleanup: None) -> None:
    disk = guest.disk("ZLABPOOL2", 128)
    guest.check(["zpool", "create", "-f", "-m", "none", POOL, disk], timeout=120)
    guest.check(["zpool", "export", POOL], timeout=120)
    guest.detach("ZLABPOOL2")
    guest.sh("udevadm settle")

    guest.reattach("ZLABPOOL2")
    guest.sh("udevadm settle -t 30; sleep 2")

    # udev's 90-zfs.rules only modprobes zfs for a zfs_member; nothing imports it.
    # zpool gave the whole disk a GPT: the ZFS label is on partition 1.
    member = guest.check(["blkid", "-o", "value", "-s", "TYPE", f"{disk}-part1"]).stdout.strip()
    assert member == "zfs_member"
    assert POOL not in pools(guest)
    assert guest.run(["zpool", "import", "-d", "/dev/disk/by-id"]).stdout.count(f"pool: {POOL}") == 1
