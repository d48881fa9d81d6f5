"""Where the VM tier's time goes: each guest boot and guest command timed and sorted by kind of cost.

The lab's one way into a guest (:meth:`keyd_lab.vm.Lab.run`) and its boots report here; the VM
tier's conftest names the test file being run and prints the totals at the end of ``make vm``.
The kinds are read from the command itself, so a test needs no markup to be profiled. What is
left of a file's time after these (host-side image building, gpg on the host, pytest itself) is
shown as ``host``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# First match wins: a poll loop that calls busctl is a wait, not a keyd start-up.
_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((kind, re.compile(pattern)) for kind, pattern in (
    ("waits", r"for i in \$\(seq|\bsleep \d|udevadm (settle|wait)|is-system-running --wait"),
    ("apt", r"\bapt-get\b|\bdpkg\b"),
    ("mkinitramfs", r"mkinitramfs|update-initramfs|unmkinitramfs"),
    ("zfs", r"\bzpool\b|\bzfs\b"),
    ("md", r"\bmdadm\b"),
    ("cryptsetup", r"\bcryptsetup\b|\btcplay\b|seed_000_tcplay"),
    ("keyd python", r"python|keydctl|/usr/sbin/keyd\b|keyd-lab"),
    ("gpg", r"\bgpg\b"),
    ("systemctl", r"\bsystemctl\b|\bjournalctl\b|\bbusctl\b"),
))
KINDS = ("boot", *(kind for kind, _ in _KINDS), "guest other", "host")


def kind_of(argv: Sequence[str]) -> str:
    """The kind of cost of one guest command, from its words."""
    text = " ".join(argv)
    for kind, pattern in _KINDS:
        if pattern.search(text):
            return kind
    return "guest other"


@dataclass
class Ledger:
    """Seconds spent per (scope, kind); the scope is the test file being run."""

    scope: str = "(outside tests)"
    seconds: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, kind: str, seconds: float) -> None:
        """Count ``seconds`` of ``kind`` against the current scope."""
        costs = self.seconds[self.scope]
        costs[kind] = costs.get(kind, 0.0) + seconds

    @contextmanager
    def scoped(self, scope: str) -> Iterator[None]:
        """Count what happens inside against ``scope``."""
        previous, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = previous

    def merge(self, other: Mapping[str, Mapping[str, float]]) -> None:
        """Add another ledger's seconds (a pytest-xdist worker's) to these."""
        for scope, costs in other.items():
            mine = self.seconds[scope]
            for kind, seconds in costs.items():
                mine[kind] = mine.get(kind, 0.0) + seconds


LEDGER = Ledger()


@dataclass(frozen=True)
class FileCost:
    """One test file's wall time and what it went on."""

    name: str
    wall: float
    kinds: Mapping[str, float]


def file_costs(walls: Mapping[str, float], ledger: Ledger) -> list[FileCost]:
    """Each file's wall time with its kinds; ``host`` is the wall time no kind accounts for."""
    costs = []
    for name, wall in walls.items():
        kinds = dict(ledger.seconds.get(name, {}))
        kinds["host"] = max(wall - sum(kinds.values()), 0.0)
        costs.append(FileCost(name, wall, kinds))
    return sorted(costs, key=lambda cost: cost.wall, reverse=True)


def summary_lines(costs: Sequence[FileCost], tier_wall: float, workers: int, most: int = 8) -> list[str]:
    """The end-of-tier summary: tier wall time, then the slowest files with their top kinds."""
    total = sum(cost.wall for cost in costs)
    lines = [f"keyd-lab: VM tier {_clock(tier_wall)} wall on {workers} worker(s), "
             f"{_clock(total)} of test time in {len(costs)} files"]
    for cost in costs[:most]:
        top = sorted(((s, k) for k, s in cost.kinds.items() if s >= 1.0), reverse=True)[:4]
        spent = ", ".join(f"{kind} {seconds:.0f} s" for seconds, kind in top)
        lines.append(f"  {_clock(cost.wall):>7}  {cost.name}  ({spent})")
    by_kind: dict[str, float] = defaultdict(float)
    for cost in costs:
        for kind, seconds in cost.kinds.items():
            by_kind[kind] += seconds
    lines.append("  by kind: " + ", ".join(f"{kind} {_clock(by_kind[kind])}"
                                           for kind in KINDS if by_kind.get(kind, 0.0) >= 1.0))
    return lines


def profile_table(costs: Sequence[FileCost]) -> str:
    """Every file's wall time and its seconds by kind, as a Markdown table (docs/lab.md)."""
    kinds = [kind for kind in KINDS if any(cost.kinds.get(kind, 0.0) >= 0.5 for cost in costs)]
    lines = ["| file | wall | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    rows = [*costs, FileCost("all files", sum(c.wall for c in costs),
                             {k: sum(c.kinds.get(k, 0.0) for c in costs) for k in kinds})]
    for cost in rows:
        cells = [f"{cost.kinds.get(kind, 0.0):.0f}" for kind in kinds]
        lines.append(f"| {cost.name.removeprefix('tests/vm/')} | {_clock(cost.wall)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def load_walls(path: Path) -> dict[str, float]:
    """Each file's wall time in the runs kept at ``path`` ({} when there is none yet)."""
    try:
        walls = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in walls.items()} if isinstance(walls, dict) else {}


def save_walls(path: Path, walls: Mapping[str, float]) -> None:
    """Keep this run's file times at ``path``, over those of files this run did not run."""
    kept = load_walls(path) | dict(walls)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    partial.rename(path)


def longest_first(files: Sequence[str], walls: Mapping[str, float]) -> list[str]:
    """``files`` in the order that keeps two workers busy to the end: longest first by the last
    run's times, files never timed before them all (a new file is most often a heavy one), the
    rest in their given order."""
    unknown = [f for f in files if f not in walls]
    known = sorted((f for f in files if f in walls), key=lambda f: -walls[f])
    return unknown + known
