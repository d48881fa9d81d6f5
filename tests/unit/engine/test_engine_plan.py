"""plan_unlock / plan_lock / assess as tables over observed kernel states."""

from __future__ import annotations

import pytest

from keyd.config import Volume, parse_config
from keyd.engine.assess import assess
from keyd.engine.errors import DegradedRefused, DevicesMissing, StorageError
from keyd.engine.observed import (
    DmMapping,
    LoopDevice,
    MdArray,
    MountEntry,
    ObservedState,
    RaidMembers,
)
from keyd.engine.plan import (
    AssembleRaid,
    AttachLoop,
    CloseCrypt,
    DetachLoop,
    LayerRef,
    Mount,
    OpenCrypt,
    ReAddMember,
    StopRaid,
    Unmount,
    WaitForMembers,
    plan_lock,
    plan_unlock,
    undo_step,
)
from tests import configs

UUID = "6b8b4567327b23c6643c986966334873"


def volume_of(text: str, name: str = "tank") -> Volume:
    return parse_config(text, "t.toml").volume(name)


def seed001(degraded: str = "never") -> Volume:
    return volume_of(configs.seed_001(UUID, volume="tank", crypt_name="crypt0", key=None,
                                      degraded=degraded, mountpoint="/srv/tank"))


def seed003() -> Volume:
    return volume_of(configs.seed_003("/dev/disk/by-id/disk-part2", root="/mnt/root"), "work")


MEMBERS3 = RaidMembers(UUID, 3, ("/dev/sdb", "/dev/sdc", "/dev/sdd"))
MEMBERS2 = RaidMembers(UUID, 3, ("/dev/sdb", "/dev/sdc"))
OWN_MD = MdArray("md127", UUID, "/dev/md/keyd-tank-md0", "clean", "raid5", 3, 0,
                 members=("sdb", "sdc", "sdd"))
OWN_DM = DmMapping("dm-0", "keyd-tank-crypt0", "CRYPT-PLAIN-keyd-tank-crypt0", ("md127",))
DEVNOS = {"md127": "9:127", "dm-0": "253:0", "dm-1": "253:1", "sdb2": "8:18",
          "loop0": "7:0"}
DATA_MOUNT = MountEntry(40, 1, "253:0", "/", "/srv/tank", "xfs", "/dev/mapper/keyd-tank-crypt0",
                        source_kname="dm-0")


def observed(**fields: object) -> ObservedState:
    fields.setdefault("devnos", DEVNOS)
    return ObservedState(**fields)  # type: ignore[arg-type]


def kinds(steps: object) -> list[str]:
    return [type(step).__name__ for step in steps]  # type: ignore[attr-defined]


def test_unlock_from_nothing_opens_every_layer_bottom_up() -> None:
    plan = plan_unlock(seed001(), observed(raid_members=(MEMBERS3,)))
    assert kinds(plan.steps) == ["AssembleRaid", "OpenCrypt", "Mount"]
    assemble, crypt, mount = plan.steps
    assert assemble == AssembleRaid("md0", UUID, "keyd-tank-md0",
                                    MEMBERS3.devices, run=False)
    assert isinstance(crypt, OpenCrypt) and crypt.dm_name == "keyd-tank-crypt0"
    assert crypt.source == LayerRef("md0") and crypt.volume == "tank"
    assert mount == Mount("data", LayerRef("crypt0"), "/srv/tank", "xfs", ())


def test_unlock_twice_plans_nothing_and_reports_devices() -> None:
    state = observed(md=(OWN_MD,), dm=(OWN_DM,), mounts=(DATA_MOUNT,),
                     raid_members=(MEMBERS3,))
    plan = plan_unlock(seed001(), state)
    assert plan.steps == ()
    assert plan.devices == {"md0": "/dev/md127", "crypt0": "/dev/mapper/keyd-tank-crypt0",
                            "data": "/dev/dm-0"}


def test_unlock_after_crash_resumes_above_what_is_open() -> None:
    plan = plan_unlock(seed001(), observed(md=(OWN_MD,), dm=(OWN_DM,)))
    assert kinds(plan.steps) == ["Mount"]
    assert plan.devices["crypt0"] == "/dev/mapper/keyd-tank-crypt0"


@pytest.mark.parametrize(("policy", "expected"), [
    ("always", ["AssembleRaid", "OpenCrypt", "Mount"]),
    ("after=30", ["WaitForMembers", "AssembleRaid", "OpenCrypt", "Mount"]),
])
def test_degraded_policy_allows_a_missing_member(policy: str, expected: list[str]) -> None:
    plan = plan_unlock(seed001(policy), observed(raid_members=(MEMBERS2,)))
    assert kinds(plan.steps) == expected
    assemble = next(s for s in plan.steps if isinstance(s, AssembleRaid))
    assert assemble.run and assemble.members == MEMBERS2.devices
    if policy.startswith("after"):
        assert plan.steps[0] == WaitForMembers("md0", UUID, 3, 30.0)


