"""Benchmark: ``keydctl wait`` (what keyd-wait@.service runs at every boot) against a real keyd.

keyd runs as in bench_daemon_idle (private dbus-daemon, warm bytecode cache) with
one volume whose key timeout is 0 and whose dependents may start degraded, so
``keydctl wait tank`` finds the volume done and returns at once: the time measured
is the client's own cost (interpreter, imports, one D-Bus round trip). Printed next
to the interpreter's floor (``python -c pass``); with ``--baseline DIR`` (repeatable; another
checkout, e.g. ``git archive HEAD | tar -x -C DIR``) its keydctl is timed in the
same run and the ratio printed. Prints; no asserts.

    .venv/bin/python benchmarks/bench_daemon_wait.py [-n 9] [--baseline DIR]...
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_daemon_idle import ROOT, environment, interpreter_floor, private_bus, start, stop

CONFIG = """
[volume.tank]
key_timeout = 0
dependents = "degraded"
[volume.tank.layer.crypt0]
kind = "crypt"
type = "luks"
device = "/dev/disk/by-uuid/00000000-0000-4000-8000-000000000000"
"""


def children_cpu_ms() -> float:
    """CPU time of all waited-for children so far, in ms."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def run_wait(tree: Path, work: Path, address: str) -> tuple[float, float]:
    """Wall ms and CPU ms of one ``keydctl wait tank`` run from checkout ``tree``."""
    argv = [sys.executable, "-m", "keyd.cli.main", "wait", "tank", "--bus", address]
    cpu, started = children_cpu_ms(), time.monotonic()
    done = subprocess.run(argv, env=environment(work, tree), cwd=tree, capture_output=True,
                          text=True, check=False)  # cwd: `-m` puts it first on sys.path
    wall = (time.monotonic() - started) * 1000
    if done.returncode != 0:
        raise SystemExit(f"keydctl wait failed ({done.returncode}): {done.stderr.strip()}")
    return wall, children_cpu_ms() - cpu


def time_waits(trees: list[Path], work: Path, address: str, n: int) -> list[tuple[float, float]]:
    """Median wall and CPU ms per checkout; the checkouts take turns, after a warm-up each."""
    for tree in trees:
        run_wait(tree, work, address)  # fills the bytecode cache
    runs: list[list[tuple[float, float]]] = [[] for _ in trees]
    for _ in range(n):
        for tree, mine in zip(trees, runs, strict=True):
            mine.append(run_wait(tree, work, address))
    return [(statistics.median(w for w, _ in mine), statistics.median(c for _, c in mine))
            for mine in runs]


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=9, help="calls to time")
    parser.add_argument("--baseline", type=Path, metavar="DIR", action="append", default=[],
                        help="another checkout whose keydctl wait to time in the same run")
    args = parser.parse_args()
    bus, address = private_bus()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "keyd.toml").write_text(CONFIG)
            keyd = start(work, address, None)
            try:
                trees = [ROOT, *args.baseline]
                results = time_waits(trees, work, address, args.n)
                floor = interpreter_floor(work, args.n) * 1000
            finally:
                stop(keyd)
    finally:
        bus.terminate()
        bus.wait(10)
    (wall, cpu), *rest = results
    print(f"keydctl wait (volume already done; median of {args.n}): {wall:.0f} ms "
          f"({cpu:.0f} ms CPU)")
    print(f"interpreter floor (python -c pass): {floor:.0f} ms; keydctl wait / floor: "
          f"{wall / floor:.2f}")
    for tree, (base_wall, base_cpu) in zip(args.baseline, rest, strict=True):
        print(f"baseline {tree}: {base_wall:.0f} ms ({base_cpu:.0f} ms CPU); "
              f"this checkout / baseline: {wall / base_wall:.2f} wall, {cpu / base_cpu:.2f} CPU")


if __name__ == "__main__":
    main()
