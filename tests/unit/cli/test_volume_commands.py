"""keydctl unlock/lock/status/doctor/check-config, in process, against a fake storage stack."""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyd.cli import main as keydctl
from keyd.cli.volume_commands import Environment
from keyd.config import CryptLayer, Volume
from keyd.engine.errors import Holder, KeyRejected, StorageError
from keyd.engine.observed import DmMapping, MdArray, MountEntry, ObservedState, RaidMembers
from keyd.engine.ports import Storage
from keyd.errors import KeydError, user_message
from tests import configs
from tests.support.scripted_runner import Reply, ScriptedRunner

UUID = "6b8b4567327b23c6643c986966334873"
CONFIG = configs.raid_crypt_mount(
    "tank", UUID, configs.LUKS, names=("md0", "crypt0", "data"), fstype="xfs",
    mountpoint="/srv/tank", services=["smbd.service"],
) + configs.layer("plainfs", "fs", "mount", device="/dev/disk/by-id/usb", fstype="ext4",
                  mountpoint="/srv/usb")


@dataclass
class FakeStack:
    """A tiny kernel: keeps what is open and shows it through observe()."""

    right_key: bytes = b"sesame"
    md: dict[str, MdArray] = field(default_factory=dict)
    dm: dict[str, DmMapping] = field(default_factory=dict)
    mounts: dict[str, MountEntry] = field(default_factory=dict)
    holders_found: list[Holder] = field(default_factory=list)
    stray: bool = False  # the holders belong to no configured service
    log: list[str] = field(default_factory=list)
    fail_mount: bool = False

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        return ObservedState(
            dm=tuple(self.dm.values()), md=tuple(self.md.values()),
            mounts=tuple(self.mounts.values()),
            raid_members=(RaidMembers(UUID, 2, ("/dev/sdb", "/dev/sdc")),),
            paths={"/dev/disk/by-id/usb": "sdz"},
            devnos={"md127": "9:127", "dm-0": "253:0", "sdz": "8:240"})

    def assemble(self, label: str, md_name: str, uuid: str, members: Sequence[str],
                 *, run: bool) -> str:
        self.log.append("assemble")
        self.md["md127"] = MdArray("md127", uuid, md_name, "clean", "raid1", 2, 0,
                                   members=("sdb", "sdc"))
        return f"/dev/md/{md_name}"

    def start(self, label: str, device: str) -> None:
        raise AssertionError("not used")

    def stop(self, label: str, device: str) -> None:
        self.log.append("stop")
        self.md.clear()

    def re_add(self, label: str, device: str, member: str) -> None:
        raise AssertionError("not used")

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        if bytes(key).rstrip(b"\n") != self.right_key:
            raise KeyRejected(f"wrong key for volume {volume} (cryptsetup exit 2)")
        self.log.append("open")
        self.dm[dm_name] = DmMapping("dm-0", dm_name, f"CRYPT-LUKS2-0b0b-{dm_name}", ("md127",))
        return f"/dev/mapper/{dm_name}"

    def close(self, dm_name: str) -> None:
        self.log.append("close")
        self.dm.pop(dm_name, None)

    def mount(self, label: str, source: str, mountpoint: str, fstype: str,
              options: Sequence[str]) -> None:
        if self.fail_mount:
            raise StorageError(f"could not mount {label}: bad superblock")
        self.log.append("mount")
        kname = "dm-0" if "mapper" in source else "sdz"
        self.mounts[mountpoint] = MountEntry(len(self.mounts) + 30, 1, "", "/", mountpoint,
                                             fstype, source, source_kname=kname)

    def unmount(self, label: str, mountpoint: str) -> None:
        self.log.append("umount")
        del self.mounts[mountpoint]

    def attach(self, label: str, image: str, *, read_only: bool) -> str:
        raise AssertionError("not used")

    def detach(self, label: str, device: str) -> None:
        raise AssertionError("not used")

    def autoclear(self, label: str, device: str) -> None:
        raise AssertionError("not used")

    def quiesce(self, label: str, mountpoint: str) -> str:
        self.log.append(f"quiesce {mountpoint}")
        return f"{mountpoint}: synced, still read-write"

    def holders(self, paths: Sequence[str]) -> list[Holder]:
        return list(self.holders_found)