def test_degraded_policy_never_refuses_before_touching_anything() -> None:
    with pytest.raises(DegradedRefused) as info:
        plan_unlock(seed001("never"), observed(raid_members=(MEMBERS2,)))
    assert "2 of 3 members" in str(info.value) and "degraded" in str(info.value.fix)


def test_no_members_found_is_a_clear_error() -> None:
    with pytest.raises(DevicesMissing, match="no member of raid layer md0"):
        plan_unlock(seed001("always"), observed())


@pytest.mark.parametrize(("policy", "refused"), [("never", True), ("always", False)])
def test_an_array_started_degraded_outside_keyd_follows_the_policy(policy: str,
                                                                    refused: bool) -> None:
    # udev's incremental assembly, or Debian's mdadm-last-resort@.timer, started it with 2 of 3.
    running = MdArray("md0", UUID, "/dev/md/host:0", "clean", "raid5", 3, 1,
                      members=("sdb", "sdc"))
    if refused:
        with pytest.raises(DegradedRefused, match="already running degraded") as info:
            plan_unlock(seed001(policy), observed(md=(running,)))
        assert "mdadm-last-resort@.timer" in str(info.value.fix)
    else:
        assert kinds(plan_unlock(seed001(policy), observed(md=(running,))).steps) == \
            ["OpenCrypt", "Mount"]


def test_a_member_that_comes_back_to_a_degraded_array_is_re_added() -> None:
    degraded = MdArray("md127", UUID, "/dev/md/keyd-tank-md0", "clean", "raid5", 3, 1,
                       members=("sdb", "sdc"))
    plan = plan_unlock(seed001("always"), observed(md=(degraded,), raid_members=(MEMBERS3,)))
    assert plan.steps[0] == ReAddMember("md0", "/dev/md127", "/dev/sdd")
    assert kinds(plan.steps[1:]) == ["OpenCrypt", "Mount"]
    whole = MdArray("md127", UUID, "/dev/md/keyd-tank-md0", "clean", "raid5", 3, 0,
                    members=("sdb", "sdc", "sdd"))
    assert kinds(plan_unlock(seed001("always"), observed(md=(whole,), raid_members=(MEMBERS3,))
                             ).steps) == ["OpenCrypt", "Mount"]


def test_inactive_array_gathered_by_udev_is_stopped_and_assembled_under_keyds_name() -> None:
    inactive = MdArray("md127", UUID, "", "inactive", "", 3, 0, members=("sdb", "sdc", "sdd"))
    plan = plan_unlock(seed001(), observed(md=(inactive,)))
    assert plan.steps[:2] == (
        StopRaid("md0", "/dev/md127"),
        AssembleRaid("md0", UUID, "keyd-tank-md0", ("/dev/sdb", "/dev/sdc", "/dev/sdd"), False))


def test_inactive_degraded_array_follows_the_policy() -> None:
    inactive = MdArray("md127", UUID, "", "inactive", "", 3, 0, members=("sdb", "sdc"))
    with pytest.raises(DegradedRefused):
        plan_unlock(seed001("never"), observed(md=(inactive,)))
    plan = plan_unlock(seed001("always"), observed(md=(inactive,)))
    assert plan.steps[:2] == (
        StopRaid("md0", "/dev/md127"),
        AssembleRaid("md0", UUID, "keyd-tank-md0", ("/dev/sdb", "/dev/sdc"), True))
    waiting = plan_unlock(seed001("after=5"), observed(md=(inactive,))).steps
    assert [type(step) for step in waiting[:3]] == [WaitForMembers, StopRaid, AssembleRaid]


def test_inactive_array_without_raid_disks_uses_the_superblock_count() -> None:
    inactive = MdArray("md127", UUID, "", "inactive", "", 0, 0, members=("sdb", "sdc"))
    with pytest.raises(DegradedRefused, match="2 of 3 members"):
        plan_unlock(seed001("never"), observed(md=(inactive,), raid_members=(MEMBERS2,)))


def test_array_assembled_by_someone_else_is_used_but_never_stopped() -> None:
    foreign_md = MdArray("md0", UUID, "/dev/md/host:0", "clean", "raid5", 3, 0,
                         members=("sdb", "sdc", "sdd"))
    unlock = plan_unlock(seed001(), observed(md=(foreign_md,)))
    assert kinds(unlock.steps) == ["OpenCrypt", "Mount"]
    mapping = DmMapping("dm-0", "keyd-tank-crypt0", "CRYPT-PLAIN-keyd-tank-crypt0", ("md0",))
    lock = plan_lock(seed001(), observed(md=(foreign_md,), dm=(mapping,), mounts=(DATA_MOUNT,)))
    assert lock.steps == (Unmount("data", "/srv/tank"), CloseCrypt("crypt0", "keyd-tank-crypt0"))


