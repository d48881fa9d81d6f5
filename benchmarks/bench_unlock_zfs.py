"""Benchmark, in the real-kernel lab: keyd's overhead unlocking a two-volume ZFS mirror.

Boots its own lab VM (with ZFS, the lab's default), builds two LUKS2 volumes (fast
PBKDF2, so key derivation does not drown keyd's own time) and a mirror pool over
their mappings, then runs keyd's Engine in the guest on ``SubprocessRunner(Timing())``:
unlock = open both mappings + ``zpool import`` (plus keyd's observations: zpool
list/status). Prints keyd's wall time / the summed wall time of the programs it
ran, N times with a lock in between; the goal is <= 1.05. No asserts (TCG:
absolute times are emulated, the ratio is what matters). The config comes from
tests/configs.py: lab_unlock, imported first, puts the checkout's root on
sys.path, so no PYTHONPATH is needed:

    .venv/bin/python benchmarks/bench_unlock_zfs.py [-n 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# First: it puts the checkout's root on sys.path (for tests.configs).
from lab_unlock import booted_lab, run_in_guest, show_unlocks

from keyd_lab.media import create_disk
from keyd_lab.vm import Lab
from tests.configs import LUKS, zfs_on_crypt

WORK = "/run/keyd-bench-zfs"
KEY = b"benchmark key"


def bench_config(disk1: str, disk2: str) -> str:
    """Volume bench: the pool benchpool on two LUKS2 layers, c1 and c2, sharing key k."""
    return zfs_on_crypt("bench", {"c1": disk1, "c2": disk2}, pool="benchpool", crypt=LUKS,
                        keys={"c1": "k", "c2": "k"})


# Runs in the guest with the checkout's venv; prints one JSON document.
GUEST_SCRIPT = r'''
import json, sys
from lab_unlock import unlock_rounds
from keyd.config.parse import load_config
from keyd.engine.keys import MappingKeys

work, rounds = sys.argv[1], int(sys.argv[2])
volume = load_config(f"{work}/keyd.toml").volume("bench")
keys = MappingKeys({"k": open(f"{work}/key", "rb").read()})
print(json.dumps({"unlocks": unlock_rounds(work, volume, keys, rounds)}))
'''


def build_pool(lab: Lab, images: Path) -> tuple[str, str]:
    """Two 128 MB LUKS2 disks, a mirror pool over their mappings, exported and closed."""
    disks = [lab.attach_disk(create_disk(images / f"BZFS{i}.img", 128), f"BZFS{i}")
             for i in range(2)]
    for i, disk in enumerate(disks):
        lab.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                   "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", disk],
                  input=KEY, timeout=120)
        lab.check(["cryptsetup", "open", "--key-file=-", disk, f"bsetup{i}"], input=KEY)
    lab.check(["modprobe", "zfs"], timeout=120)
    lab.check(["zpool", "create", "-f", "-o", "ashift=9", "-O", "mountpoint=/mnt/benchpool",
               "benchpool", "mirror", "/dev/mapper/bsetup0", "/dev/mapper/bsetup1"], timeout=120)
    lab.sh("head -c 4000000 /dev/urandom > /mnt/benchpool/data && zpool export benchpool && "
           "cryptsetup close bsetup0 && cryptsetup close bsetup1", timeout=120)
    return disks[0], disks[1]


def main() -> int:
    """Boot a lab with ZFS, measure, print, shut it down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=5, help="unlock/lock rounds")
    args = parser.parse_args()
    with booted_lab("bench-unlock-zfs") as (lab, images):
        disk1, disk2 = build_pool(lab, images)
        files: dict[str, str | bytes] = {"keyd.toml": bench_config(disk1, disk2), "key": KEY,
                                         "bench.py": GUEST_SCRIPT}
        show_unlocks("2 x LUKS2 -> zfs mirror",
                     run_in_guest(lab, WORK, files, rounds=args.rounds)["unlocks"])
        lab.run(["zpool", "export", "-f", "benchpool"], timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
