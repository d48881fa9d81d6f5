"""The initramfs unlock's pure parts and its flow on fakes: which volume, which key, what
initramfs-tools is told; and the boot = "root" rules of the configuration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from keyd.boot.records import forward_records
from keyd.boot.unlock import (
    NoRootVolume,
    below_root,
    boot_record,
    key_from_sticks,
    parse_udev_db,
    passphrases,
    present_sticks,
    root_params,
    root_volume,
    wait_for_stick,
    write_outputs,
)
from keyd.config.model import MountLayer
from keyd.config.parse import parse_config
from keyd.daemon.events import Observed
from keyd.daemon.uevents import StickInfo
from keyd.daemon.workers import observed as observed_event
from keyd.engine.observed import DmMapping, LoopDevice, MountEntry, ObservedState
from keyd.engine.status import report
from keyd.errors import ConfigError
from keyd.trust.secret import SecretBytes
from tests import configs
from tests.support.daemon_fakes import FakeSticks, accepted, rejected
from tests.support.scripted_runner import Reply, ScriptedRunner

SEED_003_ROOT = configs.seed_003("/dev/disk/by-id/virtio-TC", root="/")
STICK_DB = """P: /devices/pci/usb1/1-1/host0/block/sda/sda1
N: sda1
E: DEVNAME=/dev/sda1
E: DEVTYPE=partition
E: SUBSYSTEM=block
E: ID_BUS=usb
E: ID_SERIAL_SHORT=KEY01
E: ID_FS_USAGE=filesystem
E: ID_FS_TYPE=vfat

