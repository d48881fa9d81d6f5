"""Benchmark: keyd's own overhead from a stick's uevent to "unlocked", on the real GLib loop.

The core, the GLib scheduler and its worker threads are the production ones;
the engine and the stick check are fakes that only sleep for fixed times
(standing in for mount + gpg and cryptsetup + mount). The ratio wall time ÷
summed sleep shows what the loop, the state machine, the workers and the
audit add (bar for the whole daemon in the lab: <= 1.05). Prints; no asserts.

    .venv/bin/python benchmarks/bench_daemon_overhead.py [-n 20] [--work-ms 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from gi.repository import GLib

from keyd.config.model import Volume
from keyd.daemon.glib_loop import GLibScheduler
from keyd.daemon.uevents import StickAdded, StickGone
from keyd.engine.executor import KeySource
from keyd.engine.service import Outcome
from keyd.trust.report import StickReport
from tests.support.daemon_fakes import STICK, FakeEngine, FakeSticks, accepted, harness


class SlowSticks(FakeSticks):
    """A stick check that takes ``seconds`` (mount, read, unmount, gpg)."""

    seconds: float = 0.1

    def check(self, stick: Any) -> StickReport:
        time.sleep(self.seconds)
        return super().check(stick)


class SlowEngine(FakeEngine):
    """An unlock that takes ``seconds`` (cryptsetup, mount)."""

    seconds: float = 0.2

    def unlock(self, volume: Volume, keys: KeySource, *, start_services: bool = False) -> Outcome:
        time.sleep(self.seconds)
        return super().unlock(volume, keys, start_services=start_services)


def one_run(work: float) -> float:
    """Seconds from the uevent to the "unlocked" signal."""
    loop = GLib.MainLoop()
    h = harness(loop=GLibScheduler())
    sticks, engine = SlowSticks(), SlowEngine()
    sticks.seconds, engine.seconds = work / 3, work * 2 / 3
    h.daemon.ports.sticks, h.daemon.ports.engine = sticks, engine
    sticks.reports.append(accepted("tank"))
    h.daemon.start([])

    class Stop:
        def state_changed(self, volume: str, state: str, detail: str) -> None:
            if volume == "tank" and state == "unlocked":
                loop.quit()
    h.daemon.ports.announcer = Stop()
    started = time.monotonic()
    h.daemon.handle_uevent(StickAdded(STICK))
    loop.run()
    elapsed = time.monotonic() - started
    h.daemon.handle_uevent(StickGone(STICK.devnode))
    h.daemon.stop()
    return elapsed


def main() -> None:
    """Run and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--work-ms", type=float, default=300.0)
    args = parser.parse_args()
    work = args.work_ms / 1000
    one_run(work)  # warm up
    runs = [one_run(work) for _ in range(args.n)]
    median = statistics.median(runs)
    print(f"uevent -> unlocked (median of {args.n}): {median * 1000:.1f} ms for "
          f"{work * 1000:.0f} ms of simulated commands; overhead "
          f"{(median - work) * 1000:.1f} ms; ratio {median / work:.3f} (bar 1.05)")


if __name__ == "__main__":
    main()
