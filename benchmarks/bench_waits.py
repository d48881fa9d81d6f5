"""Benchmark: what a person waits for, side by side with the bare minimum in the same run.

- ``keydctl status`` on a 5-volume keyd.toml, as a whole process on this host (what an admin
  types), next to a bare ``python -c pass`` start; bar: median <= 100 ms.
- ``make demo`` (``keyd-lab demo``): boot the lab NAS, build RAID5 + LUKS2 + XFS, enroll a
  stick, install keyd, plug, status, pull, audit; bar: under 4 minutes on an idle 2-core host.

Prints figures and bars; no asserts (a loaded host is slower; say so next to the figure).

    .venv/bin/python benchmarks/bench_waits.py [-n 15] [--no-demo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_unlock import OTHERS, VOLUME, timed
from lab_unlock import ROOT, ms

PYTHON = str(ROOT / ".venv" / "bin" / "python")
STATUS_BAR, DEMO_BAR = 0.100, 240.0


def status(rounds: int) -> None:
    """Median wall time of ``keydctl status`` (5 volumes, disks absent) and of a bare start."""
    with tempfile.TemporaryDirectory(prefix="keyd-bench-waits-") as work:
        config = Path(work) / "keyd.toml"
        config.write_text(VOLUME.format(uuid="0" * 32) + OTHERS)
        argv = [PYTHON, "-m", "keyd.cli.main", "status", "--config", str(config), "--run-dir", work]
        runs = [timed(argv) for _ in range(rounds)]
        bare = [timed([PYTHON, "-c", "pass"]) for _ in range(rounds)]
    median = statistics.median(runs)
    print(f"keydctl status, 5 volumes ({rounds} runs): median {ms(median)}, min {ms(min(runs))}; "
          f"bare python start: median {ms(statistics.median(bare))}; "
          f"bar {ms(STATUS_BAR)}: {'met' if median <= STATUS_BAR else 'NOT met'}")


def demo() -> None:
    """Wall time of the whole ``keyd-lab demo`` story, with its own lab boot."""
    started = time.monotonic()
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "keyd-lab"), "demo"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    load = os.getloadavg()[0]
    verdict = "met" if done.returncode == 0 and seconds < DEMO_BAR else "NOT met"
    print(f"make demo: {seconds:.1f} s, exit {done.returncode} (load before the end {load:.1f}); "
          f"bar {DEMO_BAR:.0f} s: {verdict}")
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")


def main() -> int:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=15, help="status runs")
    parser.add_argument("--no-demo", action="store_true", help="only the status figure")
    args = parser.parse_args()
    status(args.rounds)
    if not args.no_demo:
        demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
