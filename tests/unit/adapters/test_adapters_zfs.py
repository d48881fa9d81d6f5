"""The zpool adapter over a ScriptedRunner: argv per option, errors with fixes, busy exports."""

from __future__ import annotations

import pytest

from keyd.adapters.zfs import Zpool, import_argv
from keyd.config.model import ZfsLayer
from keyd.engine.errors import StorageError, VolumeBusy
from keyd.engine.observed import ZfsPool
from tests.support.scripted_runner import Reply, ScriptedRunner

GUID = "16093900627180053822"
LISTED = Reply(f"secretpool\t{GUID}\tONLINE\t-\nother\t1\tONLINE\t-\n")
LIST = ("zpool", "list", "-H", "-p", "-o", "name,guid,health,altroot")
LABEL = "zfs layer pool of volume secret"


def layer(**fields: object) -> ZfsLayer:
    base: dict[str, object] = {"name": "pool", "pool": "secretpool", "below": ("tc1", "tc2")}
    return ZfsLayer(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "tail"), [
    ({}, ["secretpool"]),
    ({"guid": GUID}, [GUID]),
    ({"search_dir": "/dev/disk/by-id"}, ["secretpool"]),
    ({"altroot": "/mnt/s"}, ["-R", "/mnt/s", "secretpool"]),
    ({"read_only": True}, ["-o", "readonly=on", "secretpool"]),
    ({"mount": False}, ["-N", "secretpool"]),
    ({"altroot": "/a", "read_only": True, "mount": False},
     ["-R", "/a", "-o", "readonly=on", "-N", "secretpool"]),
])
def test_import_argv(fields: dict[str, object], tail: list[str]) -> None:
    argv = import_argv(layer(**fields))
    directory = str(fields.get("search_dir", "/dev/mapper"))
    assert argv == ["zpool", "import", "-d", directory, "-o", "cachefile=none", *tail]


def test_import_returns_the_pool_as_listed() -> None:
    runner = ScriptedRunner().on(*LIST, reply=LISTED)
    assert Zpool(runner).import_pool(LABEL, layer()) == ZfsPool("secretpool", GUID, "ONLINE")
    assert runner.argvs() == [tuple(import_argv(layer())), LIST]


def test_import_by_guid_finds_the_pool_by_guid() -> None:
    runner = ScriptedRunner().on(*LIST, reply=Reply(f"renamed\t{GUID}\tDEGRADED\t-\n"))
    found = Zpool(runner).import_pool(LABEL, layer(pool=None, guid=GUID))
    assert (found.name, found.health) == ("renamed", "DEGRADED")


@pytest.mark.parametrize(("stderr", "fix"), [
    ("cannot import 'secretpool': no such pool available\n", "zpool import -d DIR"),
    ("The ZFS modules are not loaded.\nTry running '/sbin/modprobe zfs' as root to load them.\n",
     "modules-load.d"),
    ("cannot import 'secretpool': pool may be in use from other system\n", "zpool import -f"),
    ("cannot import 'secretpool': more than one matching pool\nimport by numeric ID instead\n",
     'guid = "<id>"'),
    ("cannot import 'secretpool': one or more devices is currently unavailable\n",
     'degraded = "always"'),
    ("something new\n", "dmesg"),
])
def test_import_failures_say_what_to_do(stderr: str, fix: str) -> None:
    runner = ScriptedRunner().on("zpool", "import", reply=Reply(stderr=stderr, returncode=1))
    with pytest.raises(StorageError, match=f"could not import pool secretpool for {LABEL}") \
            as info:
        Zpool(runner).import_pool(LABEL, layer())
    assert fix in str(info.value.fix)
    assert runner.argvs("zpool")[-1] == LIST  # looked whether it was left imported: no


def test_failed_import_that_left_the_pool_imported_exports_it() -> None:
    runner = ScriptedRunner().on("zpool", "import", reply=Reply(
        stderr="cannot mount '/secretpool': directory is not empty\n", returncode=1)) \
        .on(*LIST, reply=LISTED)
    with pytest.raises(StorageError, match="directory is not empty"):
        Zpool(runner).import_pool(LABEL, layer())
    assert runner.argvs()[-1] == ("zpool", "export", "secretpool")


def test_import_that_lists_no_pool_is_an_error() -> None:
    with pytest.raises(StorageError, match="does not show the pool"):
        Zpool(ScriptedRunner()).import_pool(LABEL, layer())


def test_export_argv_and_busy() -> None:
    runner = ScriptedRunner()
    Zpool(runner).export_pool(LABEL, "secretpool")
    assert runner.argvs() == [("zpool", "export", "secretpool")]
    busy = ScriptedRunner().on("zpool", "export", reply=Reply(
        stderr="cannot unmount '/secretpool/data': pool or dataset is busy\n", returncode=1))
    with pytest.raises(VolumeBusy, match="pool or dataset is busy"):
        Zpool(busy).export_pool(LABEL, "secretpool")


def test_other_export_failures_point_at_zpool_status() -> None:
    runner = ScriptedRunner().on("zpool", "export", reply=Reply(stderr="I/O error\n",
                                                                 returncode=1))
    with pytest.raises(StorageError, match="could not export pool secretpool") as info:
        Zpool(runner).export_pool(LABEL, "secretpool")
    assert "zpool status -P secretpool" in str(info.value.fix)
