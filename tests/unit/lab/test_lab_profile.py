"""The VM tier's profile: guest commands sorted into kinds of cost, files summed, the summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyd_lab.profile import (
    KINDS,
    Ledger,
    file_costs,
    kind_of,
    load_walls,
    longest_first,
    profile_table,
    save_walls,
    summary_lines,
)


@pytest.mark.parametrize(("argv", "kind"), [
    (["sh", "-c", "for i in $(seq 240); do ( busctl call x ) && exit 0; sleep 0.5; done"], "waits"),
    (["udevadm", "wait", "--timeout=30", "/dev/disk/by-id/virtio-X"], "waits"),
    (["/bin/sh", "-ec", "sleep 3"], "waits"),
    (["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "./keyd.deb"], "apt"),
    (["sh", "-c", "mkinitramfs -o /boot/initrd.img"], "mkinitramfs"),
    (["zpool", "create", "-f", "tank", "mirror", "/dev/a", "/dev/b"], "zfs"),
    (["mdadm", "--create", "/dev/md/x"], "md"),
    (["cryptsetup", "luksFormat", "--batch-mode", "/dev/vda"], "cryptsetup"),
    (["/work/main/.venv/bin/python", "-m", "keyd.cli.main", "unlock", "nas"], "keyd python"),
    (["/usr/bin/keydctl", "status"], "keyd python"),
    (["gpg", "--homedir", "/etc/keyd/gnupg", "--import"], "gpg"),
    (["systemctl", "restart", "keyd.service"], "systemctl"),
    (["mkdir", "-p", "/mnt/t"], "guest other"),
])
def test_a_command_is_counted_as_its_kind(argv: list[str], kind: str) -> None:
    assert kind_of(argv) == kind
    assert kind in KINDS


def test_a_files_host_time_is_what_no_guest_kind_accounts_for() -> None:
    ledger = Ledger()
    with ledger.scoped("tests/vm/test_a.py"):
        ledger.add("boot", 30.0)
        ledger.add("waits", 5.0)
        ledger.add("waits", 5.0)
    ledger.add("apt", 99.0)  # outside any test file

    [cost] = file_costs({"tests/vm/test_a.py": 50.0}, ledger)

    assert cost.kinds == {"boot": 30.0, "waits": 10.0, "host": 10.0}
    assert ledger.scope == "(outside tests)"


def test_workers_ledgers_add_up_and_the_slowest_file_comes_first() -> None:
    ledger, worker = Ledger(), Ledger()
    with ledger.scoped("tests/vm/test_a.py"):
        ledger.add("boot", 30.0)
    with worker.scoped("tests/vm/test_a.py"):
        worker.add("boot", 31.0)
    with worker.scoped("tests/vm/test_b.py"):
        worker.add("keyd python", 100.0)
    ledger.merge(worker.seconds)

    costs = file_costs({"tests/vm/test_a.py": 70.0, "tests/vm/test_b.py": 125.0}, ledger)
    lines = summary_lines(costs, tier_wall=130.0, workers=2)

    assert [c.name for c in costs] == ["tests/vm/test_b.py", "tests/vm/test_a.py"]
    assert costs[1].kinds["boot"] == 61.0
    assert lines[0] == "keyd-lab: VM tier 2m10s wall on 2 worker(s), 3m15s of test time in 2 files"
    assert lines[1] == "    2m05s  tests/vm/test_b.py  (keyd python 100 s, host 25 s)"
    assert lines[2] == "    1m10s  tests/vm/test_a.py  (boot 61 s, host 9 s)"
    assert lines[3] == "  by kind: boot 1m01s, keyd python 1m40s, host 0m34s"


def test_files_never_timed_run_first_then_the_longest() -> None:
    walls = {"a.py": 10.0, "b.py": 300.0, "c.py": 60.0, "gone.py": 999.0}

    assert longest_first(["a.py", "b.py", "new.py", "c.py"], walls) == ["new.py", "b.py", "c.py", "a.py"]
    assert longest_first(["a.py", "b.py"], {}) == ["a.py", "b.py"]


def test_kept_times_are_updated_file_by_file(tmp_path: Path) -> None:
    kept = tmp_path / "cache" / "walls.json"
    assert load_walls(kept) == {}
    save_walls(kept, {"a.py": 10.0, "b.py": 20.0})

    save_walls(kept, {"b.py": 25.0})

    assert load_walls(kept) == {"a.py": 10.0, "b.py": 25.0}
    kept.write_text("not json")
    assert load_walls(kept) == {}


def test_the_table_has_a_column_per_kind_spent_and_a_total_row() -> None:
    ledger = Ledger()
    with ledger.scoped("tests/vm/test_a.py"):
        ledger.add("boot", 30.0)
    with ledger.scoped("tests/vm/test_b.py"):
        ledger.add("apt", 20.0)

    table = profile_table(file_costs({"tests/vm/test_a.py": 40.0, "tests/vm/test_b.py": 20.0}, ledger))

    assert table.splitlines() == [
        "| file | wall | boot | apt | host |",
        "|---|---|---|---|---|",
        "| test_a.py | 0m40s | 30 | 0 | 10 |",
        "| test_b.py | 0m20s | 0 | 20 | 0 |",
        "| all files | 1m00s | 30 | 20 | 10 |",
    ]