class Services:
    def __init__(self, stack: FakeStack) -> None:
        self.stack = stack

    def stop(self, units: Sequence[str]) -> None:
        self.stack.log.append("systemctl stop " + " ".join(units))
        if not self.stack.stray:
            self.stack.holders_found.clear()  # stopping smbd frees the volume

    def start(self, units: Sequence[str]) -> None:
        self.stack.log.append("systemctl start " + " ".join(units))


@dataclass
class Cli:
    tmp: Path
    stack: FakeStack = field(default_factory=FakeStack)
    runner: ScriptedRunner = field(default_factory=ScriptedRunner)
    stdin: bytes = b""
    tty: bool = False
    out: io.StringIO = field(default_factory=io.StringIO)
    err: io.StringIO = field(default_factory=io.StringIO)

    def __post_init__(self) -> None:
        self.config = self.tmp / "keyd.toml"
        self.config.write_text(CONFIG)

    def run(self, *argv: str) -> int:
        """Like keydctl's main: parse, run the handler, map KeydError to its exit code."""
        args = keydctl.build_parser().parse_args(
            [*argv[:1], "--config", str(self.config), "--run-dir", str(self.tmp / "run"),
             *argv[1:]])
        stack = self.stack
        args.environment = Environment(
            self.runner, stack, Storage(stack, stack, stack, stack), stack, Services(stack),
            io.BytesIO(self.stdin), self.out, self.err, self.tty, ask=lambda _: "sesame",
            sleep=lambda _: None, root=self.tmp)
        try:
            return int(args.func(args))
        except KeydError as exc:
            self.err.write(user_message(exc) + "\n")
            return exc.exit_code


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_unlock_with_key_file_then_again_is_a_no_op(cli: Cli) -> None:
    key = cli.tmp / "key"
    key.write_bytes(b"sesame\n")
    assert cli.run("unlock", "tank", "--key-file", str(key)) == 0
    assert cli.stack.log == ["assemble", "open", "mount"]
    assert "volume tank unlocked at /srv/tank" in cli.out.getvalue()
    assert "keydctl: assembling md0" in cli.err.getvalue()  # progress on stderr
    assert cli.run("unlock", "tank", "--key-file", str(key)) == 0
    assert cli.stack.log == ["assemble", "open", "mount"]
    assert "volume tank already unlocked" in cli.out.getvalue()


def test_unlock_with_passphrase_prompt_and_from_stdin(cli: Cli) -> None:
    cli.tty = True
    assert cli.run("unlock", "tank", "--passphrase") == 0
    cli.run("lock", "tank")
    cli.tty, cli.stdin = False, b"sesame\n"
    assert cli.run("unlock", "tank", "--passphrase") == 0
    assert cli.stack.log.count("open") == 2


def test_key_on_stdin_via_dash(cli: Cli) -> None:
    cli.stdin = b"sesame"
    assert cli.run("unlock", "tank", "--key-file", "-") == 0


def test_wrong_key_exits_6_and_leaves_nothing_open(cli: Cli) -> None:
    cli.stdin = b"wrong"
    assert cli.run("unlock", "tank", "--key-file", "-") == 6
    assert "wrong key for volume tank (cryptsetup exit 2)" in cli.err.getvalue()
    assert "rolled back" in cli.err.getvalue()
    assert cli.stack.md == {} and cli.stack.dm == {}


def test_failure_in_the_top_layer_rolls_back(cli: Cli) -> None:
    cli.stack.fail_mount = True
    cli.stdin = b"sesame"
    assert cli.run("unlock", "tank", "--key-file", "-") == 1
    assert cli.stack.log == ["assemble", "open", "close", "stop"]


