"""End to end without a kernel: real adapters and observer over a fake /sys,/proc,/dev,/run tree.

The scripted programs change the tree the way the real ones change the kernel,
so this checks that what keyd runs and what keyd later observes agree (names,
dm UUIDs, mdadm's map file, mountinfo).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from keyd.adapters.block import Losetup, Mdadm, Mounter
from keyd.adapters.cryptsetup import Cryptsetup
from keyd.adapters.retry import Retry
from keyd.adapters.system import ProcHolders, Systemctl
from keyd.config import Volume, parse_config
from keyd.config.layers import md_uuid
from keyd.engine.errors import KeyRejected, VolumeBusy, WrongVolume
from keyd.engine.keys import MappingKeys
from keyd.engine.observe import KernelObserver, swap_uuid_words
from keyd.engine.observed import DmMapping, ObservedState
from keyd.engine.ports import Storage
from keyd.engine.service import Engine
from keyd.engine.status import render_table
from keyd.engine.volume_uuid import luks_uuid, volume_uuids
from keyd.runner import DEFAULT_TIMEOUT, Completed
from tests import configs
from tests.support.scripted_runner import Reply, ScriptedRunner

UUID = "6b8b4567327b23c6643c986966334873"
MD_UUID = ":".join(UUID[i:i + 8] for i in range(0, 32, 8))


class KernelTree:
    """A fake kernel: sysfs/dev/run/proc files that scripted programs edit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for disk, minor in (("sdb", 16), ("sdc", 32)):
            self.block(disk, f"8:{minor}")
        self.write("proc/self/mountinfo", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
        self.key = b"right key"

    def write(self, path: str, text: str) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def block(self, name: str, devno: str, slaves: Sequence[str] = ()) -> Path:
        base = self.root / "sys" / "class" / "block" / name
        self.write(f"sys/class/block/{name}/dev", devno + "\n")
        (base / "slaves").mkdir(exist_ok=True)
        for slave in slaves:
            (base / "slaves" / slave).mkdir()
        self.write(f"dev/{name}", "")
        return base

    def link(self, path: str, target: str) -> None:
        (self.root / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, self.root / path)

    def kname(self, path: str) -> str:
        return os.path.basename(os.path.realpath(self.root / path.lstrip("/")))

    # --- the programs -------------------------------------------------------
    def examine(self, argv: Sequence[str]) -> Reply:
        return Reply(f"ARRAY /dev/md/0 level=raid1 metadata=1.2 num-devices=2 UUID={MD_UUID}"
                     " name=nas:0\n   devices=/dev/sdb,/dev/sdc\n")

    def assemble(self, argv: Sequence[str]) -> Reply:
        device = argv[2]
        base = self.block("md127", "9:127", slaves=[os.path.basename(a) for a in argv
                                                   if a.startswith("/dev/sd")])
        for attr, value in (("array_state", "clean"), ("level", "raid1"), ("raid_disks", "2"),
                            ("degraded", "0"), ("sync_action", "idle")):
            (base / "md").mkdir(exist_ok=True)
            (base / "md" / attr).write_text(value + "\n")
        self.write("run/mdadm/map", f"md127 1.2 {md_uuid(swap_uuid_words(UUID))} {device}\n")
        self.link(device.lstrip("/"), "../md127")
        return Reply()

    def stop_md(self, argv: Sequence[str]) -> Reply:
        shutil.rmtree(self.root / "sys/class/block/md127")
        (self.root / "run/mdadm/map").write_text("")
        (self.root / "dev/md/keyd-nas-md0").unlink()
        return Reply()

    def open_crypt(self, argv: Sequence[str], secret: bytes | None) -> Reply:
        if secret != self.key:
            return Reply(stderr="No key available with this passphrase.\n", returncode=2)
        device, name = argv[-2], argv[-1]
        base = self.block("dm-0", "253:0", slaves=[self.kname(device)])
        (base / "dm").mkdir()
        (base / "dm" / "name").write_text(name + "\n")
        (base / "dm" / "uuid").write_text(f"CRYPT-LUKS2-{UUID}-{name}\n")
        self.link(f"dev/mapper/{name}", "../dm-0")
        return Reply()

    def close_crypt(self, argv: Sequence[str]) -> Reply:
        shutil.rmtree(self.root / "sys/class/block/dm-0")
        (self.root / "dev/mapper" / argv[-1]).unlink()
        return Reply()

    def mount(self, argv: Sequence[str]) -> Reply:
        fstype, source, mountpoint = argv[2], argv[-2], argv[-1]
        devno = (self.root / f"sys/class/block/{self.kname(source)}/dev").read_text().strip()
        with (self.root / "proc/self/mountinfo").open("a") as info:
            info.write(f"40 22 {devno} / {mountpoint} rw - {fstype} {source} rw\n")
        return Reply()

    def umount(self, argv: Sequence[str]) -> Reply:
        path = self.root / "proc/self/mountinfo"
        lines = [line for line in path.read_text().splitlines() if f" {argv[-1]} " not in line]
        path.write_text("\n".join(lines) + "\n")
        return Reply()


class TreeRunner(ScriptedRunner):
    """Routes cryptsetup open through the tree with its stdin (the key)."""

    def __init__(self, tree: KernelTree) -> None:
        super().__init__()
        self.tree = tree
        self.on("mdadm", "--examine", reply=tree.examine).on("mdadm", "--assemble",
                                                               reply=tree.assemble)
        self.on("mdadm", "--stop", reply=tree.stop_md).on("cryptsetup", "close",
                                                          reply=tree.close_crypt)
        self.on("mount", reply=tree.mount).on("umount", reply=tree.umount)

    def run(self, argv: Sequence[str], *, secret: bytes | bytearray | None = None,
            timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
            cwd: str | os.PathLike[str] | None = None, argv0: str | None = None) -> Completed:
        if tuple(argv[:2]) == ("cryptsetup", "open"):
            reply = self.tree.open_crypt(argv, None if secret is None else bytes(secret))
            self.rules.insert(0, (tuple(argv), reply))
        return super().run(argv, secret=secret, timeout=timeout, ok_codes=ok_codes, cwd=cwd,
                           argv0=argv0)


World = tuple[KernelTree, Engine, Volume]


@pytest.fixture
def world(tmp_path: Path) -> World:
    tree = KernelTree(tmp_path / "root")
    runner = TreeRunner(tree)
    storage = Storage(Cryptsetup(runner), Mdadm(runner, Retry(sleep=lambda _: None)),
                      Mounter(runner, create_mountpoints=False),
                      Losetup(runner, flag_autoclear=lambda device: None))
    engine = Engine(KernelObserver(runner, tree.root), storage, ProcHolders(tree.root),
                    Systemctl(runner), run_dir=str(tmp_path / "run"))
    volume = parse_config(configs.luks_on_raid(UUID, volume="nas", md_name="md0",
                                               mountpoint="/srv/nas"), "t.toml").volume("nas")
    return tree, engine, volume


def test_unlock_status_relock_round_trip(world: World) -> None:
    tree, engine, volume = world
    keys = MappingKeys({"luks": b"right key"})
    outcome = engine.unlock(volume, keys)
    assert outcome.changed
    assert outcome.devices == {"md0": "/dev/md/keyd-nas-md0", "luks": "/dev/mapper/keyd-nas-luks",
                               "fs": "/dev/mapper/keyd-nas-luks"}
    (report,) = engine.status([volume])
    assert report.state == "unlocked" and all(layer.owned for layer in report.layers)
    assert "/srv/nas" in render_table([report])
    assert not engine.unlock(volume, keys).changed
    assert engine.lock(volume).changed
    (report,) = engine.status([volume])
    assert report.state == "locked"
    assert not (tree.root / "sys/class/block/md127").exists()


def test_wrong_key_leaves_the_tree_as_it_was(world: World) -> None:
    tree, engine, volume = world
    with pytest.raises(KeyRejected, match=r"wrong key for volume nas \(cryptsetup exit 2\)"):
        engine.unlock(volume, MappingKeys({"luks": b"nope"}))
    assert not (tree.root / "sys/class/block/md127").exists()
    assert (tree.root / "run/mdadm/map").read_text() == ""


def test_busy_mount_blocks_lock_with_the_pid(world: World) -> None:
    tree, engine, volume = world
    engine.unlock(volume, MappingKeys({"luks": b"right key"}))
    tree.write("proc/4242/comm", "bash\n")
    tree.link("proc/4242/cwd", "/srv/nas/photos")
    with pytest.raises(VolumeBusy, match=r"4242 \(bash\): cwd in /srv/nas/photos"):
        engine.lock(volume)
    assert engine.status([volume])[0].state == "unlocked"


def test_a_key_signed_for_another_volume_uuid_is_closed_again(world: World) -> None:
    tree, engine, volume = world
    other = "0c5c6d83-311e-495d-8b14-84576dd84ca9"
    with pytest.raises(WrongVolume, match=f"for the volume with UUID {other}, and volume nas "
                                          f"has {UUID}: closed it again"):
        engine.unlock(volume, MappingKeys({"luks": b"right key"}, volume_uuid=other))
    assert engine.status([volume])[0].state == "locked"
    assert not (tree.root / "sys/class/block/dm-0").exists()
    dashed = f"{UUID[:8]}-{UUID[8:12]}-{UUID[12:16]}-{UUID[16:20]}-{UUID[20:]}".upper()
    assert engine.unlock(volume, MappingKeys({"luks": b"right key"}, volume_uuid=dashed)).changed


def test_the_luks_header_uuid_counts_as_the_volumes(world: World) -> None:
    _, _, volume = world
    header = "0c5c6d83311e495d8b1484576dd84ca9"
    mapping = DmMapping("dm-3", "keyd-nas-luks", f"CRYPT-LUKS1-{header}-keyd-nas-luks")
    stranger = DmMapping("dm-4", "other", "CRYPT-LUKS2-" + "f" * 32 + "-other")
    assert volume_uuids(volume, ObservedState(dm=(mapping, stranger))) == {header, UUID}
    assert luks_uuid("CRYPT-PLAIN-keyd-nas-luks") is None
