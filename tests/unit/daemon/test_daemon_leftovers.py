"""Start-up waits for helpers (cryptsetup, mount) a killed keyd left in its cgroup."""

from __future__ import annotations

from pathlib import Path

from keyd.daemon.leftovers import cgroup_processes, leftover_helpers, wait_for_leftovers


def test_only_helper_programs_other_than_keyd_itself_count() -> None:
    comms = {10: "keyd", 11: "cryptsetup", 12: "ntfs-3g", 13: "mount", 14: ""}
    assert leftover_helpers(10, comms) == {11: "cryptsetup", 13: "mount"}


def test_waits_until_the_orphaned_cryptsetup_is_gone() -> None:
    snapshots = [{1: "keyd", 2: "cryptsetup"}, {1: "keyd", 2: "cryptsetup"}, {1: "keyd"}]
    sleeps: list[float] = []
    left = wait_for_leftovers(lambda: snapshots.pop(0), timeout=10, sleep=sleeps.append,
                              clock=lambda: 0.0, own_pid=1)
    assert list(left) == [] and len(sleeps) == 2 and snapshots == []


def test_gives_up_after_the_timeout_and_names_what_is_left() -> None:
    now = iter([0.0, 1.0, 5.0, 11.0])
    left = wait_for_leftovers(lambda: {2: "mdadm"}, timeout=10, sleep=lambda _s: None,
                              clock=lambda: next(now), own_pid=1)
    assert list(left) == ["mdadm"]


def test_no_wait_at_all_when_nothing_is_left() -> None:
    sleeps: list[float] = []
    assert list(wait_for_leftovers(lambda: {1: "keyd", 3: "ntfs-3g"}, timeout=10,
                                   sleep=sleeps.append, own_pid=1)) == []
    assert sleeps == []


def test_reads_the_processes_of_its_own_v2_cgroup(tmp_path: Path) -> None:
    proc, cgroupfs = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/system.slice/keyd.service\n")
    unit = cgroupfs / "system.slice" / "keyd.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.procs").write_text("7\n9\n")
    (proc / "7").mkdir()
    (proc / "7" / "comm").write_text("keyd\n")
    (proc / "9").mkdir()
    (proc / "9" / "comm").write_text("cryptsetup\n")
    assert cgroup_processes(proc, cgroupfs) == {7: "keyd", 9: "cryptsetup"}


def test_an_unreadable_cgroup_means_no_leftovers_known(tmp_path: Path) -> None:
    assert cgroup_processes(tmp_path / "proc", tmp_path / "cg") == {}