@pytest.mark.parametrize(("argv", "words"), [
    (("unlock", "tank"), "needs a key (crypt0)"),
    (("unlock", "tank", "--key-file", "a", "--key-file", "b"), "only one --key-file"),
    (("unlock", "tank", "--key-file", "nokey=/x"), "no key named 'nokey'"),
])
def test_unlock_usage_errors_exit_2(cli: Cli, argv: tuple[str, ...], words: str) -> None:
    assert cli.run(*argv) == 2
    assert words in cli.err.getvalue()


def test_named_key_file_and_volume_without_keys(cli: Cli) -> None:
    key = cli.tmp / "k"
    key.write_bytes(b"sesame")
    assert cli.run("unlock", "tank", "--key-file", f"crypt0={key}") == 0
    assert cli.run("unlock", "plainfs", "--start-services") == 0
    assert "volume plainfs unlocked at /srv/usb" in cli.out.getvalue()


def test_passphrase_missing_on_stdin(cli: Cli) -> None:
    assert cli.run("unlock", "tank", "--passphrase") == 6
    assert "no passphrase on stdin" in cli.err.getvalue()


def test_unknown_volume_is_a_config_error(cli: Cli) -> None:
    assert cli.run("unlock", "nope", "--passphrase") == 3
    assert "configured volumes: tank, plainfs" in cli.err.getvalue()


def test_lock_busy_lists_pids_then_force_stops_services(cli: Cli) -> None:
    cli.stdin = b"sesame"
    cli.run("unlock", "tank", "--key-file", "-")
    cli.stack.holders_found.append(Holder(4242, "smbd", "cwd in", "/srv/tank/share"))
    assert cli.run("lock", "tank") == 5
    assert "pid 4242 (smbd): cwd in /srv/tank/share" in cli.err.getvalue()
    assert "umount" not in cli.stack.log
    assert cli.run("lock", "tank", "--force") == 0
    assert cli.stack.log[-4:] == ["systemctl stop smbd.service", "umount", "close", "stop"]
    assert cli.run("lock", "tank") == 0
    assert "volume tank already locked" in cli.out.getvalue()


def test_shutdown_without_keyd_locks_what_is_open_and_flushes_what_is_busy(cli: Cli) -> None:
    cli.stdin = b"sesame"
    cli.run("unlock", "tank", "--key-file", "-")
    cli.stack.holders_found.append(Holder(4242, "smbd", "cwd in", "/srv/tank/share"))
    assert cli.run("shutdown") == 0  # smbd is tank's service: stopped, then tank locked
    assert cli.out.getvalue().endswith("volume tank locked\n")
    assert cli.stack.log[-4:] == ["systemctl stop smbd.service", "umount", "close", "stop"]

    cli.stdin = b"sesame"
    cli.run("unlock", "tank", "--key-file", "-")
    cli.stack.stray = True
    cli.stack.holders_found.append(Holder(77, "sh", "cwd in", "/srv/tank"))
    before = len(cli.stack.log)
    assert cli.run("shutdown") == 1
    assert cli.stack.log[before:] == ["systemctl stop smbd.service", "quiesce /srv/tank"]
    err = cli.err.getvalue()
    assert "keydctl: volume tank left open: volume tank is busy\n  pid 77 (sh): cwd in /srv/tank" \
        in err and "keydctl:   /srv/tank: synced, still read-write" in err


def test_status_table_and_json(cli: Cli) -> None:
    cli.stdin = b"sesame"
    cli.run("unlock", "tank", "--key-file", "-")
    cli.out.truncate(0)
    cli.out.seek(0)
    assert cli.run("status") == 0
    table = cli.out.getvalue().splitlines()
    assert table[0].split() == ["VOLUME", "STATE", "LAYER", "KIND", "LAYER", "STATE", "DEVICE",
                                "DETAIL"]
    assert table[1].split()[:6] == ["tank", "unlocked", "data", "mount", "open", "/dev/dm-0"]
    assert "plainfs  locked" in cli.out.getvalue()
    cli.out.truncate(0)
    cli.out.seek(0)
    assert cli.run("status", "tank", "--json") == 0
    data = json.loads(cli.out.getvalue())
    (volume,) = data["volumes"]
    assert volume["state"] == "unlocked"
    assert [layer["name"] for layer in volume["layers"]] == ["data", "crypt0", "md0"]
    assert volume["layers"][0]["mountpoint"] == "/srv/tank"


