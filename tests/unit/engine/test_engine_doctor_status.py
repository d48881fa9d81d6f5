"""doctor checks and status reports, as tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyd.config import Config, parse_config
from keyd.engine import doctor
from keyd.engine.names import SERVED_FILE, served_dir
from keyd.engine.observed import DmMapping, LoopDevice, MdArray, MountEntry, ObservedState
from keyd.engine.status import render_table, report, to_json
from keyd.errors import ProgramMissing, ProgramTimeout
from keyd.runner import Completed
from tests import configs
from tests.support.scripted_runner import Reply, ScriptedRunner

UUID = "6b8b4567327b23c6643c986966334873"
# Every layer kind but zfs: seed 004's plain crypt on an md array, seed 003's image in NTFS on top.
CONFIG = parse_config(
    configs.raid_crypt_mount("tank", UUID, configs.PLAIN_2004, names=("md0", "c", "fs"),
                             devices=["/dev/disk/by-id/a", "/dev/disk/by-id/b"], fstype="ntfs-3g",
                             mountpoint="/w", services=["smbd.service"])
    + configs.image_mount("tank", "fs", mountpoint="/r"), "t.toml")


def test_needed_programs_and_modules_follow_the_config() -> None:
    assert doctor.needed_programs(CONFIG) == ["mount", "umount", "modprobe", "cryptsetup",
                                              "mdadm", "losetup", "ntfs-3g", "systemctl"]
    assert doctor.needed_modules(CONFIG) == ["dm_crypt", "raid456", "raid1", "loop", "fuse",
                                             "ext4"]
    assert doctor.needed_programs(Config("x")) == ["mount", "umount", "modprobe"]


class MissingRunner(ScriptedRunner):
    def run(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        if argv[0] == "ntfs-3g":
            raise ProgramMissing("ntfs-3g", "ntfs-3g")
        if argv[0] == "mdadm":
            raise ProgramTimeout(list(argv), 10, "")
        return super().run(argv, **kwargs)


def test_missing_and_hanging_programs() -> None:
    findings = doctor.check_programs(MissingRunner().on("mount", reply=Reply(
        stderr="mount from util-linux 2.38\n")), ["mount", "ntfs-3g", "mdadm"])
    assert [(f.status, f.text) for f in findings] == [
        ("ok", "mount: mount from util-linux 2.38"),
        ("fail", "ntfs-3g is not installed"),
        ("warn", "mdadm: mdadm did not finish within 10 s and was killed")]
    assert findings[1].fix == "apt-get install ntfs-3g"


def test_modprobe_itself_failing_is_a_warning(tmp_path: Path) -> None:
    runner = ScriptedRunner().on("modprobe", reply=Reply(returncode=3))
    (finding,) = doctor.check_modules(runner, ["loop"], tmp_path)
    assert finding.status == "warn"


def test_plain_hashes_are_checked_with_cryptsetup_benchmark() -> None:
    ok = doctor.check_hashes(ScriptedRunner(), CONFIG)
    assert [(f.status, f.text) for f in ok] == [
        ("ok", "cryptsetup can hash passphrases with ripemd160")]
    bad = doctor.check_hashes(ScriptedRunner().on("cryptsetup", reply=Reply(
        stderr="hash not supported\n", returncode=1)), CONFIG)
    assert bad[0].status == "fail" and "legacy provider" in str(bad[0].fix)


def test_devices_and_members() -> None:
    observed = ObservedState(paths={"/dev/disk/by-id/a": "sdb"}, sector_sizes={"sdb": 4096},
                             md=(MdArray("md9", UUID),))
    texts = [(f.status, f.text) for f in doctor.check_devices(CONFIG, observed)]
    assert texts == [
        ("warn", f"tank/md0: no members of md {UUID} found (assembled as /dev/md9)"),
        ("ok", "tank/md0: /dev/disk/by-id/a -> /dev/sdb, 4096-byte sectors"),
        ("fail", "tank/md0: /dev/disk/by-id/b is not present")]


def test_run_dir_checks(tmp_path: Path) -> None:
    assert doctor.check_run_dir(str(tmp_path / "new" / "dir")).status == "ok"
    (tmp_path / "file").write_text("")
    finding = doctor.check_run_dir(str(tmp_path / "file" / "run"))
    assert finding.status == "fail" and "--run-dir" in str(finding.fix)


def test_state_dir_checks(tmp_path: Path) -> None:
    assert doctor.check_state_dir(str(tmp_path / "var" / "lib" / "keyd")).status == "ok"
    (tmp_path / "file").write_text("")
    finding = doctor.check_state_dir(str(tmp_path / "file" / "keyd"))
    assert finding.status == "fail" and "retired stick would be accepted again" in finding.text


def test_partial_volume_and_foreign_layer_in_status() -> None:
    volume = CONFIG.volume("tank")
    foreign_md = MdArray("md0", UUID, "/dev/md/host:0", "clean", "raid5", 3, 1)
    rep = report(volume, ObservedState(md=(foreign_md,)))
    assert rep.state == "partial (degraded)"
    table = render_table([rep])
    assert "open (not keyd's)" in table and "degraded (2 of 3)" in table
    assert to_json([rep])["volumes"][0]["layers"][-1]["degraded"] is True


def test_a_volume_whose_disk_is_not_there_is_locked_with_the_layer_missing() -> None:
    volume = parse_config(configs.crypt_mount("media", "/dev/disk/by-id/usb-absent", configs.LUKS,
                                              names=("c", "fs"), fstype="ext4", mountpoint="/media"),
                          "t.toml").volume("media")
    rep = report(volume, ObservedState())
    assert rep.state == "locked"
    layers = to_json([rep])["volumes"][0]["layers"]
    assert [(layer["name"], layer["state"]) for layer in layers] == [("fs", "closed"),
                                                                     ("c", "missing")]
    assert "device /dev/disk/by-id/usb-absent is not present" in render_table([rep])


def test_status_conflict_state() -> None:
    volume = CONFIG.volume("tank")
    squatter = DmMapping("dm-3", "keyd-tank-c", "", ())
    rep = report(volume, ObservedState(dm=(squatter,)))
    assert rep.state == "conflict"


def served_state(source: str) -> ObservedState:
    """keyd-media-tc served by keyd's userspace crypto from ``source`` on loop3, ext4 on it."""
    served = served_dir("keyd-media-tc")
    return ObservedState(
        paths={"/dev/disk/by-id/usb-disk": "sdb"},
        loops=(LoopDevice("loop3", f"{served}/{SERVED_FILE}"),),
        mounts=(MountEntry(40, 1, "0:50", "/", served, "fuse.keyd-crypt", source,
                           source_kname=source.removeprefix("/dev/")),
                MountEntry(41, 1, "7:3", "/srv/nas", "/srv/nas", "ext4", "/dev/loop3",
                           source_kname="loop3")))


