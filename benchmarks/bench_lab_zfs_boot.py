"""Benchmark: lab boot time with the ZFS modules tree vs the plain one, and the cached prepare() cost.

Boots alternate (plain, zfs, plain, zfs, ...) so that load from other work on
the box hits both alike. Prints each boot, the medians and their difference;
the issue's bar is "a cached lab with ZFS boots as fast as without (+-2 s)".
The first prepare() with ZFS may build it (minutes, printed); run once before
to time only cached runs. No asserts.

    .venv/bin/python benchmarks/bench_lab_zfs_boot.py [-n 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

from keyd.runner import SubprocessRunner
from keyd_lab.build import Artifacts, new_run_dir, prepare
from keyd_lab.vm import Lab, LabOptions


def prepared(zfs: bool) -> tuple[Artifacts, float]:
    """The artifacts with or without ZFS, and how long prepare() took."""
    os.environ["KEYD_LAB_ZFS"] = "1" if zfs else "0"
    started = time.monotonic()
    artifacts = prepare(SubprocessRunner())
    return artifacts, time.monotonic() - started


def boot_seconds(artifacts: Artifacts, label: str) -> float:
    """Boot to keyd-lab.target, check the modules tree answers, shut down; the boot's seconds."""
    run_dir = new_run_dir(f"bench-{label}")
    lab = Lab.boot(artifacts.kernel, artifacts.initramfs, run_dir, LabOptions())
    try:
        lab.check(["modinfo", "-F", "filename", "zfs" if label == "zfs" else "xfs"])
        return lab.boot_seconds or 0.0
    finally:
        lab.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=3, help="boots of each kind")
    args = parser.parse_args()
    plain, plain_prepare = prepared(zfs=False)
    with_zfs, zfs_prepare = prepared(zfs=True)
    print(f"prepare(): plain {plain_prepare:.2f} s, with zfs {zfs_prepare:.2f} s")
    samples: dict[str, list[float]] = {"plain": [], "zfs": []}
    for round_ in range(args.n):
        for label, artifacts in (("plain", plain), ("zfs", with_zfs)):
            samples[label].append(boot_seconds(artifacts, label))
            print(f"boot {round_ + 1} {label:5}: {samples[label][-1]:.1f} s", flush=True)
    medians = {label: statistics.median(values) for label, values in samples.items()}
    print(f"median boot: plain {medians['plain']:.1f} s, with zfs {medians['zfs']:.1f} s, "
          f"difference {medians['zfs'] - medians['plain']:+.1f} s (bar: within +-2 s)")


if __name__ == "__main__":
    main()