def test_status_shows_conflicts_and_empty_configs(cli: Cli) -> None:
    cli.stack.mounts["/srv/usb"] = MountEntry(9, 1, "8:1", "/", "/srv/usb", "vfat", "/dev/sda1",
                                              source_kname="sda1")
    cli.run("status", "plainfs")
    assert "conflict" in cli.out.getvalue() and "already has /dev/sda1" in cli.out.getvalue()
    cli.config.write_text("")
    cli.run("status")
    assert "no volumes configured" in cli.out.getvalue()


def test_check_config_prints_each_stack(cli: Cli) -> None:
    assert cli.run("check-config") == 0
    assert "tank: md0 (raid) -> crypt0 (crypt) -> data (mount); services: smbd.service" \
        in cli.out.getvalue()
    cli.config.write_text("[volume.tank.layer.x]\nkind = 'lvm'\n")
    assert cli.run("check-config") == 3
    assert "keyd.toml:2 [volume.tank.layer.x.kind]" in cli.err.getvalue()


def test_doctor_reports_problems_with_fixes(cli: Cli) -> None:
    (cli.tmp / "sys" / "module" / "raid1").mkdir(parents=True)
    cli.runner.on("modprobe", "-n", "-v", "dm_crypt", reply=Reply(
        "insmod /lib/modules/x/dm-crypt.ko\n")) \
        .on("modprobe", reply=Reply(stderr="modprobe: FATAL: Module not found\n", returncode=1)) \
        .on("cryptsetup", reply=Reply("cryptsetup 2.6.1\n"))
    assert cli.run("doctor") == 1
    out = cli.out.getvalue()
    assert "ok    program   cryptsetup: cryptsetup 2.6.1" in out
    assert "ok    module    dm_crypt: loadable" in out
    assert "ok    module    raid1: built into the kernel" in out
    assert "FAIL  module    raid456: not available" in out and "fix: install" in out
    assert "ok    device    plainfs/fs: /dev/disk/by-id/usb -> /dev/sdz" in out
    assert "WARN  device    tank/md0: 2 of 2 members" not in out


def test_doctor_with_a_broken_config_still_checks_the_rest(cli: Cli) -> None:
    cli.config.write_text("[volume.x]\nbogus = 1\n")
    assert cli.run("doctor") == 1
    assert "FAIL  config" in cli.out.getvalue() and "run dir" in cli.out.getvalue()


@pytest.mark.parametrize("config", [None, "", configs.layer("usb", "fs", "mount", device="/dev/sdz",
                                                                 fstype="ext4", mountpoint="/srv/usb")],
                         ids=["no-config-file", "empty-config", "no-crypt-layer"])
def test_doctor_without_crypt_layers_on_a_kernel_without_dm_crypt_gives_its_findings(
        cli: Cli, config: str | None) -> None:
    if config is None:
        cli.config.unlink(missing_ok=True)
    else:
        cli.config.write_text(config)
    cli.runner.on("modprobe", reply=Reply(stderr="modprobe: FATAL: Module not found\n", returncode=1))

    assert cli.run("doctor") in (0, 1)

    out = cli.out.getvalue()
    assert ("FAIL  config" in out) == (config is None), out
    assert "dm_crypt" not in out and "run dir" in out, out


def test_real_main_boundary_maps_config_errors(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "keyd.toml"
    config.write_text(textwrap.dedent("""
        [volume.a.layer.m]
        kind = "mount"
        fstype = "ext4"
        mountpoint = "relative"
        device = "/dev/sdb"
    """))
    assert keydctl.main(["check-config", "--config", str(config)]) == 3
    assert "mountpoint 'relative' is not an absolute path" in capsys.readouterr().err