def test_lock_closes_owned_layers_top_down() -> None:
    state = observed(md=(OWN_MD,), dm=(OWN_DM,), mounts=(DATA_MOUNT,))
    plan = plan_lock(seed001(), state)
    assert plan.steps == (Unmount("data", "/srv/tank"),
                          CloseCrypt("crypt0", "keyd-tank-crypt0"),
                          StopRaid("md0", "/dev/md127"))


def test_lock_of_a_locked_volume_plans_nothing() -> None:
    assert plan_lock(seed001(), observed(raid_members=(MEMBERS3,))).steps == ()


@pytest.mark.parametrize(("mapping", "words"), [
    (DmMapping("dm-0", "keyd-tank-crypt0", "", ("md127",)), "was not made by cryptsetup"),
    (DmMapping("dm-0", "keyd-tank-crypt0", "CRYPT-LUKS2-0b0b-keyd-tank-crypt0", ("md127",)),
     "for a plain layer"),
    (DmMapping("dm-0", "md0_crypt", "CRYPT-PLAIN-md0_crypt", ("md127",)),
     "in use by device-mapper device md0_crypt"),
    (DmMapping("dm-0", "keyd-tank-crypt0", "CRYPT-PLAIN-keyd-tank-crypt0", ("sdz",)),
     "open on another device"),
])
def test_foreign_or_misplaced_mappings_stop_the_unlock(mapping: DmMapping, words: str) -> None:
    state = observed(md=(OWN_MD,), dm=(mapping,))
    with pytest.raises(StorageError) as info:
        plan_unlock(seed001(), state)
    assert words in str(info.value) and info.value.fix


def test_foreign_mapping_is_never_planned_for_closing() -> None:
    foreign = DmMapping("dm-0", "keyd-tank-crypt0", "", ("md127",))
    plan = plan_lock(seed001(), observed(md=(OWN_MD,), dm=(foreign,)))
    assert plan.steps == (StopRaid("md0", "/dev/md127"),)


@pytest.mark.parametrize(("mount", "words"), [
    (MountEntry(41, 1, "8:33", "/", "/srv/tank", "ext4", "/dev/sdc1", source_kname="sdc1"),
     "already has /dev/sdc1"),
    (MountEntry(41, 1, "253:0", "/", "/elsewhere", "xfs", "/dev/dm-0", source_kname="dm-0"),
     "already mounted at /elsewhere"),
])
def test_mount_conflicts_stop_the_unlock(mount: MountEntry, words: str) -> None:
    state = observed(md=(OWN_MD,), dm=(OWN_DM,), mounts=(mount,))
    with pytest.raises(StorageError, match=words):
        plan_unlock(seed001(), state)


def test_device_mounted_directly_blocks_a_crypt_layer() -> None:
    mount = MountEntry(41, 1, "9:127", "/", "/mnt/raw", "xfs", "/dev/md127",
                       source_kname="md127")
    with pytest.raises(StorageError, match="mounted at /mnt/raw"):
        plan_unlock(seed001(), observed(md=(OWN_MD,), mounts=(mount,)))


def test_tcrypt_cascade_helpers_count_as_keyd_owned() -> None:
    top = DmMapping("dm-1", "keyd-work-tc", "CRYPT-TCRYPT-keyd-work-tc", ("dm-0",))
    helper = DmMapping("dm-0", "keyd-work-tc_1", "CRYPT-SUBDEV-keyd-work-tc_1", ("sdb2",))
    state = observed(dm=(top, helper), paths={"/dev/disk/by-id/disk-part2": "sdb2"})
    plan = plan_unlock(seed003(), state)
    assert kinds(plan.steps) == ["Mount", "AttachLoop", "Mount"]


def test_leftover_cascade_helper_is_reported() -> None:
    helper = DmMapping("dm-0", "keyd-work-tc_1", "CRYPT-SUBDEV-keyd-work-tc_1", ("sdb2",))
    state = observed(dm=(helper,), paths={"/dev/disk/by-id/disk-part2": "sdb2"})
    with pytest.raises(StorageError, match="leftover helper mapping keyd-work-tc_1"):
        plan_unlock(seed003(), state)


def test_missing_bottom_device_is_reported_with_its_path() -> None:
    with pytest.raises(StorageError, match="device /dev/disk/by-id/disk-part2 is not present"):
        plan_unlock(seed003(), observed())


