"""What the lab unlock benchmarks share: the lab's life, the guest's unlock rounds, the report.

bench_unlock.py (RAID1 -> LUKS2 -> ext4) and bench_unlock_zfs.py (two LUKS2 -> a zfs
mirror) differ only in the stack they build and in what else they measure. Both run
a script in the guest that calls :func:`unlock_rounds`: keyd's Engine on
``SubprocessRunner(Timing())``, unlocked and locked N times, each unlock's wall time
next to the summed wall time of the programs it ran.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The scripts run as `python benchmarks/X.py` (sys.path[0] is benchmarks/); with the checkout's
# root on the path they import tests.configs, which is not installed.
sys.path.insert(0, str(ROOT))

from keyd.adapters.real import real_engine  # noqa: E402
from keyd.config.model import Volume  # noqa: E402
from keyd.engine.executor import KeySource  # noqa: E402
from keyd.engine.service import Engine  # noqa: E402
from keyd.runner import SubprocessRunner, Timing  # noqa: E402
from keyd_lab.build import new_run_dir, prepare  # noqa: E402
from keyd_lab.vm import Lab, LabOptions  # noqa: E402

GUEST_PYTHON = str(ROOT / ".venv" / "bin" / "python")
# On the guest scripts' PYTHONPATH, so they import this module (the checkout is the guest's too).
BENCH_DIR = str(ROOT / "benchmarks")


def engine(work: str, timing: Timing) -> Engine:
    """keyd's Engine with every real adapter (zpool included), runner timed by ``timing``."""
    return real_engine(SubprocessRunner(timing), run_dir=f"{work}/run")


def unlock_rounds(work: str, volume: Volume, keys: KeySource,
                  rounds: int) -> list[dict[str, Any]]:
    """In the guest: unlock and lock ``volume`` ``rounds`` times; each unlock's figures."""
    unlocks = []
    for _ in range(rounds):
        timing = Timing()
        started = time.monotonic()
        outcome = engine(work, timing).unlock(volume, keys)
        wall = time.monotonic() - started
        assert outcome.changed and not outcome.degraded
        unlocks.append({"wall": wall, "programs": timing.seconds, "calls": timing.calls})
        engine(work, Timing()).lock(volume)
    return unlocks


@contextmanager
def booted_lab(label: str) -> Iterator[tuple[Lab, Path]]:
    """A lab VM and a scratch directory for its disk images; both gone afterwards."""
    artifacts = prepare(SubprocessRunner())
    run_dir = new_run_dir(label)
    with tempfile.TemporaryDirectory(prefix=f"keyd-{label}-") as images:
        lab = Lab.boot(artifacts.kernel, artifacts.initramfs, run_dir, LabOptions())
        try:
            print(f"lab booted in {lab.boot_seconds:.1f} s (TCG; absolute times are emulated)")
            yield lab, Path(images)
        finally:
            lab.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def run_in_guest(lab: Lab, work: str, files: dict[str, str | bytes], *args: str,
                 rounds: int) -> dict[str, Any]:
    """Send ``files`` (with ``bench.py``) to ``work`` over the channel, run it, parse its JSON."""
    lab.check(["mkdir", "-p", f"{work}/run"])
    for name, data in files.items():
        lab.check(["sh", "-c", f"cat > {work}/{name}"], input=data)
    out = lab.check(["env", f"PYTHONPATH={BENCH_DIR}", GUEST_PYTHON, f"{work}/bench.py", work,
                     str(rounds), *args],
                    timeout=600 + 60 * rounds).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def ms(seconds: float) -> str:
    """Milliseconds, for printing."""
    return f"{seconds * 1000:.1f} ms"


def show_unlocks(title: str, unlocks: list[dict[str, Any]],
                 out: Callable[[str], None] = print) -> None:
    """Each round's keyd / programs figures, the median ratio, the last round's programs."""
    out(f"unlock ({title}), keyd's Engine in the guest:")
    ratios = []
    for i, run in enumerate(unlocks, 1):
        ratios.append(run["wall"] / run["programs"])
        out(f"  run {i}: keyd {ms(run['wall'])}, programs {ms(run['programs'])}, "
            f"overhead {ms(run['wall'] - run['programs'])}, ratio {ratios[-1]:.3f}")
    out(f"  median ratio keyd / programs: {statistics.median(ratios):.3f} (goal <= 1.05)")
    out("  programs of the last run:")
    for argv, seconds in unlocks[-1]["calls"]:
        out(f"    {ms(seconds):>10}  {argv}")
