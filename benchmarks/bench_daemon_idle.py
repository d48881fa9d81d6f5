"""Benchmark: the real ``keyd`` process on this host — start -> READY=1, idle RSS, idle wake-ups.

keyd runs with the real engine, udev monitor and trust pipeline, a config of
one volume whose disk is absent (so: reconciled as locked, 0 sticks to
coldplug), on a private dbus-daemon, with NOTIFY_SOCKET pointing here.
Wake-ups are the context switches of all keyd threads while idle, measured
twice: without a watchdog (bar: 0) and with WATCHDOG_USEC (only the pings).
Start-up is timed cold (keyd's modules compiled at every start, none written:
as with PYTHONDONTWRITEBYTECODE or on a read-only tree) and warm (bytecode in a
private cache, as on every start after the first), next to the interpreter's
own floor (``python -c pass``); the CPU time keyd used until READY=1 is printed
too (stabler than wall time on a busy host). Bars (issue 6): READY <= 300 ms, RSS <= 35 MB, 0 wake-ups in 30 s
idle besides the watchdog. With ``--baseline DIR`` (another checkout, e.g.
``git archive HEAD keyd | tar -x -C DIR``; may be repeated) that keyd's start-up
and RSS are measured in the same run, side by side. A PYTHONPATH given to the bench comes
after the checkout (e.g. another PyGObject's site-packages). Prints measurements
and ratios to the bars; no asserts.

    .venv/bin/python benchmarks/bench_daemon_idle.py [--idle-seconds 30] [-n 5] [--baseline DIR]...
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[volume.tank]
[volume.tank.layer.crypt0]
kind = "crypt"
type = "luks"
device = "/dev/disk/by-uuid/00000000-0000-4000-8000-000000000000"
"""


def private_bus() -> tuple[subprocess.Popen[str], str]:
    """A session-type dbus-daemon; returns it and its address."""
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_ms(pid: int) -> float:
    """CPU time used so far by every thread of ``pid`` (schedstat, ns resolution), in ms."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir()) / 1e6


def environment(work: Path, tree: Path = ROOT, *, cold: bool = False) -> dict[str, str]:
    """keyd's environment, checkout ``tree`` first on the path, bytecode in a cache of its own.
    Warm: everything compiled (as every start after the first). Cold: keyd's own modules are
    not, and none is written (as with PYTHONDONTWRITEBYTECODE or a read-only tree, and on a
    first start after installing without precompiling); see :func:`cold_cache`."""
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path,
           "PYTHONPYCACHEPREFIX": str(work / ("pycache-cold" if cold else "pycache"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if cold:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def cold_cache(work: Path, trees: list[Path]) -> None:
    """The warm cache without the bytecode of the checkouts' keyd packages."""
    cold = work / "pycache-cold"
    shutil.copytree(work / "pycache", cold)
    for tree in trees:
        shutil.rmtree(cold / tree.resolve().relative_to("/") / "keyd", ignore_errors=True)


@dataclass
class Started:
    """A running keyd, its notify socket, and what its start-up took."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    ready: float  # seconds from exec to READY=1
    cpu: float  # ms of CPU used until READY=1


def start(work: Path, address: str, watchdog_usec: int | None, tree: Path = ROOT,
          *, cold: bool = False) -> Started:
    """Start the keyd of checkout ``tree``; return it once it sent READY=1."""
    sock_path = work / f"notify-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {**environment(work, tree, cold=cold), "NOTIFY_SOCKET": str(sock_path)}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "keyd.daemon.main", "--config",
                             str(work / "keyd.toml"), "--run-dir", str(work / "run"),
                             "--state-dir", str(work / "state"), "--bus", address],
                            env=env, cwd=tree, stderr=subprocess.DEVNULL)  # cwd: -m's sys.path[0]
    while "READY=1" not in sock.recv(4096).decode().splitlines():
        pass
    return Started(proc, sock, time.monotonic() - started, cpu_ms(proc.pid))


def stop(keyd: Started) -> None:
    """SIGTERM and wait."""
    keyd.proc.terminate()
    keyd.proc.wait(30)
    keyd.sock.close()


def idle_wakeups(proc: subprocess.Popen[bytes], seconds: float) -> int:
    """Context switches of keyd over ``seconds`` of idling (after a settling second)."""
    time.sleep(1.0)
    before = switches(proc.pid)
    time.sleep(seconds)
    return switches(proc.pid) - before


def interpreter_floor(work: Path, n: int) -> float:
    """Median seconds of ``python -c pass`` with keyd's environment (site, .pth files)."""
    times = []
    for _ in range(n):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], env=environment(work), check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