def test_a_layer_served_in_userspace_is_open_on_its_loop_device() -> None:
    volume = parse_config(configs.seed_000("/dev/disk/by-id/usb-disk", volume="media"),
                          "t.toml").volume("media")
    rep = report(volume, served_state("/dev/sdb"))
    assert rep.state == "unlocked"
    layers = {layer["name"]: layer for layer in to_json([rep])["volumes"][0]["layers"]}
    assert layers["tc"]["device"] == "/dev/loop3" and "userspace crypto" in layers["tc"]["detail"]
    moved = report(volume, served_state("/dev/sdc"))
    assert "served from another device than /dev/sdb" in render_table([moved])


def test_doctor_names_the_layers_that_use_userspace_crypto() -> None:
    device = "/dev/disk/by-id/usb-disk"
    config = parse_config(configs.seed_000(device, volume="nas")
                          + configs.crypt_layer("pinned", "vc", {"type": "veracrypt",
                                                                 "backend": "kernel"},
                                                device=device + "2")
                          + configs.crypt_layer("forced", "p", {**configs.PLAIN_2006,
                                                                "backend": "userspace"},
                                                device=device + "3"), "t.toml")
    texts = [f.text for f in doctor.check_crypt_backends(config, False, [], "fix")]
    assert texts == ["nas/tc: dm-crypt missing: using userspace crypto",
                     'forced/p: userspace crypto (backend = "userspace")']
    assert [f.text for f in doctor.check_crypt_backends(config, True, [], "fix")] == [texts[1]]
    [missing] = doctor.check_crypt_backends(config, True, ["pyfuse3 is not installed"], "apt")
    assert missing.status == "fail" and missing.fix == "apt"
    assert doctor.needs_dm_crypt(config) and not doctor.needs_dm_crypt(
        parse_config(configs.seed_000(device), "t.toml"))
