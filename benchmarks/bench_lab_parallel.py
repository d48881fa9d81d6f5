"""Benchmark: two lab guests at once, each with one vCPU or with two, against one guest alone.

The VM tier runs one guest per pytest-xdist worker. Each guest here does what a VM test
does most (keyd_lab.profile's larger kinds): boot, start keydctl's Python a few times,
format and open a fast-PBKDF2 LUKS2 disk, make and mount ext4 and write to it. Printed side
by side: one guest with two vCPUs (the serial tier), then two guests at once with two vCPUs
each and with one vCPU each: their wall time for the same work and the ratio to the serial
time for twice the work. No asserts.

    .venv/bin/python benchmarks/bench_lab_parallel.py [-n 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from keyd.runner import SubprocessRunner
from keyd_lab.build import Artifacts, new_run_dir, prepare
from keyd_lab.media import create_disk
from keyd_lab.vm import Lab, LabOptions

KEYDCTL = [sys.executable, "-m", "keyd.cli.main", "--version"]
WORK = """
cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
  --key-file=/run/key /dev/disk/by-id/virtio-BENCH
cryptsetup open --key-file=/run/key /dev/disk/by-id/virtio-BENCH bench
mkfs.ext4 -q /dev/mapper/bench && mkdir -p /mnt/bench && mount /dev/mapper/bench /mnt/bench
dd if=/dev/urandom of=/mnt/bench/data bs=1M count=16 status=none && sync
umount /mnt/bench && cryptsetup close bench
"""


def guest_run(artifacts: Artifacts, cpus: int, label: str) -> float:
    """One guest: boot, the work, shut down; its wall seconds."""
    run_dir = new_run_dir(f"bench-{label}")
    started = time.monotonic()
    lab = Lab.boot(artifacts.kernel, artifacts.initramfs, run_dir, LabOptions(cpus=cpus))
    try:
        lab.attach_disk(create_disk(run_dir / "bench.img", 64), "BENCH")
        for _ in range(4):
            lab.check(KEYDCTL, timeout=120)
        lab.check(["sh", "-c", "head -c 32 /dev/urandom > /run/key"])
        lab.sh(WORK, timeout=600)
        return time.monotonic() - started
    finally:
        lab.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def together(artifacts: Artifacts, cpus: int) -> float:
    """Two guests at once; the wall seconds until both are done."""
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: guest_run(artifacts, cpus, f"{cpus}cpu-{i}"), range(2)))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2, help="rounds")
    args = parser.parse_args()
    artifacts = prepare(SubprocessRunner())
    samples: dict[str, list[float]] = {"alone": [], "two-2cpu": [], "two-1cpu": []}
    for round_ in range(args.n):
        samples["alone"].append(guest_run(artifacts, 2, "alone"))
        samples["two-2cpu"].append(together(artifacts, 2))
        samples["two-1cpu"].append(together(artifacts, 1))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in samples.items()),
              flush=True)
    alone = statistics.median(samples["alone"])
    for label in ("two-2cpu", "two-1cpu"):
        both = statistics.median(samples[label])
        print(f"{label}: {both:.1f} s for twice the work of one guest alone ({alone:.1f} s): "
              f"{both / (2 * alone):.2f} of the serial time")


if __name__ == "__main__":
    main()