@dataclass
class Startups:
    """One checkout's start-up figures."""

    cold: list[Started] = field(default_factory=list)  # keyd not compiled
    warm: list[Started] = field(default_factory=list)
    rss: float = float("nan")  # MiB, idle after a warm start

    def line(self, label: str) -> str:
        """The printed figures; READY's ratio is to the 300 ms bar."""
        ready, cpu = (statistics.median(getattr(s, k) for s in self.warm) for k in ("ready", "cpu"))
        cold, cold_cpu = (statistics.median(getattr(s, k) for s in self.cold)
                          for k in ("ready", "cpu"))
        return (f"{label}: start -> READY=1 warm {ready * 1000:.0f} ms ({cpu:.0f} ms CPU; "
                f"/300 ms bar: {ready / 0.3:.2f}), cold {cold * 1000:.0f} ms ({cold_cpu:.0f} ms CPU);"
                f" idle RSS {self.rss:.1f} MiB = {self.rss * 1.048576:.1f} MB "
                f"(/35 MB bar: {self.rss * 1.048576 / 35:.2f})")


def startups(work: Path, address: str, n: int, trees: list[Path]) -> list[Startups]:
    """``n`` cold and ``n`` warm starts per checkout, the checkouts taking turns (so a busy
    moment of the host hits them alike); RSS after one more warm start."""
    figures = [Startups() for _ in trees]
    for tree in trees:
        stop(start(work, address, None, tree))  # fills the bytecode cache
    cold_cache(work, trees)
    for _ in range(n):
        for tree, figure in zip(trees, figures, strict=True):
            for cold, runs in ((True, figure.cold), (False, figure.warm)):
                runs.append(start(work, address, None, tree, cold=cold))
                stop(runs[-1])
    for tree, figure in zip(trees, figures, strict=True):
        keyd = start(work, address, None, tree)
        time.sleep(1.0)  # settle: the loop is idle
        figure.rss = rss_mb(keyd.proc.pid)
        stop(keyd)
    return figures


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("-n", type=int, default=5, help="cold and warm start-ups to time")
    parser.add_argument("--baseline", type=Path, metavar="DIR", action="append", default=[],
                        help="another checkout to measure side by side")
    args = parser.parse_args()
    bus, address = private_bus()
    period = 5.0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "keyd.toml").write_text(CONFIG)
            trees = [ROOT, *args.baseline]
            figures = startups(work, address, args.n, trees)
            floor = interpreter_floor(work, args.n)
            keyd = start(work, address, None)
            quiet = idle_wakeups(keyd.proc, args.idle_seconds)
            stop(keyd)
            keyd = start(work, address, int(period * 2e6))
            with_dog = idle_wakeups(keyd.proc, args.idle_seconds)
            stop(keyd)
    finally:
        bus.terminate()
        bus.wait(10)
    pings = args.idle_seconds / period
    print(f"(medians of {args.n} starts each; 0 sticks; the bars are issue 6's)")
    for tree, figure in zip(trees, figures, strict=True):
        print(figure.line("this checkout" if tree == ROOT else f"baseline {tree}"))
    this = figures[0]
    for tree, base in zip(trees[1:], figures[1:], strict=True):
        ratios = [statistics.median(getattr(s, key) for s in this.warm) /
                  statistics.median(getattr(s, key) for s in base.warm) for key in ("ready", "cpu")]
        print(f"this checkout / {tree}: READY {ratios[0]:.2f} (CPU {ratios[1]:.2f}), "
              f"RSS {this.rss / base.rss:.2f}")
    print(f"interpreter floor (python -c pass): {floor * 1000:.0f} ms")
    print(f"wake-ups in {args.idle_seconds:g} s idle without watchdog: {quiet} (bar: 0)")
    print(f"wake-ups in {args.idle_seconds:g} s idle with WATCHDOG_USEC={period * 2:g}s: "
          f"{with_dog} for {pings:.0f} expected pings (ratio {with_dog / pings:.2f})")


if __name__ == "__main__":
    main()
