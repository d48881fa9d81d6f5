"""KernelObserver against a temp tree shaped like /sys, /proc, /dev and /run."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from keyd.config import Volume, parse_config
from keyd.config.layers import md_uuid
from keyd.engine.observe import (
    KernelObserver,
    parse_examine_scan,
    parse_md_map,
    parse_mountinfo,
    swap_uuid_words,
    unescape,
)
from keyd.engine.observed import DmMapping, LoopDevice, MdArray, RaidMembers
from tests import configs
from tests.support.scripted_runner import Reply, ScriptedRunner

UUID = "6b8b4567327b23c6643c986966334873"


class Tree:
    """Writes a fake kernel tree below ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def file(self, path: str, text: str) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def link(self, path: str, target: str) -> None:
        source = self.root / path
        source.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, source)

    def block(self, name: str, devno: str, *, parent: str | None = None,
              sector: int | None = None, slaves: tuple[str, ...] = ()) -> None:
        if parent is None:
            base = f"sys/devices/virtual/block/{name}"
            self.file(f"{base}/dev", devno + "\n")
        else:
            base = f"sys/devices/virtual/block/{parent}/{name}"
            self.file(f"{base}/dev", devno + "\n")
        if sector is not None:
            self.file(f"{base}/queue/logical_block_size", f"{sector}\n")
        for slave in slaves:
            (self.root / base / "slaves").mkdir(parents=True, exist_ok=True)
            (self.root / base / "slaves" / slave).mkdir()
        self.link(f"sys/class/block/{name}", f"../../{base.removeprefix('sys/')}")
        self.file(f"dev/{name}", "")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path)
    t.block("sda", "8:0", sector=4096)
    t.block("sda1", "8:1", parent="sda")
    for index, name in enumerate(("sdb", "sdc", "sdd")):
        t.block(name, f"8:{16 * (index + 1)}", sector=512)
    t.block("md127", "9:127", slaves=("sdb", "sdc"))
    md = "sys/devices/virtual/block/md127/md"
    for attr, value in (("array_state", "clean"), ("level", "raid5"), ("raid_disks", "3"),
                        ("degraded", "1"), ("sync_action", "recover"),
                        ("sync_completed", "10 / 100")):
        t.file(f"{md}/{attr}", value + "\n")
    t.file("run/mdadm/map", f"md127 1.2 {md_uuid(swap_uuid_words(UUID))} "
                            "/dev/md/keyd-tank-md0\n")
    t.block("dm-0", "253:0", slaves=("md127",))
    t.file("sys/devices/virtual/block/dm-0/dm/name", "keyd-tank-crypt0\n")
    t.file("sys/devices/virtual/block/dm-0/dm/uuid", "CRYPT-PLAIN-keyd-tank-crypt0\n")
    t.link("dev/mapper/keyd-tank-crypt0", "../dm-0")
    t.block("loop0", "7:0")
    t.file("sys/devices/virtual/block/loop0/loop/backing_file", "/srv/my img (deleted)\n")
    t.file("sys/devices/virtual/block/loop0/ro", "1\n")
    t.block("loop1", "7:1")
    t.link("dev/disk/by-id/usb-disk-part1", "../../sda1")
    t.link("dev/disk/by-id/absolute", "/dev/sdd")
    t.file("proc/self/mountinfo", textwrap.dedent("""\
        22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
        40 22 253:0 / /srv/tank\\040data rw,noatime shared:9 - xfs /dev/mapper/keyd-tank-crypt0 rw
        41 22 0:52 / /mnt/fuse rw - fuseblk /dev/mapper/keyd-tank-crypt0 rw
        42 22 7:0 / /mnt/img rw - ext3 /dev/loop0 rw
        garbage line
    """))
    return t


def volumes() -> list[Volume]:
    plain: configs.Crypt = {"type": "plain", "cipher": "aes", "key_size": 256}
    config = parse_config(
        configs.raid_crypt_mount("tank", UUID, plain, names=("md0", "crypt0", "data"),
                                 devices=["/dev/disk/by-id/absolute", "/dev/disk/by-id/gone"],
                                 fstype="xfs", mountpoint="/srv/tank data")
        + configs.crypt_layer("usb", "c", configs.LUKS, device="/dev/disk/by-id/usb-disk-part1"),
        "t.toml")
    return list(config.volumes)


MD_UUID = f"{UUID[:8]}:{UUID[8:16]}:{UUID[16:24]}:{UUID[24:]}"
EXAMINE = f"""ARRAY /dev/md/0  level=raid5 metadata=1.2 num-devices=3 UUID={MD_UUID} name=nas:0
   devices=/dev/sdb,/dev/sdc
ARRAY metadata=imsm UUID=aaaaaaaa:aaaaaaaa:aaaaaaaa:aaaaaaaa container=x
"""


