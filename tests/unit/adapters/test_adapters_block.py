"""mdadm, mount/umount, losetup, /proc holders and systemctl adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyd.adapters.block import Losetup, Mdadm, Mounter
from keyd.adapters.retry import Retry
from keyd.adapters.system import ProcHolders, Systemctl
from keyd.engine.errors import Holder, StorageError, VolumeBusy
from tests.support.scripted_runner import Reply, ScriptedRunner

UUID = "6b8b4567327b23c6643c986966334873"


def test_assemble_by_uuid_with_run_only_when_allowed() -> None:
    runner = ScriptedRunner()
    mdadm = Mdadm(runner)
    assert mdadm.assemble("md0", "keyd-t-md0", UUID, ["/dev/sdb", "/dev/sdc"], run=False) \
        == "/dev/md/keyd-t-md0"
    mdadm.assemble("md0", "keyd-t-md0", UUID, ["/dev/sdb"], run=True)
    assert runner.argvs() == [
        ("mdadm", "--assemble", "/dev/md/keyd-t-md0",
         "--uuid=6b8b4567:327b23c6:643c9869:66334873", "/dev/sdb", "/dev/sdc"),
        ("mdadm", "--assemble", "/dev/md/keyd-t-md0",
         "--uuid=6b8b4567:327b23c6:643c9869:66334873", "--run", "/dev/sdb")]


@pytest.mark.parametrize("action", ["assemble", "stop"])
def test_mdadm_failures_name_the_layer(action: str) -> None:
    runner = ScriptedRunner().on("mdadm", reply=Reply(stderr="mdadm: no devices found\n",
                                                      returncode=1))
    mdadm = Mdadm(runner)
    with pytest.raises(StorageError, match="raid layer md0 of volume t: mdadm: no devices"):
        if action == "assemble":
            mdadm.assemble("raid layer md0 of volume t", "n", UUID, [], run=False)
        else:
            mdadm.stop("raid layer md0 of volume t", "/dev/md127")


def test_stop_argv() -> None:
    runner = ScriptedRunner()
    Mdadm(runner).stop("x", "/dev/md127")
    assert runner.argvs() == [("mdadm", "--stop", "/dev/md127")]


def test_mount_creates_the_mountpoint_and_passes_options(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    target = str(tmp_path / "srv" / "tank")
    Mounter(runner).mount("data", "/dev/mapper/x", target, "xfs", ["noatime", "nodev"])
    Mounter(runner, create_mountpoints=False).mount("d", "/dev/loop0", "/nowhere", "ext3", [])
    assert os.path.isdir(target)
    assert runner.argvs() == [("mount", "-t", "xfs", "-o", "noatime,nodev", "/dev/mapper/x",
                               target), ("mount", "-t", "ext3", "/dev/loop0", "/nowhere")]


def test_mount_failure_and_busy_unmount() -> None:
    runner = ScriptedRunner().on("mount", reply=Reply(stderr="wrong fs type\n", returncode=32)) \
        .on("umount", "/busy", reply=Reply(stderr="umount: /busy: target is busy.\n",
                                           returncode=32)) \
        .on("umount", reply=Reply(stderr="not mounted\n", returncode=32))
    mounter = Mounter(runner, create_mountpoints=False)
    with pytest.raises(StorageError, match=r"could not mount data \(xfs\) at /m: wrong fs type"):
        mounter.mount("data", "/dev/x", "/m", "xfs", [])
    with pytest.raises(VolumeBusy, match="target is busy"):
        mounter.unmount("data", "/busy")
    with pytest.raises(StorageError, match="not mounted"):
        mounter.unmount("data", "/other")


def test_losetup_attach_and_detach() -> None:
    runner = ScriptedRunner().on("losetup", "--find", reply=Reply("/dev/loop3\n"))
    loops = Losetup(runner)
    assert loops.attach("img", "/m/rootfs", read_only=True) == "/dev/loop3"
    loops.detach("img", "/dev/loop3")
    assert runner.argvs() == [("losetup", "--find", "--show", "--read-only", "/m/rootfs"),
                              ("losetup", "--detach", "/dev/loop3")]


@pytest.mark.parametrize(("reply", "words"), [
    (Reply(stderr="losetup: /m/x: failed to set up loop device\n", returncode=1),
     "could not attach"),
    (Reply("\n"), "did not name"),
])
def test_losetup_attach_failures(reply: Reply, words: str) -> None:
    with pytest.raises(StorageError, match=words):
        Losetup(ScriptedRunner().on("losetup", reply=reply)).attach("img", "/m/x",
                                                                   read_only=False)


def test_losetup_detach_failure_after_retries() -> None:
    runner = ScriptedRunner().on("losetup", reply=Reply(stderr="busy\n", returncode=1))
    sleeps: list[float] = []
    with pytest.raises(StorageError, match="could not detach"):
        Losetup(runner, Retry(attempts=4, sleep=sleeps.append)).detach("img", "/dev/loop0")
    assert len(runner.calls) == 4 and len(sleeps) == 3


def test_a_loop_autoclear_already_detached_is_not_an_error() -> None:
    gone = Reply(stderr="losetup: /dev/loop3: detach failed: No such device or address\n",
                 returncode=1)
    Losetup(ScriptedRunner().on("losetup", reply=gone)).detach("img", "/dev/loop3")


def test_autoclear_is_set_through_the_injected_ioctl_and_a_refusal_is_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    flagged: list[str] = []
    Losetup(ScriptedRunner(), flag_autoclear=flagged.append).autoclear("img", "/dev/loop3")

    def refuse(device: str) -> None:
        raise OSError(6, "No such device or address")

    Losetup(ScriptedRunner(), flag_autoclear=refuse).autoclear("img", "/dev/loop4")
    assert flagged == ["/dev/loop3"]
    assert "cannot set autoclear on /dev/loop4 (img): No such device or address" in caplog.text


def test_ntfs_3g_runs_directly_as_a_root_storage_daemon(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    Mounter(runner, create_mountpoints=False).mount("ntfs", "/dev/mapper/x", "/m", "ntfs-3g",
                                                   ["noatime"])
    [call] = runner.calls
    assert call.argv == ("ntfs-3g", "-o", "noatime", "/dev/mapper/x", "/m")
    assert call.argv0 == "@ntfs-3g"  # spared by systemd-shutdown's killing spree


@pytest.mark.parametrize(("remount", "said"), [
    (Reply(), "/m: synced and remounted read-only"),
    (Reply(stderr="mount: /m: mount point is busy.\n", returncode=32),
     "/m: synced, still read-write (mount: /m: mount point is busy.)"),
])
def test_quiesce_syncs_then_tries_read_only(remount: Reply, said: str) -> None:
    runner = ScriptedRunner().on("mount", reply=remount)
    assert Mounter(runner).quiesce("data", "/m") == said
    assert runner.argvs() == [("sync", "--file-system", "/m"),
                              ("mount", "-o", "remount,ro", "/m")]


def test_mdadm_stop_retries_while_udev_holds_the_array() -> None:
    replies = [Reply(stderr="mdadm: Cannot get exclusive access to /dev/md127\n",
                     returncode=1), Reply()]
    runner = ScriptedRunner().on("mdadm", reply=lambda argv: replies.pop(0))
    sleeps: list[float] = []
    Mdadm(runner, Retry(sleep=sleeps.append)).stop("md0", "/dev/md127")
    assert len(runner.calls) == 2 and sleeps == [0.3]


def make_process(proc: Path, pid: int, comm: str, links: dict[str, str],
                 maps: str = "") -> None:
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "comm").write_text(comm + "\n")
    (base / "maps").write_text(maps)
    for name, target in links.items():
        os.symlink(target, base / name)


def test_holders_found_by_cwd_open_files_and_maps(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    make_process(proc, 100, "bash", {"cwd": "/srv/tank/docs", "root": "/", "exe": "/bin/bash"})
    make_process(proc, 200, "smbd", {"cwd": "/", "fd/0": "/dev/null",
                                     "fd/7": "/srv/tank/a file (deleted)",
                                     "fd/9": "/dev/mapper/keyd-t-c"},
                 maps="7f00-7f01 r-xp 0 08:01 1 /srv/tank/lib.so\n7f02-7f03 rw-p 0 0 0 \n")
    make_process(proc, 300, "idle", {"cwd": "/srv/tankother"})
    (proc / "self").mkdir()
    holders = ProcHolders(tmp_path).holders(["/srv/tank", "/dev/mapper/keyd-t-c"])
    assert holders == [
        Holder(100, "bash", "cwd in", "/srv/tank/docs"),
        Holder(200, "smbd", "open file (fd 7)", "/srv/tank/a file"),
        Holder(200, "smbd", "open file (fd 9)", "/dev/mapper/keyd-t-c"),
        Holder(200, "smbd", "maps", "/srv/tank/lib.so")]
    assert str(holders[0]) == "100 (bash): cwd in /srv/tank/docs"


def test_no_proc_means_no_holders(tmp_path: Path) -> None:
    assert ProcHolders(tmp_path).holders(["/x"]) == []


def test_systemctl_stop_and_start() -> None:
    runner = ScriptedRunner()
    Systemctl(runner).stop(["smbd.service", "nfs-server.service"])
    Systemctl(runner).start(["smbd.service"])
    Systemctl(runner).stop([])
    assert runner.argvs() == [("systemctl", "stop", "--", "smbd.service", "nfs-server.service"),
                              ("systemctl", "start", "--", "smbd.service")]