def test_seed003_unlock_and_lock_order() -> None:
    state = observed(paths={"/dev/disk/by-id/disk-part2": "sdb2"})
    unlock = plan_unlock(seed003(), state)
    assert kinds(unlock.steps) == ["OpenCrypt", "Mount", "AttachLoop", "Mount"]
    assert unlock.steps[2] == AttachLoop("img", "/media/winroot/rootfs", False)
    assert unlock.steps[3] == Mount("root", LayerRef("img"), "/mnt/root", "ext3", ())
    tc = DmMapping("dm-1", "keyd-work-tc", "CRYPT-TCRYPT-keyd-work-tc", ("sdb2",))
    ntfs = MountEntry(50, 1, "253:1", "/", "/media/winroot", "fuseblk",
                      "/dev/mapper/keyd-work-tc", source_kname="dm-1")
    root = MountEntry(51, 50, "7:0", "/", "/mnt/root", "ext3", "/dev/loop0",
                      source_kname="loop0")
    loop = LoopDevice("loop0", "/media/winroot/rootfs")
    full = observed(paths=state.paths, dm=(tc,), mounts=(ntfs, root), loops=(loop,))
    assert plan_unlock(seed003(), full).steps == ()
    assert plan_lock(seed003(), full).steps == (
        Unmount("root", "/mnt/root"), DetachLoop("img", "/dev/loop0"),
        Unmount("ntfs", "/media/winroot"), CloseCrypt("tc", "keyd-work-tc"))


def test_explicit_member_list_counts_only_present_devices() -> None:
    volume = volume_of(configs.layer("tank", "md0", "raid", uuid=UUID, degraded="always",
                                     devices=["/dev/disk/by-id/a", "/dev/disk/by-id/b"]))
    plan = plan_unlock(volume, observed(paths={"/dev/disk/by-id/a": "sdb"}))
    assert plan.steps == (AssembleRaid("md0", UUID, "keyd-tank-md0",
                                       ("/dev/disk/by-id/a",), run=True),)


def test_assess_reports_degraded_and_recovery() -> None:
    recovering = MdArray("md127", UUID, "keyd-tank-md0", "clean", "raid5", 3, 1, "recover",
                         "50 / 200", ("sdb", "sdc", "sdd"))
    status = assess(seed001(), observed(md=(recovering,)))["md0"]
    assert status.open and status.owned and status.degraded
    assert status.detail == "raid5, degraded (2 of 3), recovering 25%"


@pytest.mark.parametrize(("array", "detail"), [
    (MdArray("md1", UUID, array_state="inactive", raid_disks=3, members=("sdb",)),
     "assembled but not started (1 of 3 members)"),
    (MdArray("md1", UUID, level="raid1", sync_action="resync", sync_completed="none"),
     "raid1, resyncing"),
])
def test_assess_raid_details(array: MdArray, detail: str) -> None:
    assert assess(seed001(), observed(md=(array,)))["md0"].detail == detail


def test_assess_counts_members_of_a_locked_array() -> None:
    status = assess(seed001(), observed(raid_members=(MEMBERS2,)))["md0"]
    assert not status.open and status.detail == "2 of 3 members present"


@pytest.mark.parametrize(("step", "device", "undo"), [
    (AssembleRaid("md0", UUID, "keyd-tank-md0", (), False), "/dev/md127",
     StopRaid("md0", "/dev/md127")),
    (AttachLoop("img", "/m/rootfs", False), "/dev/loop3", DetachLoop("img", "/dev/loop3")),
    (Mount("m", "/dev/x", "/m", "ext4", ()), None, Unmount("m", "/m")),
    (WaitForMembers("md0", UUID, 3, 1.0), None, None),
])
def test_undo_of_each_step(step: object, device: str | None, undo: object) -> None:
    assert undo_step(step, device) == undo  # type: ignore[arg-type]


def test_undo_of_open_crypt_closes_the_same_name() -> None:
    step = plan_unlock(seed001(), observed(md=(OWN_MD,))).steps[0]
    assert undo_step(step, None) == CloseCrypt("crypt0", "keyd-tank-crypt0")


def test_every_step_describes_itself() -> None:
    steps = [*plan_unlock(seed001("after=5"), observed(raid_members=(MEMBERS2,))).steps,
             AttachLoop("i", "/x/img", True),
             *plan_lock(seed003(), observed(
                 paths={"/dev/disk/by-id/disk-part2": "sdb2"},
                 dm=(DmMapping("dm-1", "keyd-work-tc", "CRYPT-TCRYPT-keyd-work-tc", ("sdb2",)),),
                 loops=(LoopDevice("loop0", "/media/winroot/rootfs"),))).steps,
             StopRaid("md0", "/dev/md1")]
    texts = [step.describe() for step in steps]
    assert all(texts) and len(set(texts)) == len(texts)
