"""Benchmark: the real ``keyd`` process on this host — start -> READY=1, idle RSS, idle wake-ups.

keyd runs with the real engine, udev monitor and trust pipeline, a config of
one volume whose disk is absent (so: reconciled as locked, 0 sticks to
coldplug), on a private dbus-daemon, with NOTIFY_SOCKET pointing here.
Wake-ups are the context switches of all keyd threads while idle, measured
twice: without a watchdog (bar: 0) and with WATCHDOG_USEC (only the pings).
Bars (issue 6): READY <= 300 ms, RSS <= 35 MB, 0 wake-ups in 30 s idle besides
the watchdog. Prints measurements and ratios to the bars; no asserts.

    .venv/bin/python benchmarks/bench_daemon_idle.py [--idle-seconds 30] [-n 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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


def start(work: Path, address: str, watchdog_usec: int | None) -> tuple[subprocess.Popen[bytes],
                                                                         socket.socket, float]:
    """Start keyd; return it, the notify socket and seconds until READY=1."""
    sock_path = work / f"notify-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(sock_path)}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "keyd.daemon.main", "--config",
                             str(work / "keyd.toml"), "--policy", str(work / "none.toml"),
                             "--run-dir", str(work / "run"), "--state-dir", str(work / "state"),
                             "--bus", address], env=env, stderr=subprocess.DEVNULL)
    while "READY=1" not in sock.recv(4096).decode().splitlines():
        pass
    return proc, sock, time.monotonic() - started


def stop(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """SIGTERM and wait."""
    proc.terminate()
    proc.wait(30)
    sock.close()


def idle_wakeups(proc: subprocess.Popen[bytes], seconds: float) -> int:
    """Context switches of keyd over ``seconds`` of idling (after a settling second)."""
    time.sleep(1.0)
    before = switches(proc.pid)
    time.sleep(seconds)
    return switches(proc.pid) - before


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("-n", type=int, default=5, help="start-ups to time")
    args = parser.parse_args()
    bus, address = private_bus()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "keyd.toml").write_text(CONFIG)
            readies = []
            for _ in range(args.n):
                proc, sock, ready = start(work, address, None)
                readies.append(ready)
                stop(proc, sock)
            proc, sock, _ = start(work, address, None)
            rss = rss_mb(proc.pid)
            quiet = idle_wakeups(proc, args.idle_seconds)
            stop(proc, sock)
            period = 5.0
            proc, sock, _ = start(work, address, int(period * 2e6))
            with_dog = idle_wakeups(proc, args.idle_seconds)
            stop(proc, sock)
    finally:
        bus.terminate()
        bus.wait(10)
    ready_ms = statistics.median(readies) * 1000
    pings = args.idle_seconds / period
    print(f"start -> READY=1 (median of {args.n}, 0 sticks): {ready_ms:.0f} ms; "
          f"ratio to the 300 ms bar: {ready_ms / 300:.2f}")
    print(f"idle RSS: {rss:.1f} MiB; ratio to the 35 MB bar: {rss / 35:.2f}")
    print(f"wake-ups in {args.idle_seconds:g} s idle without watchdog: {quiet} (bar: 0)")
    print(f"wake-ups in {args.idle_seconds:g} s idle with WATCHDOG_USEC={period * 2:g}s: "
          f"{with_dog} for {pings:.0f} expected pings (ratio {with_dog / pings:.2f})")


if __name__ == "__main__":
    main()
