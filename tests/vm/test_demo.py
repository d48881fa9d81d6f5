"""`make demo` on the session's lab: the NAS story of issue 6 must end as the README tells it.

keyd-lab demo boots a lab of its own and calls the same :func:`tell_story`; this test keeps it
from rotting: RAID5 + LUKS2 + XFS unlocked and mounted by keyd.service when the signed stick is
plugged, locked again after the grace when it is pulled, and the whole audit trail in order.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd_lab.daemon_setup import stop_keyd
from keyd_lab.demo import ended_well, tell_story
from keyd_lab.nas import EXPECTED_TRAIL, NasSpec, missing_from_trail

from .conftest import GuestLab

SPEC = NasSpec(volume="nas", disks=("DEMODISK1", "DEMODISK2", "DEMODISK3"), stick="DEMOSTICK1",
               mountpoint="/mnt/t/nas", grace=2)


@pytest.fixture
def keyd_stopped(guest: GuestLab) -> Iterator[None]:
    """Stop keyd after the test, before the guest is reset."""
    yield
    stop_keyd(guest)


def test_the_demo_unlocks_on_plug_locks_on_pull_and_audits_every_step(
        guest: GuestLab, tmp_path: Path, keyd_stopped: None) -> None:
    out = io.StringIO()

    result = tell_story(guest, tmp_path, out, SPEC)

    told = out.getvalue()
    print(f"\n{told}")
    assert result.mounted == SPEC.file_text, told
    assert result.state_unlocked == "unlocked", told
    assert result.locked and result.state_locked == "locked", told
    assert missing_from_trail(result.trail) == [], (result.trail, told)
    assert ended_well(result)
    # What the admin reads: steps numbered 1..N, each with the real command output.
    numbers = [int(m.group(1)) for m in re.finditer(r"^(\d+)\. ", told, re.M)]
    assert numbers == list(range(1, len(result.steps) + 1)), told
    assert "$ keydctl status" in told and "$ keydctl audit" in told
    for event in EXPECTED_TRAIL:
        assert re.search(rf"^   \| \S+ \S+\s+{event}\s", told, re.M), (event, told)
    assert guest.run(["findmnt", SPEC.mountpoint]).rc != 0
