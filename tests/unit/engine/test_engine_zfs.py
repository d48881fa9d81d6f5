"""zfs layers in the engine: assess, plan (degraded never/always), execute, roll back, report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from keyd.config import CryptLayer, Volume, parse_config
from keyd.config.model import ZfsLayer
from keyd.engine.assess import assess
from keyd.engine.errors import DegradedRefused, Holder, StorageError, VolumeBusy
from keyd.engine.executor import Executor
from keyd.engine.observed import DmMapping, MountEntry, ObservedState, PoolVdev, ZfsPool
from keyd.engine.plan import (
    CloseCrypt,
    ExportPool,
    ImportPool,
    LayerRef,
    OnlineVdev,
    OpenCrypt,
    plan_lock,
    plan_unlock,
    undo_step,
    vdev_keys,
)
from keyd.engine.pool_records import MemoryRecords
from keyd.engine.ports import Storage
from keyd.engine.status import render_table, report, to_json
from tests import configs

GUID = "16093900627180053822"
TC1, TC2 = "/dev/mapper/keyd-secret-tc1", "/dev/mapper/keyd-secret-tc2"


def seed002(degraded: str = "never", keys: tuple[str, str] = ("k1", "k2")) -> Volume:
    return parse_config(configs.seed_002("/dev/vdb", "/dev/vdc", volume="secret", keys=keys,
                                         degraded=degraded, services=["smbd.service"]),
                        "t.toml").volume("secret")


DISKS = {"/dev/vdb": "vdb", "/dev/vdc": "vdc"}
MAPPINGS = (DmMapping("dm-0", "keyd-secret-tc1", "CRYPT-TCRYPT-keyd-secret-tc1", ("vdb",)),
            DmMapping("dm-1", "keyd-secret-tc2", "CRYPT-TCRYPT-keyd-secret-tc2", ("vdc",)))


def pool(health: str = "ONLINE", vdevs: tuple[str, ...] = (TC1, TC2),
         name: str = "secretpool") -> ZfsPool:
    return ZfsPool(name, GUID, health, tuple(PoolVdev(v, "ONLINE") for v in vdevs),
                   scan="scrub repaired 0B in 00:00:01 with 0 errors on Mon Nov 23 2026")


LOCKED = ObservedState(paths=DISKS)
IMPORTED = ObservedState(paths=DISKS, dm=MAPPINGS, pools=(pool(),),
                         keyd_pools={"secret/pool": GUID})


def kinds(steps: Sequence[object]) -> list[str]:
    return [type(step).__name__ for step in steps]


# ---- assess and plan -------------------------------------------------------------------------

def test_unlock_opens_both_vdev_layers_then_imports() -> None:
    plan = plan_unlock(seed002(), LOCKED, {"k1", "k2"})
    assert kinds(plan.steps) == ["OpenCrypt", "OpenCrypt", "ImportPool"]
    assert plan.steps[2] == ImportPool("secret", seed002().layer("pool"))  # type: ignore[arg-type]


def test_unlock_twice_plans_nothing() -> None:
    assert plan_unlock(seed002(), IMPORTED).steps == ()


@pytest.mark.parametrize(("observed", "available", "words"), [
    (LOCKED, {"k1"}, "without tc2 (tc2: no key 'k2' was given)"),
    (replace(LOCKED, paths={"/dev/vdb": "vdb"}), None,
     "without tc2 (tc2: device /dev/vdc is not present)"),
])
def test_degraded_never_refuses_before_anything_opens(observed: ObservedState,
                                                      available: set[str] | None,
                                                      words: str) -> None:
    with pytest.raises(DegradedRefused, match="degraded policy is never") as info:
        plan_unlock(seed002("never"), observed, available)
    assert words in str(info.value)
    assert 'degraded = "always"' in str(info.value.fix)


def test_degraded_always_opens_what_it_can_and_imports_degraded() -> None:
    plan = plan_unlock(seed002("always"), LOCKED, {"k1"})
    assert kinds(plan.steps) == ["OpenCrypt", "ImportPool"]
    assert isinstance(plan.steps[0], OpenCrypt) and plan.steps[0].layer.name == "tc1"
    assert isinstance(plan.steps[1], ImportPool) and plan.steps[1].missing == ("tc2",)
    assert "DEGRADED, without tc2" in plan.steps[1].describe()


DEGRADED_ONE_SIDE = replace(IMPORTED, dm=MAPPINGS[:1], pools=(pool("DEGRADED"),))


def test_a_pool_imported_degraded_gets_its_late_side_back() -> None:
    plan = plan_unlock(seed002("always"), DEGRADED_ONE_SIDE, {"k1", "k2"})
    assert kinds(plan.steps) == ["OpenCrypt", "OnlineVdev"]
    assert plan.steps[1] == OnlineVdev("tc2", "secretpool", LayerRef("tc2"))
    assert plan.devices == {"tc1": TC1, "pool": "secretpool"}


@pytest.mark.parametrize(("observed", "available"), [
    (replace(DEGRADED_ONE_SIDE, paths={"/dev/vdb": "vdb"}), {"k1", "k2"}),  # disk still gone
    (DEGRADED_ONE_SIDE, {"k1"}),                                             # no key for it
    (replace(DEGRADED_ONE_SIDE, keyd_pools={}), {"k1", "k2"}),              # not keyd's import
])
def test_a_late_side_that_cannot_open_leaves_the_pool_as_it_is(
        observed: ObservedState, available: set[str]) -> None:
    plan = plan_unlock(seed002("always"), observed, available)
    assert plan.steps == ()
    assert plan.devices == {"tc1": TC1, "pool": "secretpool"}


def test_degraded_always_still_needs_one_vdev() -> None:
    with pytest.raises(DegradedRefused, match="no vdev layer of zfs layer pool"):
        plan_unlock(seed002("always"), LOCKED, set())


def test_shared_key_counts_for_both_layers() -> None:
    plan = plan_unlock(seed002("never", ("same", "same")), LOCKED, {"same"})
    assert kinds(plan.steps) == ["OpenCrypt", "OpenCrypt", "ImportPool"]
    assert vdev_keys(seed002("never", ("same", "same"))) == {"same"}


def test_assess_reads_health_vdevs_and_ownership() -> None:
    status = assess(seed002(), IMPORTED)["pool"]
    assert (status.open, status.owned, status.degraded, status.problem) == (True, True, False, None)
    assert status.detail.startswith("pool secretpool ONLINE, last scan: scrub repaired 0B")
    degraded = replace(IMPORTED, pools=(pool("DEGRADED"),))
    assert assess(seed002(), degraded)["pool"].degraded


def test_pool_without_keyds_record_is_not_keyds() -> None:
    status = assess(seed002(), replace(IMPORTED, keyd_pools={}))["pool"]
    assert (status.open, status.owned) == (True, False)
    other_guid = replace(IMPORTED, keyd_pools={"secret/pool": "1"})
    assert not assess(seed002(), other_guid)["pool"].owned


def test_lock_exports_then_closes_top_down() -> None:
    plan = plan_lock(seed002(), IMPORTED)
    assert plan.steps == (ExportPool("secret", "pool", "secretpool"),
                          CloseCrypt("tc2", "keyd-secret-tc2"),
                          CloseCrypt("tc1", "keyd-secret-tc1"))


def test_lock_refuses_a_pool_keyd_did_not_import() -> None:
    with pytest.raises(StorageError, match="was not imported by keyd") as info:
        plan_lock(seed002(), replace(IMPORTED, keyd_pools={}))
    assert "zpool export secretpool" in str(info.value.fix)


def test_a_same_named_pool_on_other_devices_blocks_the_unlock() -> None:
    foreign = ObservedState(paths=DISKS, pools=(pool(vdevs=("/dev/sda3",)),))
    status = assess(seed002(), foreign)["pool"]
    assert (status.open, status.problem is not None) == (False, True)
    with pytest.raises(StorageError, match="not this layer's mappings: /dev/sda3"):
        plan_unlock(seed002(), foreign)
    assert plan_lock(seed002(), foreign).steps == ()  # never exported by keyd


@pytest.mark.parametrize("path", [TC2, "/dev/disk/by-id/dm-name-keyd-secret-tc2", "/dev/dm-1"])
def test_vdevs_found_under_any_dev_spelling(path: str) -> None:
    observed = replace(IMPORTED, pools=(pool(vdevs=(TC1, path)),))
    assert assess(seed002(), observed)["pool"].owned


def test_undo_of_an_import_exports_the_imported_name() -> None:
    step = ImportPool("secret", seed002().layer("pool"))  # type: ignore[arg-type]
    assert undo_step(step, "secretpool") == ExportPool("secret", "pool", "secretpool")


# ---- status ----------------------------------------------------------------------------------

def test_status_shows_health_each_vdev_and_the_last_scrub() -> None:
    observed = replace(IMPORTED, pools=(replace(pool("DEGRADED"), vdevs=(
        PoolVdev(TC1, "ONLINE", "0 0 0"), PoolVdev(TC2, "UNAVAIL", "0 0 0"))),),
        dm=MAPPINGS[:1])
    rep = report(seed002("always"), observed)
    assert rep.state == "unlocked (degraded)"  # tc2 shut under an imported pool is not partial
    table = render_table([rep])
    assert "pool secretpool DEGRADED, last scan: scrub repaired 0B" in table
    assert any(line.split()[:4] == ["tc2", "vdev", "UNAVAIL", TC2] for line in
               table.splitlines())
    layer = to_json([rep])["volumes"][0]["layers"][0]
    assert layer["pool"]["health"] == "DEGRADED"
    assert [(v["layer"], v["state"]) for v in layer["pool"]["vdevs"]] == \
        [("tc1", "ONLINE"), ("tc2", "UNAVAIL")]


def test_status_of_a_locked_pool() -> None:
    rep = report(seed002(), LOCKED)
    assert rep.state == "locked"
    assert to_json([rep])["volumes"][0]["layers"][0]["pool"] is None


# ---- executor --------------------------------------------------------------------------------

@dataclass
class FakeZfsKernel:
    """Crypt and zfs ports with effects recorded; ``health`` is what an import reports."""

    health: str = "ONLINE"
    fail: dict[str, BaseException] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    busy: list[Holder] = field(default_factory=list)

    def _do(self, event: str) -> None:
        if event in self.fail:
            raise self.fail[event]
        self.events.append(event)

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        self._do(f"open {dm_name}")
        return f"/dev/mapper/{dm_name}"

    def close(self, dm_name: str) -> None:
        self._do(f"close {dm_name}")

    def import_pool(self, label: str, layer: ZfsLayer) -> ZfsPool:
        self._do(f"import {layer.target}")
        return ZfsPool("secretpool", GUID, self.health)

    def export_pool(self, label: str, pool: str) -> None:
        self._do(f"export {pool}")

    def online(self, label: str, pool: str, device: str) -> None:
        self._do(f"online {pool} {device}")

    def holders(self, paths: Sequence[str]) -> list[Holder]:
        self.events.append(f"holders {' '.join(paths)}")
        return [h for h in self.busy if any(h.path.startswith(p) for p in paths)]

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        return LOCKED

    def stop(self, units: Sequence[str]) -> None:
        self.events.append("stop services")

    def start(self, units: Sequence[str]) -> None:
        self.events.append("start services")


class Keys:
    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        return bytearray(b"secret")


def executor(kernel: FakeZfsKernel, records: MemoryRecords) -> Executor:
    unused = kernel  # raid, mounts and loops are never called for seed 002
    return Executor(Storage(kernel, unused, unused, unused, kernel),  # type: ignore[arg-type]
                    Keys(), kernel, kernel, kernel, records=records)


def test_unlock_imports_and_records_the_pool() -> None:
    kernel, records = FakeZfsKernel(), MemoryRecords()
    run = executor(kernel, records)
    devices = run.unlock(seed002(), plan_unlock(seed002(), LOCKED))
    assert kernel.events == ["open keyd-secret-tc1", "open keyd-secret-tc2", "import secretpool"]
    assert devices["pool"] == "secretpool"
    assert records.records == {"secret/pool": GUID}
    assert run.degraded == []


def test_failed_import_closes_both_mappings_again() -> None:
    kernel = FakeZfsKernel(fail={"import secretpool": StorageError("no such pool")})
    records = MemoryRecords()
    with pytest.raises(StorageError, match="no such pool") as info:
        executor(kernel, records).unlock(seed002(), plan_unlock(seed002(), LOCKED))
    assert kernel.events[-2:] == ["close keyd-secret-tc2", "close keyd-secret-tc1"]
    assert info.value.rollback_failures == []  # type: ignore[attr-defined]
    assert records.records == {}


def test_degraded_import_under_never_is_exported_and_rolled_back() -> None:
    kernel, records = FakeZfsKernel(health="DEGRADED"), MemoryRecords()
    with pytest.raises(DegradedRefused, match=r"imported DEGRADED .*policy is never"):
        executor(kernel, records).unlock(seed002(), plan_unlock(seed002(), LOCKED))
    assert kernel.events == ["open keyd-secret-tc1", "open keyd-secret-tc2", "import secretpool",
                             "export secretpool", "close keyd-secret-tc2",
                             "close keyd-secret-tc1"]
    assert records.records == {}


def test_degraded_import_under_always_is_said() -> None:
    kernel, records = FakeZfsKernel(health="DEGRADED"), MemoryRecords()
    run = executor(kernel, records)
    plan = plan_unlock(seed002("always"), LOCKED, {"k1"})
    run.unlock(seed002("always"), plan)
    assert kernel.events == ["open keyd-secret-tc1", "import secretpool"]
    assert run.degraded == ["zfs pool secretpool of layer pool of volume secret was imported "
                            "DEGRADED (without tc2)"]


def test_a_side_missing_since_the_pool_was_made_is_absent_not_foreign() -> None:
    # zfs names the missing vdev by the path it had when the pool was created.
    made = ZfsPool("secretpool", GUID, "DEGRADED", (PoolVdev(TC1, "ONLINE"),
                                                     PoolVdev("/dev/mapper/truecrypt2", "UNAVAIL")))
    observed = replace(DEGRADED_ONE_SIDE, pools=(made,))
    status = assess(seed002("always"), observed)["pool"]
    assert status.open and status.degraded and status.problem is None
    # keyd cannot online it under another name: the next import (lock, unlock) finds it.
    assert plan_unlock(seed002("always"), observed, {"k1", "k2"}).steps == ()


def test_a_late_side_is_opened_and_onlined_and_said() -> None:
    kernel, records = FakeZfsKernel(), MemoryRecords()
    run = executor(kernel, records)
    run.unlock(seed002("always"), plan_unlock(seed002("always"), DEGRADED_ONE_SIDE))
    assert kernel.events == ["open keyd-secret-tc2", f"online secretpool {TC2}"]
    assert run.mended == [f"tc2 ({TC2}) is back in zfs pool secretpool; zfs resilvers it"]


def test_a_late_side_zfs_refuses_is_closed_again() -> None:
    kernel = FakeZfsKernel(fail={f"online secretpool {TC2}": StorageError("cannot online")})
    with pytest.raises(StorageError, match="cannot online"):
        executor(kernel, MemoryRecords()).unlock(
            seed002("always"), plan_unlock(seed002("always"), DEGRADED_ONE_SIDE))
    assert kernel.events == ["open keyd-secret-tc2", "close keyd-secret-tc2"]


def test_lock_exports_forgets_the_record_and_closes() -> None:
    kernel, records = FakeZfsKernel(), MemoryRecords({"secret/pool": GUID})
    executor(kernel, records).lock(seed002(), plan_lock(seed002(), IMPORTED), IMPORTED)
    assert kernel.events[1:] == ["export secretpool", "close keyd-secret-tc2",
                                 "close keyd-secret-tc1"]
    assert records.records == {}


def test_lock_refuses_while_a_dataset_is_in_use_naming_the_pid() -> None:
    mounted = replace(IMPORTED, mounts=(
        MountEntry(1, 0, "0:50", "/", "/secretpool", "zfs", "secretpool"),
        MountEntry(2, 1, "0:51", "/", "/secretpool/data", "zfs", "secretpool/data"),
        MountEntry(3, 1, "0:52", "/", "/secretpoolx", "zfs", "secretpoolx")))
    kernel = FakeZfsKernel(busy=[Holder(4242, "bash", "cwd in", "/secretpool/data/x")])
    records = MemoryRecords({"secret/pool": GUID})
    with pytest.raises(VolumeBusy) as info:
        executor(kernel, records).lock(seed002(), plan_lock(seed002(), mounted), mounted)
    assert "pid 4242 (bash): cwd in /secretpool/data/x" in str(info.value)
    assert kernel.events[0] == f"holders /secretpool /secretpool/data {TC2} /dev/dm-1 {TC1} " \
                               "/dev/dm-0"
    assert records.records == {"secret/pool": GUID}  # nothing exported


def test_lock_refuses_a_foreign_mount_inside_a_dataset() -> None:
    mounted = replace(IMPORTED, mounts=(
        MountEntry(1, 0, "0:50", "/", "/secretpool", "zfs", "secretpool"),
        MountEntry(2, 1, "8:1", "/", "/secretpool/usb", "vfat", "/dev/sda1")))
    with pytest.raises(VolumeBusy, match="/dev/sda1 is mounted at /secretpool/usb"):
        executor(FakeZfsKernel(), MemoryRecords()).lock(
            seed002(), plan_lock(seed002(), mounted), mounted)
