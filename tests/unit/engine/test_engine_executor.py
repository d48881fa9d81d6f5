"""Executor: transactional unlock with rollback, busy-aware lock, waiting for RAID members."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from keyd.config import CryptLayer, Volume, parse_config
from keyd.engine.errors import Holder, KeyRejected, StorageError, VolumeBusy
from keyd.engine.executor import Executor
from keyd.engine.observed import DmMapping, MdArray, MountEntry, ObservedState, RaidMembers
from keyd.engine.plan import (
    AssembleRaid,
    AttachLoop,
    CloseCrypt,
    LayerRef,
    Mount,
    OpenCrypt,
    Plan,
    ReAddMember,
    StopRaid,
    Unmount,
    WaitForMembers,
    plan_unlock,
)
from keyd.engine.ports import Storage
from tests import configs

UUID = "6b8b4567327b23c6643c986966334873"


def volume(crypt_type: str = "luks") -> Volume:
    crypt = configs.PLAIN_2006 if crypt_type == "plain" else configs.LUKS
    return parse_config(configs.raid_crypt_mount(
        "tank", UUID, crypt, names=("md0", "crypt0", "data"), degraded="after=5", fstype="xfs",
        mountpoint="/srv/tank", services=["smbd.service"]), "t.toml").volume("tank")


class Boom(StorageError):
    """An injected failure."""


@dataclass
class FakeKernel:
    """Implements every port; records effects; fails where told to."""

    fail: dict[str, BaseException] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    keys_seen: list[bytes] = field(default_factory=list)
    member_scans: list[tuple[str, ...]] = field(default_factory=list)
    busy: list[Holder] = field(default_factory=list)
    arrays: tuple[MdArray, ...] = ()  # what observe shows of md arrays

    def _do(self, event: str) -> None:
        if event in self.fail:
            raise self.fail[event]
        self.events.append(event)

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        self.keys_seen.append(bytes(key))
        self._do(f"open {dm_name} on {device}")
        return f"/dev/mapper/{dm_name}"

    def close(self, dm_name: str) -> None:
        self._do(f"close {dm_name}")

    def assemble(self, label: str, md_name: str, uuid: str, members: Sequence[str],
                 *, run: bool) -> str:
        self._do(f"assemble {md_name} {','.join(members)} run={run}")
        return f"/dev/md/{md_name}"

    def stop(self, label: str, device: str) -> None:
        self._do(f"stop {device}")

    def re_add(self, label: str, device: str, member: str) -> None:
        self._do(f"re-add {member} to {device}")

    def mount(self, label: str, source: str, mountpoint: str, fstype: str,
              options: Sequence[str]) -> None:
        self._do(f"mount {source} {mountpoint}")

    def unmount(self, label: str, mountpoint: str) -> None:
        self._do(f"umount {mountpoint}")

    def attach(self, label: str, image: str, *, read_only: bool) -> str:
        self._do(f"attach {image}")
        return "/dev/loop0"

    def detach(self, label: str, device: str) -> None:
        self._do(f"detach {device}")

    def autoclear(self, label: str, device: str) -> None:
        self._do(f"autoclear {device}")

    def quiesce(self, label: str, mountpoint: str) -> str:
        self._do(f"quiesce {mountpoint}")
        return f"{mountpoint}: synced"

    def holders(self, paths: Sequence[str]) -> list[Holder]:
        self.events.append(f"holders {' '.join(paths)}")
        return [h for h in self.busy
                if any(h.path == p or h.path.startswith(p + "/") for p in paths)]

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        if not self.member_scans:
            return ObservedState(md=self.arrays)
        devices = self.member_scans.pop(0) if len(self.member_scans) > 1 else \
            self.member_scans[0]
        return ObservedState(raid_members=(RaidMembers(UUID, 3, devices),), md=self.arrays)


class Services:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def stop(self, units: Sequence[str]) -> None:
        self.kernel.events.append(f"systemctl stop {' '.join(units)}")

    def start(self, units: Sequence[str]) -> None:
        self.kernel.events.append(f"systemctl start {' '.join(units)}")


class Keys:
    def __init__(self) -> None:
        self.handed_out: list[bytearray] = []

    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        buffer = bytearray(f"key:{volume}/{name}".encode())
        self.handed_out.append(buffer)
        return buffer


@dataclass
class Clock:
    now: float = 0.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Progress:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def started(self, text: str) -> None:
        self.lines.append(f"start {text}")

    def finished(self, text: str, seconds: float) -> None:
        self.lines.append(f"done {text}")


def executor(kernel: FakeKernel, keys: Keys | None = None, clock: Clock | None = None,
             progress: Progress | None = None) -> Executor:
    clock = clock or Clock()
    return Executor(Storage(kernel, kernel, kernel, kernel), keys or Keys(), kernel, kernel,
                    Services(kernel), progress or Progress(), clock, clock.sleep)


FULL = ObservedState(raid_members=(RaidMembers(UUID, 3, ("/dev/sdb", "/dev/sdc", "/dev/sdd")),))


def test_unlock_runs_every_step_and_passes_devices_upwards() -> None:
    kernel, keys, progress = FakeKernel(), Keys(), Progress()
    devices = executor(kernel, keys, progress=progress).unlock(volume(),
                                                              plan_unlock(volume(), FULL))
    assert kernel.events == [
        "assemble keyd-tank-md0 /dev/sdb,/dev/sdc,/dev/sdd run=False",
        "open keyd-tank-crypt0 on /dev/md/keyd-tank-md0",
        "mount /dev/mapper/keyd-tank-crypt0 /srv/tank"]
    assert devices == {"md0": "/dev/md/keyd-tank-md0",
                       "crypt0": "/dev/mapper/keyd-tank-crypt0",
                       "data": "/dev/mapper/keyd-tank-crypt0"}
    assert kernel.keys_seen == [b"key:tank/crypt0"]
    assert keys.handed_out == [bytearray(len(b"key:tank/crypt0"))]  # wiped after use
    assert progress.lines == [
        "start assembling md0 as /dev/md/keyd-tank-md0",
        "done assembling md0 as /dev/md/keyd-tank-md0",
        "start opening luks layer crypt0 as keyd-tank-crypt0 (key derivation may take a while)",
        "done opening luks layer crypt0 as keyd-tank-crypt0 (key derivation may take a while)"]


def test_failure_in_the_top_layer_rolls_back_this_run_in_reverse() -> None:
    kernel = FakeKernel(fail={"mount /dev/mapper/keyd-tank-crypt0 /srv/tank": Boom("no fs")})
    with pytest.raises(Boom, match="no fs") as info:
        executor(kernel).unlock(volume(), plan_unlock(volume(), FULL))
    assert kernel.events[-2:] == ["close keyd-tank-crypt0", "stop /dev/md/keyd-tank-md0"]
    assert info.value.rollback_failures == []  # type: ignore[attr-defined]


def test_rollback_leaves_alone_what_was_open_before_the_run() -> None:
    plan = Plan("tank", (OpenCrypt("tank", volume().layer("crypt0"),  # type: ignore[arg-type]
                                   "keyd-tank-crypt0", LayerRef("md0")),
                         Mount("data", LayerRef("crypt0"), "/srv/tank", "xfs", ())),
                {"md0": "/dev/md127"})
    kernel = FakeKernel(fail={"mount /dev/mapper/keyd-tank-crypt0 /srv/tank": Boom("x")})
    with pytest.raises(Boom):
        executor(kernel).unlock(volume(), plan)
    assert kernel.events == ["open keyd-tank-crypt0 on /dev/md127", "close keyd-tank-crypt0"]


def test_rollback_failures_are_attached_never_masking_the_error() -> None:
    kernel = FakeKernel(fail={"mount /dev/mapper/keyd-tank-crypt0 /srv/tank": Boom("no fs"),
                              "close keyd-tank-crypt0": StorageError("still busy")})
    with pytest.raises(Boom) as info:
        executor(kernel).unlock(volume(), plan_unlock(volume(), FULL))
    failures = info.value.rollback_failures  # type: ignore[attr-defined]
    assert [str(f) for f in failures] == ["still busy"]
    assert any("rollback: closing keyd-tank-crypt0 failed" in n for n in info.value.__notes__)
    assert kernel.events[-1] == "stop /dev/md/keyd-tank-md0"  # kept going


def test_wrong_key_closes_the_array_this_run_assembled() -> None:
    kernel = FakeKernel(fail={"open keyd-tank-crypt0 on /dev/md/keyd-tank-md0":
                              KeyRejected("wrong key for volume tank (cryptsetup exit 2)")})
    with pytest.raises(KeyRejected):
        executor(kernel).unlock(volume(), plan_unlock(volume(), FULL))
    assert kernel.events[-1] == "stop /dev/md/keyd-tank-md0"


def test_interrupt_also_rolls_back() -> None:
    kernel = FakeKernel(fail={"mount /dev/mapper/keyd-tank-crypt0 /srv/tank":
                              KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        executor(kernel).unlock(volume(), plan_unlock(volume(), FULL))
    assert "close keyd-tank-crypt0" in kernel.events


def test_plain_layer_that_does_not_mount_suggests_a_wrong_key() -> None:
    kernel = FakeKernel(fail={"mount /dev/mapper/keyd-tank-crypt0 /srv/tank":
                              StorageError("bad superblock")})
    with pytest.raises(KeyRejected, match="wrong key for volume tank") as info:
        executor(kernel).unlock(volume("plain"), plan_unlock(volume("plain"), FULL))
    assert "offset" in str(info.value.fix) and "close keyd-tank-crypt0" in kernel.events


def test_wait_for_members_uses_the_late_disk_when_it_appears() -> None:
    kernel = FakeKernel(member_scans=[("/dev/sdb", "/dev/sdc"), ("/dev/sdb", "/dev/sdc"),
                                      ("/dev/sdb", "/dev/sdc", "/dev/sdd")])
    clock = Clock()
    plan = Plan("tank", (WaitForMembers("md0", UUID, 3, 5.0),
                         AssembleRaid("md0", UUID, "keyd-tank-md0", ("/dev/sdb", "/dev/sdc"),
                                      run=True)))
    executor(kernel, clock=clock).unlock(volume(), plan)
    assert clock.slept == [1.0, 1.0]
    assert kernel.events == ["assemble keyd-tank-md0 /dev/sdb,/dev/sdc,/dev/sdd run=True"]


def test_wait_for_members_gives_up_at_the_deadline_and_starts_degraded() -> None:
    kernel = FakeKernel(member_scans=[("/dev/sdb", "/dev/sdc")])
    clock = Clock()
    plan = Plan("tank", (WaitForMembers("md0", UUID, 3, 2.5),
                         AssembleRaid("md0", UUID, "keyd-tank-md0", (), run=True)))
    executor(kernel, clock=clock).unlock(volume(), plan)
    assert sum(clock.slept) == pytest.approx(2.5)
    assert kernel.events == ["assemble keyd-tank-md0 /dev/sdb,/dev/sdc run=True"]


@pytest.mark.parametrize(("missing", "noted"), [
    (1, ["md array keyd-tank-md0 of layer md0 of volume tank was started with 2 of 3 members"]),
    (0, [])])
def test_an_array_started_with_members_missing_is_reported_degraded(missing: int,
                                                                    noted: list[str]) -> None:
    started = MdArray("md127", UUID, "/dev/md/keyd-tank-md0", "clean", "raid5", 3, missing)
    kernel = FakeKernel(member_scans=[("/dev/sdb", "/dev/sdc")], arrays=(started,))
    run = executor(kernel)
    run.unlock(volume(), Plan("tank", (AssembleRaid("md0", UUID, "keyd-tank-md0",
                                                    ("/dev/sdb", "/dev/sdc"), run=True),)))
    assert run.degraded == noted


def test_taking_over_an_inactive_array_stops_it_and_rollback_stops_only_the_assembled_one(
        ) -> None:
    plan = Plan("tank", (StopRaid("md0", "/dev/md127"),
                         AssembleRaid("md0", UUID, "keyd-tank-md0", ("/dev/sdb", "/dev/sdc"), True),
                         OpenCrypt("tank", volume().layer("crypt0"),  # type: ignore[arg-type]
                                   "keyd-tank-crypt0", LayerRef("md0"))))
    kernel = FakeKernel(fail={"open keyd-tank-crypt0 on /dev/md/keyd-tank-md0": Boom("x")})
    with pytest.raises(Boom):
        executor(kernel).unlock(volume(), plan)
    assert kernel.events == ["stop /dev/md127", "assemble keyd-tank-md0 /dev/sdb,/dev/sdc run=True",
                             "stop /dev/md/keyd-tank-md0"]


def test_a_late_member_is_re_added_and_said() -> None:
    kernel = FakeKernel()
    run = executor(kernel)
    run.unlock(volume(), Plan("tank", (ReAddMember("md0", "/dev/md127", "/dev/sdd"),)))
    assert kernel.events == ["re-add /dev/sdd to /dev/md127"]
    assert run.mended == ["/dev/sdd was re-added to md array /dev/md127 of layer md0 of volume "
                          "tank"]


LOCK = Plan("tank", (Unmount("data", "/srv/tank"), CloseCrypt("crypt0", "keyd-tank-crypt0"),
                     StopRaid("md0", "/dev/md127")))


def test_lock_closes_top_down_when_nothing_holds_it() -> None:
    kernel = FakeKernel()
    executor(kernel).lock(volume(), LOCK, ObservedState())
    assert kernel.events == ["holders /srv/tank /dev/mapper/keyd-tank-crypt0 /dev/md127",
                             "umount /srv/tank", "close keyd-tank-crypt0", "stop /dev/md127"]


def test_busy_lock_lists_pids_and_changes_nothing() -> None:
    kernel = FakeKernel(busy=[Holder(4242, "bash", "cwd in", "/srv/tank/docs")])
    with pytest.raises(VolumeBusy) as info:
        executor(kernel).lock(volume(), LOCK, ObservedState())
    assert "pid 4242 (bash): cwd in /srv/tank/docs" in str(info.value)
    assert info.value.exit_code == 5 and "never kills" in str(info.value.fix)
    assert [e for e in kernel.events if not e.startswith("holders")] == []


def test_a_busy_lock_at_shutdown_flushes_the_file_systems_top_down_and_closes_nothing() -> None:
    kernel = FakeKernel(busy=[Holder(4242, "bash", "cwd in", "/srv/tank/docs")])
    with pytest.raises(VolumeBusy) as info:
        executor(kernel).lock(volume(), LOCK, ObservedState(), quiesce=True)
    assert info.value.quiesced == ("/srv/tank: synced",)
    assert [e for e in kernel.events if not e.startswith("holders")] == ["quiesce /srv/tank"]


def test_loops_are_flagged_autoclear_once_the_whole_stack_is_open() -> None:
    work = parse_config(configs.seed_003("/dev/sdb", ntfs="/w", root="/r"), "t.toml") \
        .volume("work")
    plan = Plan("work", (AttachLoop("img", "/w/rootfs", read_only=False),
                         Mount("root", LayerRef("img"), "/r", "ext3", ())))
    kernel = FakeKernel()
    executor(kernel).unlock(work, plan)
    assert kernel.events == ["attach /w/rootfs", "mount /dev/loop0 /r", "autoclear /dev/loop0"]
    failing = FakeKernel(fail={"mount /dev/loop0 /r": Boom("no ext3")})
    with pytest.raises(Boom):
        executor(failing).unlock(work, plan)
    assert "autoclear /dev/loop0" not in failing.events  # rolled back: keyd detaches it
    # Nothing of this run mounted on it (the initramfs leaves the root to initramfs-tools):
    # the flag would detach it at once.
    below = FakeKernel()
    executor(below).unlock(work, Plan("work", plan.steps[:1]))
    assert below.events == ["attach /w/rootfs"]


def test_force_stops_the_configured_services_first_but_never_kills() -> None:
    kernel = FakeKernel(busy=[Holder(7, "smbd", "cwd in", "/srv/tank")])
    with pytest.raises(VolumeBusy):
        executor(kernel).lock(volume(), LOCK, ObservedState(), force=True)
    assert kernel.events[0] == "systemctl stop smbd.service"
    kernel.busy.clear()
    executor(kernel).lock(volume(), LOCK, ObservedState(), force=True)
    assert kernel.events[-1] == "stop /dev/md127"


def test_a_foreign_mount_inside_the_volume_blocks_the_lock() -> None:
    inner = MountEntry(60, 40, "8:1", "/", "/srv/tank/usb", "vfat", "/dev/sdz1")
    with pytest.raises(VolumeBusy, match="/dev/sdz1 is mounted at /srv/tank/usb"):
        executor(FakeKernel()).lock(volume(), LOCK, ObservedState(mounts=(inner,)))


def test_lock_failure_midway_surfaces_the_error() -> None:
    kernel = FakeKernel(fail={"close keyd-tank-crypt0": StorageError("held")})
    with pytest.raises(StorageError, match="held"):
        executor(kernel).lock(volume(), LOCK, ObservedState())
    assert "stop /dev/md127" not in kernel.events


def test_fuse_driver_holding_its_own_device_does_not_block_the_lock() -> None:
    fuse_mount = MountEntry(40, 1, "253:0", "/", "/srv/tank", "fuseblk",
                            "/dev/mapper/keyd-tank-crypt0", source_kname="dm-0")
    mapping = DmMapping("dm-0", "keyd-tank-crypt0", "CRYPT-LUKS2-x-keyd-tank-crypt0", ("md127",))
    state = ObservedState(mounts=(fuse_mount,), dm=(mapping,))
    driver = [Holder(77, "ntfs-3g", "open file (fd 4)", "/dev/dm-0"),
              Holder(77, "ntfs-3g", "open file (fd 3)", "/dev/fuse")]
    kernel = FakeKernel(busy=list(driver))
    executor(kernel).lock(volume(), LOCK, state)
    assert kernel.events[-1] == "stop /dev/md127"
    kernel = FakeKernel(busy=[*driver, Holder(88, "dd", "open file (fd 0)", "/dev/dm-0")])
    with pytest.raises(VolumeBusy, match=r"88 \(dd\)") as info:
        executor(kernel).lock(volume(), LOCK, state)
    assert "77" not in str(info.value)


def test_a_bind_mount_of_the_volume_elsewhere_blocks_the_lock_and_is_named() -> None:
    # Unmounting /srv/tank alone would leave the file system in use at /exports/tank, and
    # cryptsetup close would then fail with the volume half locked.
    own = MountEntry(50, 40, "253:3", "/", "/srv/tank", "xfs", "/dev/mapper/keyd-tank-crypt0")
    bind = MountEntry(61, 40, "253:3", "/shares", "/exports/tank", "xfs",
                      "/dev/mapper/keyd-tank-crypt0")
    kernel = FakeKernel()
    with pytest.raises(VolumeBusy, match="also mounted at /exports/tank"):
        executor(kernel).lock(volume(), LOCK, ObservedState(mounts=(own, bind)))
    assert [e for e in kernel.events if not e.startswith("holders")] == []
    executor(kernel).lock(volume(), LOCK, ObservedState(mounts=(own,)))
    assert "umount /srv/tank" in kernel.events