def test_observe_reads_every_kind_of_device(tree: Tree) -> None:
    runner = ScriptedRunner().on("mdadm", "--examine", reply=Reply(EXAMINE))
    state = KernelObserver(runner, tree.root).observe(volumes())
    assert state.dm == (DmMapping("dm-0", "keyd-tank-crypt0", "CRYPT-PLAIN-keyd-tank-crypt0",
                                  ("md127",)),)
    assert state.md == (MdArray("md127", UUID, "/dev/md/keyd-tank-md0", "clean", "raid5", 3, 1,
                                "recover", "10 / 100", ("sdb", "sdc")),)
    assert state.loops == (LoopDevice("loop0", "/srv/my img", True),)
    assert state.raid_members == (RaidMembers(UUID, 3, ("/dev/sdb", "/dev/sdc")),)
    assert state.paths == {"/dev/disk/by-id/usb-disk-part1": "sda1",
                           "/dev/disk/by-id/absolute": "sdd"}
    assert state.sector_sizes == {"sda1": 4096, "sdd": 512}
    assert state.devnos["dm-0"] == "253:0"


def test_mounts_are_unescaped_and_linked_to_block_devices(tree: Tree) -> None:
    state = KernelObserver(ScriptedRunner(), tree.root).observe(volumes(), members=False)
    by_point = {m.mountpoint: m for m in state.mounts}
    assert set(by_point) == {"/", "/srv/tank data", "/mnt/fuse", "/mnt/img"}
    assert by_point["/srv/tank data"].source_kname == "dm-0"
    assert by_point["/mnt/fuse"].source_kname == "dm-0"  # fuse: found by source path
    assert by_point["/mnt/img"].source_kname == "loop0"
    assert by_point["/"].source_kname == ""
    assert state.raid_members == ()


def test_observed_state_lets_planning_see_the_stack_open(tree: Tree) -> None:
    from keyd.engine.plan import plan_unlock
    state = KernelObserver(ScriptedRunner(), tree.root).observe(volumes()[:1], members=False)
    assert plan_unlock(volumes()[0], state).steps == ()


def test_md_array_missing_from_the_map_is_asked_from_mdadm(tree: Tree) -> None:
    (tree.root / "run/mdadm/map").unlink()
    runner = ScriptedRunner().on("mdadm", "--detail", reply=Reply(
        f"MD_LEVEL=raid5\nMD_UUID={UUID[:8]}:{UUID[8:16]}:{UUID[16:24]}:{UUID[24:]}\n"
        "MD_DEVNAME=keyd-tank-md0\n"))
    state = KernelObserver(runner, tree.root).observe([], members=False)
    assert state.md[0].uuid == UUID and state.md[0].devname == "keyd-tank-md0"
    assert runner.argvs() == [("mdadm", "--detail", "--export", "/dev/md127")]


def test_mdadm_failures_leave_fields_empty_instead_of_crashing(tree: Tree) -> None:
    (tree.root / "run/mdadm/map").unlink()
    runner = ScriptedRunner().on("mdadm", reply=Reply(stderr="boom", returncode=3))
    state = KernelObserver(runner, tree.root).observe(volumes())
    assert state.md[0].uuid == "" and state.raid_members == ()


def test_resolve_and_sector_size(tree: Tree) -> None:
    observer = KernelObserver(ScriptedRunner(), tree.root)
    assert observer.resolve("/dev/mapper/keyd-tank-crypt0") == "dm-0"
    assert observer.resolve("/dev/disk/by-id/nothing") is None
    assert observer.resolve("/etc/passwd") is None
    assert observer.sector_size("sda1") == 4096  # inherited from the disk
    assert observer.sector_size("loop1") is None


def test_empty_root_observes_nothing(tmp_path: Path) -> None:
    state = KernelObserver(ScriptedRunner(), tmp_path).observe(volumes())
    assert (state.dm, state.md, state.loops, state.mounts) == ((), (), (), ())


@pytest.mark.parametrize(("text", "plain"), [
    ("/a\\040b", "/a b"), ("tab\\011x", "tab\tx"), ("back\\134slash", "back\\slash"),
    ("no escapes", "no escapes"), ("\\0401", " 1")])
def test_unescape(text: str, plain: str) -> None:
    assert unescape(text) == plain


def test_mountinfo_with_several_optional_fields() -> None:
    line = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 shared:2 - ext3 /dev/root rw\n"
    (entry,) = parse_mountinfo(line + "1 2 3\n")
    assert (entry.root, entry.mountpoint, entry.fstype, entry.source) == \
        ("/mnt1", "/mnt/parent", "ext3", "/dev/root")


def test_md_map_and_examine_parsers_skip_junk() -> None:
    assert parse_md_map("md0 1.2 nothex /dev/md/x\nshort\n") == {}
    assert parse_md_map(f"md1 1.2 {swap_uuid_words(UUID)}\n") == {"md1": (UUID, "")}


@pytest.mark.parametrize(("line", "md_uuid_of_array"), [
    # Seen in the lab: mdadm 4.2 map line vs `mdadm --detail --export` MD_UUID (1.2 metadata).
    ("md127 1.2 eaef7d03:3f690382:4e2340e5:b50edd60 /dev/md/keyd-home-md",
     "037defea:8203693f:e540234e:60dd0eb5"),
    ("md0 0.90 6b8b4567:327b23c6:643c9869:66334873 /dev/md0",
     "6b8b4567:327b23c6:643c9869:66334873"),
])
def test_md_map_uuids_are_read_as_md_uuid_spells_them(line: str, md_uuid_of_array: str) -> None:
    [(uuid, _)] = parse_md_map(line).values()
    assert md_uuid(uuid) == md_uuid_of_array
    assert parse_examine_scan("ARRAY /dev/md0 num-devices=x UUID=1\n") == ()
