"""The demo NAS, pure: its shape, keyd's config for it, the audit trail it must leave, the report.

``keyd-lab demo`` (keyd_lab/demo.py) builds this NAS in the lab and drives it;
everything here is text in, text out, so it is tested without a VM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What one plug-and-pull must leave in the audit, in this order (other records may come between).
UNLOCK_EVENTS = ("stick-inserted", "bundle-accepted", "unlock-started", "unlock-finished")
LOCK_EVENTS = ("stick-removed", "grace-started", "lock-started", "lock-finished")
EXPECTED_TRAIL = UNLOCK_EVENTS + LOCK_EVENTS


@dataclass(frozen=True)
class NasSpec:
    """The demo NAS: three disks in RAID5 under LUKS2 under XFS, unlocked by one key stick."""

    volume: str = "nas"
    disks: tuple[str, ...] = ("NASDISK1", "NASDISK2", "NASDISK3")
    # RAID5 of 3 x 176 MiB: ~350 MiB array, >= 300 MiB left for XFS after the LUKS2 header.
    disk_mb: int = 176
    stick: str = "KEYSTICK01"
    mountpoint: str = "/srv/nas"
    grace: float = 3.0
    file: str = "shares/welcome.txt"
    file_text: str = "Welcome to the NAS: this file lives on RAID5 + LUKS2 + XFS.\n"

    @property
    def mapper(self) -> str:
        """The dm-crypt mapping keyd opens (keyd-VOLUME-LAYER)."""
        return f"keyd-{self.volume}-crypt"

    @property
    def array(self) -> str:
        """The md array keyd assembles, by its /dev/md name."""
        return f"/dev/md/keyd-{self.volume}-md0"


@dataclass(frozen=True)
class Step:
    """One step of the story: what was done, what happened, how long it took, real output."""

    title: str
    outcome: str
    seconds: float
    output: str = ""


def policy_lines(spec: NasSpec) -> str:
    """The daemon policy keys of the demo volume, as lines of its ``[volume.NAME]`` table."""
    return f"lock_on_removal = true\ngrace = {spec.grace:g}\nlock_retry_delay = 1\n"


def keyd_toml(spec: NasSpec, signer: str, gnupghome: str, md_uuid: str) -> str:
    """keyd.toml for the NAS: the pinned signer, then RAID5 -> LUKS2 -> XFS at the mountpoint."""
    volume_keys = policy_lines(spec)
    name = spec.volume
    return f"""[trust]
signers = ["{signer}"]
gnupghome = "{gnupghome}"

[volume.{name}]
description = "demo NAS: RAID5 on 3 disks -> LUKS2 -> XFS"
{volume_keys}
[volume.{name}.layer.md0]
kind = "raid"
uuid = "{md_uuid}"

[volume.{name}.layer.crypt]
kind = "crypt"
type = "luks"
below = ["md0"]

[volume.{name}.layer.data]
kind = "mount"
below = ["crypt"]
fstype = "xfs"
mountpoint = "{spec.mountpoint}"
"""


def trail_from_table(table: str) -> list[str]:
    """The EVENT column of ``keydctl audit``'s table (its TIME column is date and time)."""
    rows = [line.split() for line in table.splitlines()[1:]]
    return [row[2] for row in rows if len(row) > 2]


def missing_from_trail(trail: Sequence[str], expected: Sequence[str] = EXPECTED_TRAIL) -> list[str]:
    """The expected events not found, in order, in ``trail`` ([] when the story was told in full)."""
    missing, position = [], 0
    for event in expected:
        if event in trail[position:]:
            position = trail.index(event, position) + 1
        else:
            missing.append(event)  # later events are still looked for after the last match
    return missing


def timeline(records: Sequence[Mapping[str, str]], start_us: int, wanted: Sequence[str]) -> str:
    """When keyd audited each ``wanted`` event, in seconds after ``start_us`` (journal records).

    Only an event's first record counts; events not audited are left out.
    """
    seen: dict[str, float] = {}
    for record in records:
        event = record.get("KEYD_EVENT", "")
        if event in wanted and event not in seen:
            seen[event] = (int(record["__REALTIME_TIMESTAMP"]) - start_us) / 1e6
    return ", ".join(f"{event} +{seen[event]:.1f} s" for event in wanted if event in seen)


def render_title(number: int, title: str) -> str:
    """A step's heading, printed when it starts: ``N. title``."""
    return f"{number}. {title}"


def render_body(step: Step) -> str:
    """A finished step as the admin reads it: outcome and time, then the real output indented."""
    lines = [f"   -> {step.outcome}  [{step.seconds:.1f} s]"]
    lines += [f"   | {line}".rstrip() for line in step.output.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def render_summary(steps: Sequence[Step]) -> str:
    """The closing table: each step's time, and the total."""
    width = max((len(s.title) for s in steps), default=0)
    lines = [f"  {i:>2}. {s.title:<{width}}  {s.seconds:6.1f} s" for i, s in enumerate(steps, 1)]
    total = sum(s.seconds for s in steps)
    return "\n".join(["time per step:", *lines, f"      {'total':<{width}}  {total:6.1f} s"]) + "\n"
