"""What keyd's userspace crypt adapter reads from sysfs and procfs to find and wait for its servers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from keyd.adapters.usercrypt import UserspaceCrypt, exited, loops_of, server_pids
from keyd.config.model import CryptLayer
from keyd.crypto.errors import UnsupportedCipher
from keyd.errors import user_message


def test_a_child_that_exited_is_reaped_and_a_zombie_of_another_parent_counts_as_gone(
        tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])  # keyd's own server, as in the daemon
    deadline = time.monotonic() + 10
    while not exited(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not Path(f"/proc/{child.pid}").exists()  # reaped: no zombie left behind
    proc = tmp_path / "proc"
    for pid, state in ((4242, "S"), (4343, "Z")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (python3 x) {state} 1 1 1 0 -1\n")
    assert not exited(4242, str(proc)) and exited(4343, str(proc)) and exited(4444, str(proc))


def test_a_child_that_exits_between_the_two_looks_is_still_reaped(monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie now, not yet reaped
    real_waitpid, calls = os.waitpid, []

    def still_running_at_first(pid: int, options: int) -> tuple[int, int]:
        calls.append(pid)
        return (0, 0) if len(calls) == 1 else real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", still_running_at_first)

    assert exited(child.pid)
    assert not Path(f"/proc/{child.pid}").exists()


def test_servers_and_their_loop_devices_are_found_by_name_and_backing_file(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, cmdline in ((10, b"@keyd-crypt\0nas-tc\0\0\0"), (11, b"@keyd-crypt\0other-tc\0"),
                         (12, b"python3\0-m\0keyd.crypto.serve\0nas-tc\0"), (13, b"bash\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(cmdline)
    (proc / "self").mkdir()
    assert sorted(server_pids("nas-tc", str(proc))) == [10, 12]
    sys_root = tmp_path / "sys"
    for loop, backing in (("loop3", "/run/keyd/crypt/keyd-nas-tc/volume"), ("loop4", "/srv/a.img")):
        (sys_root / "block" / loop / "loop").mkdir(parents=True)
        (sys_root / "block" / loop / "loop" / "backing_file").write_text(backing + "\n")
    assert loops_of("/run/keyd/crypt/keyd-nas-tc/volume", str(sys_root)) == ["/dev/loop3"]


def test_a_refusal_says_what_and_its_fix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise UnsupportedCipher("serpent-xts-plain64", "not implemented in userspace")

    monkeypatch.setattr("keyd.adapters.usercrypt._check_fuse", lambda: None)
    monkeypatch.setattr("keyd.adapters.usercrypt.tcrypt_served", refuse)
    layer = CryptLayer(name="tc", type="tcrypt", key="tc", key_format="passphrase", device="/dev/sdb")

    with pytest.raises(Exception) as refused:
        UserspaceCrypt.__new__(UserspaceCrypt).open("nas", layer, "/dev/sdb", "keyd-nas-tc", b"pass")

    text = user_message(refused.value)
    assert "cannot open tc of volume nas in userspace: cipher 'serpent-xts-plain64'" in text, text
    assert text.count("fix:") == 1 and "caused by" not in text, text
