"""Benchmark, in the real-kernel lab: keyd's unlock overhead and status latency.

Boots its own lab VM, builds RAID1 -> LUKS2 -> ext4 in the guest, then runs a
script in the guest that drives keyd's Engine on ``SubprocessRunner(Timing())``:

- unlock: keyd's wall time / the summed wall time of the programs it ran
  (mdadm, cryptsetup, mount...), N times with a lock in between; goal <= 1.05;
- ``keydctl status`` latency on a 5-volume config, as a whole process (what a
  user waits for) and in-process (observe + report); goal <= 100 ms.

Prints figures and ratios; no asserts (the guest is emulated, TCG: absolute
times are slow, the ratios are what matter). The configs come from tests/configs.py:
lab_unlock, imported first, puts the checkout's root on sys.path, so no PYTHONPATH is needed:

    .venv/bin/python benchmarks/bench_unlock.py [-n 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# First: it puts the checkout's root on sys.path (for tests.configs).
from lab_unlock import GUEST_PYTHON, ROOT, booted_lab, ms, run_in_guest, show_unlocks

from keyd_lab.media import create_disk
from keyd_lab.vm import Lab
from tests.configs import LUKS, PLAIN_2006, TCRYPT, crypt_mount, luks_on_raid

WORK = "/run/keyd-bench"
KEY = b"benchmark key"
# Volume bench, RAID1 -> LUKS2 -> ext4; the array's UUID is filled in with VOLUME.format(uuid=...).
VOLUME = luks_on_raid("{uuid}", volume="bench", mountpoint="/mnt/bench")
# Four more volumes for the status bar: their disks are absent, as on a NAS with spares.
OTHERS = "".join(crypt_mount(f"spare{i}", f"/dev/disk/by-id/virtio-ABSENT{i}", crypt,
                             names=("c", "fs"), fstype="xfs", mountpoint=f"/mnt/spare{i}")
                 for i, crypt in enumerate((LUKS, PLAIN_2006, TCRYPT, LUKS), 1))

# Runs in the guest with the checkout's venv; prints one JSON document.
GUEST_SCRIPT = r'''
import json, subprocess, sys, time
from lab_unlock import engine, unlock_rounds
from keyd.config.parse import load_config
from keyd.engine.keys import MappingKeys
from keyd.engine.observe import KernelObserver
from keyd.engine.status import report
from keyd.runner import SubprocessRunner, Timing

work, rounds, python = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = load_config(f"{work}/keyd.toml")
volume = config.volume("bench")
keys = MappingKeys({"luks": open(f"{work}/key", "rb").read()})
unlocks = unlock_rounds(work, volume, keys, rounds)

engine(work, Timing()).unlock(volume, keys)  # status is measured on an unlocked volume
argv = [python, "-m", "keyd.cli.main", "status", "--config", f"{work}/keyd.toml",
        "--run-dir", f"{work}/run"]
process = []
for _ in range(max(rounds * 2, 10)):
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    process.append(time.monotonic() - started)
observer = KernelObserver(SubprocessRunner())
inproc = []
for _ in range(50):
    started = time.monotonic()
    [report(v, observer.observe(config.volumes, members=False)) for v in config.volumes]
    inproc.append(time.monotonic() - started)
started = time.monotonic()
subprocess.run([python, "-c", "pass"], check=True)
bare = time.monotonic() - started
engine(work, Timing()).lock(volume)
print(json.dumps({"unlocks": unlocks, "status_process": process, "status_inproc": inproc,
                  "python_start": bare, "volumes": len(config.volumes)}))
'''


def build_volume(lab: Lab, images: Path) -> str:
    """RAID1 (2 x 64 MB) -> LUKS2 (fast PBKDF2) -> ext4 in the guest; return the array UUID."""
    members = [lab.attach_disk(create_disk(images / f"BENCH{i}.img", 64), f"BENCH{i}")
               for i in range(2)]
    lab.check(["mdadm", "--create", "/dev/md/bench", "--run", "--level=1", "--raid-devices=2",
               "--assume-clean", "--metadata=1.2", *members], timeout=120)
    export = lab.check(["mdadm", "--detail", "--export", "/dev/md/bench"]).stdout
    uuid = dict(line.split("=", 1) for line in export.splitlines() if "=" in line)["MD_UUID"]
    lab.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
               "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", "/dev/md/bench"],
              input=KEY, timeout=120)
    lab.check(["cryptsetup", "open", "--key-file=-", "/dev/md/bench", "benchfs"], input=KEY)
    lab.sh("mkfs.ext4 -q /dev/mapper/benchfs && cryptsetup close benchfs && "
           "mdadm --stop /dev/md/bench && udevadm settle", timeout=120)
    return uuid


def show(result: dict[str, Any]) -> None:
    """Print the figures and ratios."""
    show_unlocks("RAID1 -> LUKS2 -> ext4", result["unlocks"])
    process, inproc = result["status_process"], result["status_inproc"]
    print(f"keydctl status, {result['volumes']} volumes, whole process "
          f"({len(process)} runs): median {ms(statistics.median(process))}, "
          f"min {ms(min(process))}, max {ms(max(process))} (goal <= 100 ms)")
    print(f"  of which a bare `python -c pass` start: {ms(result['python_start'])}")
    print(f"  in-process observe + report ({len(inproc)} runs): median "
          f"{ms(statistics.median(inproc))}")


def host_status(rounds: int) -> None:
    """The same 5-volume ``keydctl status`` as a process on this (non-emulated) host, for scale.

    Here the disks are absent, so every volume is locked; the guest figure includes one
    unlocked RAID1/LUKS2/ext4 stack.
    """
    python = str(ROOT / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="keyd-bench-status-") as work:
        config = Path(work) / "keyd.toml"
        config.write_text(VOLUME.format(uuid="0" * 32) + OTHERS)
        argv = [python, "-m", "keyd.cli.main", "status", "--config", str(config),
                "--run-dir", work]
        times = [timed(argv) for _ in range(max(rounds * 2, 10))]
        bare = statistics.median(timed([python, "-c", "pass"]) for _ in range(5))
    print(f"same status on this host (native, not emulated): median {ms(statistics.median(times))}"
          f", min {ms(min(times))}; bare python start {ms(bare)}")


def timed(argv: list[str]) -> float:
    """Wall time of one run of ``argv``."""
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    return time.monotonic() - started


def main() -> int:
    """Boot a lab, measure, print, shut it down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=5, help="unlock/lock rounds")
    args = parser.parse_args()
    with booted_lab("bench-unlock") as (lab, images):
        uuid = build_volume(lab, images)
        files: dict[str, str | bytes] = {"keyd.toml": VOLUME.format(uuid=uuid) + OTHERS, "key": KEY,
                 "bench.py": GUEST_SCRIPT}
        show(run_in_guest(lab, WORK, files, GUEST_PYTHON, rounds=args.rounds))
    host_status(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
