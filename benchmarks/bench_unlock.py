"""Benchmark (issue 4 bars), in the real-kernel lab: keyd's unlock overhead and status latency.

Boots its own lab VM, builds RAID1 -> LUKS2 -> ext4 in the guest, then runs a
script in the guest that drives keyd's Engine on ``SubprocessRunner(Timing())``:

- unlock: keyd's wall time / the summed wall time of the programs it ran
  (mdadm, cryptsetup, mount...), N times with a lock in between; goal <= 1.05;
- ``keydctl status`` latency on a 5-volume config, as a whole process (what a
  user waits for) and in-process (observe + report); goal <= 100 ms.

Prints figures and ratios; no asserts (the guest is emulated, TCG: absolute
times are slow, the ratios are what matter).

    .venv/bin/python benchmarks/bench_unlock.py [-n 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyd.lab.build import new_run_dir, prepare  # noqa: E402
from keyd.lab.media import create_disk  # noqa: E402
from keyd.lab.vm import Lab, LabOptions  # noqa: E402
from keyd.runner import SubprocessRunner  # noqa: E402

GUEST_PYTHON = str(ROOT / ".venv" / "bin" / "python")
WORK = "/run/keyd-bench"
KEY = b"benchmark key"
VOLUME = """
[volume.bench.layer.md]
kind = "raid"
uuid = "{uuid}"

[volume.bench.layer.luks]
kind = "crypt"
type = "luks"
below = ["md"]

[volume.bench.layer.fs]
kind = "mount"
below = ["luks"]
fstype = "ext4"
mountpoint = "/mnt/bench"
"""
# Four more volumes for the status bar: their disks are absent, as on a NAS with spares.
OTHERS = "".join(f"""
[volume.spare{i}.layer.c]
kind = "crypt"
type = "{kind}"
device = "/dev/disk/by-id/virtio-ABSENT{i}"
{extra}
[volume.spare{i}.layer.fs]
kind = "mount"
below = ["c"]
fstype = "xfs"
mountpoint = "/mnt/spare{i}"
""" for i, kind, extra in ((1, "luks", ""), (2, "plain", 'cipher = "aes-cbc-plain"\nkey_size = 128\n'),
                           (3, "tcrypt", ""), (4, "luks", "")))

# Runs in the guest with the checkout's venv; prints one JSON document.
GUEST_SCRIPT = r'''
import json, statistics, subprocess, sys, time
from keyd.adapters.block import Losetup, Mdadm, Mounter
from keyd.adapters.cryptsetup import Cryptsetup
from keyd.adapters.system import ProcHolders, Systemctl
from keyd.config.parse import load_config
from keyd.engine.keys import MappingKeys
from keyd.engine.observe import KernelObserver
from keyd.engine.ports import Storage
from keyd.engine.service import Engine
from keyd.engine.status import report
from keyd.runner import SubprocessRunner, Timing

work, rounds, python = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = load_config(f"{work}/keyd.toml")
volume = config.volume("bench")
keys = MappingKeys({"luks": open(f"{work}/key", "rb").read()})

def engine(timing):
    runner = SubprocessRunner(timing)
    storage = Storage(Cryptsetup(runner), Mdadm(runner), Mounter(runner), Losetup(runner))
    return Engine(KernelObserver(runner), storage, ProcHolders(), Systemctl(runner),
                  run_dir=f"{work}/run")

unlocks = []
for _ in range(rounds):
    timing = Timing()
    started = time.monotonic()
    outcome = engine(timing).unlock(volume, keys)
    wall = time.monotonic() - started
    assert outcome.changed
    unlocks.append({"wall": wall, "programs": timing.seconds, "calls": timing.calls})
    engine(Timing()).lock(volume)

engine(Timing()).unlock(volume, keys)  # status is measured on an unlocked volume
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
engine(Timing()).lock(volume)
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


def run_in_guest(lab: Lab, uuid: str, rounds: int) -> dict[str, Any]:
    """Install config, key and script over the channel; run the script; parse its JSON."""
    lab.check(["mkdir", "-p", f"{WORK}/run"])
    for name, data in (("keyd.toml", VOLUME.format(uuid=uuid) + OTHERS), ("key", KEY),
                       ("bench.py", GUEST_SCRIPT)):
        lab.check(["sh", "-c", f"cat > {WORK}/{name}"], input=data)
    out = lab.check([GUEST_PYTHON, f"{WORK}/bench.py", WORK, str(rounds), GUEST_PYTHON],
                    timeout=600 + 60 * rounds).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def ms(seconds: float) -> str:
    """Milliseconds, for printing."""
    return f"{seconds * 1000:.1f} ms"


def show(result: dict[str, Any]) -> None:
    """Print the figures and ratios."""
    print("unlock (RAID1 -> LUKS2 -> ext4), keyd's Engine in the guest:")
    ratios = []
    for i, run in enumerate(result["unlocks"], 1):
        ratio = run["wall"] / run["programs"]
        ratios.append(ratio)
        print(f"  run {i}: keyd {ms(run['wall'])}, programs {ms(run['programs'])}, "
              f"overhead {ms(run['wall'] - run['programs'])}, ratio {ratio:.3f}")
    print(f"  median ratio keyd / programs: {statistics.median(ratios):.3f} (goal <= 1.05)")
    print("  programs of the last run:")
    for argv, seconds in result["unlocks"][-1]["calls"]:
        print(f"    {ms(seconds):>10}  {argv}")
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
    artifacts = prepare(SubprocessRunner())
    run_dir = new_run_dir("bench-unlock")
    with tempfile.TemporaryDirectory(prefix="keyd-bench-") as images:
        lab = Lab.boot(artifacts.kernel, artifacts.initramfs, run_dir, LabOptions())
        try:
            print(f"lab booted in {lab.boot_seconds:.1f} s (TCG; absolute times are emulated)")
            uuid = build_volume(lab, Path(images))
            show(run_in_guest(lab, uuid, args.rounds))
        finally:
            lab.close()
    host_status(args.rounds)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