P: /devices/virtual/block/loop0
N: loop0
E: DEVNAME=/dev/loop0
E: DEVTYPE=disk
E: SUBSYSTEM=block
"""


def test_the_root_volume_is_opened_up_to_the_layer_the_root_sits_on() -> None:
    volume = root_volume(parse_config(SEED_003_ROOT, "keyd.toml"))
    below, root = below_root(volume)
    assert [layer.name for layer in below.layers] == ["tc", "ntfs", "img"] and below.top == "img"
    assert isinstance(root, MountLayer) and root.mountpoint == "/" and root.fstype == "ext3"
    with pytest.raises(NoRootVolume, match='no volume with boot = "root"'):
        root_volume(parse_config(configs.seed_003("/dev/sdb"), "keyd.toml"))


@pytest.mark.parametrize(("text", "words"), [
    (configs.seed_003("/dev/sdb").replace('[volume.work.layer.tc]',
                                          '[volume.work]\nboot = "root"\n\n[volume.work.layer.tc]'),
     'a boot = "root" volume has the root file system on top'),
    (SEED_003_ROOT.replace('boot = "root"\n', ""), 'only the root file system\'s volume may'),
    (SEED_003_ROOT.replace('boot = "root"', 'boot = "early"'), "boot = 'early' is not known"),
    (SEED_003_ROOT + configs.seed_004("/dev/sdc", mountpoint="/").replace(
        "[volume.cryptvol1.layer.c]", '[volume.cryptvol1]\nboot = "root"\n\n'
                                      "[volume.cryptvol1.layer.c]"),
     'only one volume has boot = "root"'),
])
def test_boot_root_rules(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_config(text, "keyd.toml")
    assert info.value.fix


def test_sticks_come_from_udevs_database_by_the_daemons_rules() -> None:
    assert [props["DEVNAME"] for props in parse_udev_db(STICK_DB)] == ["/dev/sda1", "/dev/loop0"]
    runner = ScriptedRunner().on("udevadm", reply=Reply(STICK_DB))
    assert present_sticks(runner) == [StickInfo("/dev/sda1", "vfat", serial="KEY01")]


def test_the_first_stick_with_an_accepted_key_for_the_volume_wins() -> None:
    said: list[str] = []
    checker = FakeSticks([rejected(), accepted("tank"), accepted("work")])
    sticks = [StickInfo(f"/dev/sd{c}1", "vfat", serial=f"S{c}") for c in "abc"]
    found = key_from_sticks("work", sticks, checker, said.append)
    assert found is not None and found.stick == sticks[2] and found.source == "stick"
    assert said[0].startswith("stick Sa refused: ")
    assert said[1] == "stick Sb has no accepted key for volume work"
    other = checker.handed_out[1]
    assert all(v.keys is None or not any(bytes(s.buffer) for s in v.keys._secrets.values())
               for v in other.verdicts)  # wiped


def test_waiting_for_a_stick_checks_each_stick_once_and_gives_up_at_the_timeout() -> None:
    volume = root_volume(parse_config(SEED_003_ROOT, "keyd.toml"))
    runner = ScriptedRunner().on("udevadm", reply=Reply(STICK_DB))
    checker = FakeSticks([rejected()])
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    found = wait_for_stick(volume, runner, checker, timeout=5, say=lambda _: None,
                           clock=lambda: now[0], sleep=sleep)
    assert found is None and checker.checked == ["/dev/sda1"] and now[0] == 5.0
    assert len(runner.argvs("udevadm")) == 11


def test_a_passphrase_per_key_name_and_what_initramfs_tools_is_told(tmp_path: Path) -> None:
    volume = root_volume(parse_config(SEED_003_ROOT, "keyd.toml"))
    asked: list[str] = []

    def ask(prompt: str) -> SecretBytes:
        asked.append(prompt)
        return SecretBytes(b"pw")

    found = passphrases(volume, ask)
    assert asked == ["Passphrase for work: "] and found.keys.get("tc") is not None
    _, root = below_root(volume)
    assert root_params("/dev/loop0", root) == "ROOT='/dev/loop0'\nROOTFSTYPE='ext3'\n"
    args = argparse.Namespace(params=str(tmp_path / "param.conf"),
                              mounts=str(tmp_path / "run/boot-mounts"),
                              audit=str(tmp_path / "run/boot-audit.json"))
    record = boot_record("work", found, 1.5)
    write_outputs(args, volume, "/dev/loop0", root, record)
    assert (tmp_path / "param.conf").read_text().startswith("ROOT='/dev/loop0'")
    assert (tmp_path / "run/boot-mounts").read_text() == "/media/winroot\n"
    assert json.loads((tmp_path / "run/boot-audit.json").read_text()) == [{
        "event": "unlock-finished", "volume": "work", "result": "unlocked",
        "message": "unlocked in the initramfs with a key from passphrase",
        "reason": "initramfs", "duration_ms": "1500"}]


def test_keyd_journals_the_boot_records_once_and_survives_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "boot-audit.json"
    path.write_text(json.dumps([{"event": "unlock-finished", "volume": "work",
                                 "message": "unlocked in the initramfs", "result": "unlocked",
                                 "serial": "KEY01", "duration_ms": "1500"},
                                {"volume": "no event"}]))
    sent: list[tuple[object, ...]] = []

    def audit(volume: str, event: object, message: str, **fields: object) -> None:
        sent.append((volume, event, message, fields))

    assert forward_records(path, audit) == 1
    assert sent == [("work", "unlock-finished", "unlocked in the initramfs",
                     {"seconds": 1.5, "result": "unlocked", "serial": "KEY01"})]
    assert not path.exists() and forward_records(path, audit) == 0
    path.write_text("{not json")
    assert forward_records(path, audit) == 0 and not path.exists()


def test_keyd_sees_the_booted_stack_as_unlocked_with_the_root_on_top() -> None:
    """What keyd.service finds after such a boot (the kernel state the lab's boot left): the
    volume is unlocked, so the daemon's start-up adopts it (Observed "unlocked")."""
    volume = root_volume(parse_config(SEED_003_ROOT, "keyd.toml"))
    observed = ObservedState(
        dm=(DmMapping("dm-0", "keyd-work-tc", "CRYPT-TCRYPT-keyd-work-tc", ("vda",)),),
        loops=(LoopDevice("loop0", "/media/winroot/rootfs", read_only=False),),
        mounts=(MountEntry(27, 1, "7:0", "/", "/", "ext3", "/dev/loop0", source_kname="loop0"),
                MountEntry(26, 27, "0:40", "/", "/media/winroot", "fuseblk",
                           "/dev/mapper/keyd-work-tc", source_kname="dm-0")),
        paths={"/dev/disk/by-id/virtio-TC": "vda"})
    seen = report(volume, observed)
    assert seen.state == "unlocked", seen
    assert observed_event(seen) == Observed("unlocked")
