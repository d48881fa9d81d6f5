"""keyd-lab demo's host side without a VM: the transcript the admin reads, and the final verdict."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest

from keyd_lab.channel import GuestCommandFailed, GuestResult
from keyd_lab.demo import StoryResult, Teller, Transcript, ended_well
from keyd_lab.media import StickSpec
from keyd_lab.nas import EXPECTED_TRAIL


class FakeLab:
    """Answers every command with the next scripted result and remembers what it was given."""

    def __init__(self, *results: GuestResult) -> None:
        self.results = list(results)
        self.calls: list[tuple[list[str], bytes | str | None]] = []

    def run(self, argv: Sequence[str], input: bytes | str | None = None,
            timeout: float = 60.0) -> GuestResult:
        self.calls.append((list(argv), input))
        return self.results.pop(0)

    def check(self, argv: Sequence[str], input: bytes | str | None = None,
              timeout: float = 60.0) -> GuestResult:
        return self.run(argv, input, timeout)

    def sh(self, script: str, timeout: float = 60.0) -> str:
        return self.run(["sh", "-c", script]).stdout

    def disk(self, serial: str, size_mb: int = 64) -> str:
        return f"/dev/disk/by-id/virtio-{serial}"

    def plug(self, stick: StickSpec) -> str:
        return "/dev/sda"

    def unplug(self, serial: str) -> None:
        pass


def test_the_transcript_shows_commands_and_output_but_never_the_key() -> None:
    lab = FakeLab(GuestResult(0, "", ""), GuestResult(0, "mdadm: stopped /dev/md/x\n", ""))
    shown = Transcript(lab)
    shown.run(["cryptsetup", "open", "--key-file=-", "/dev/md/x", "x"], input=b"s3cret-key")
    shown.run(["mdadm", "--stop", "/dev/md/x"])
    lines = shown.text().splitlines()
    assert lines[0].startswith("$ cryptsetup open --key-file=- /dev/md/x x   # the key on stdin")
    assert lines[1].startswith("$ mdadm --stop /dev/md/x   [") and lines[1].endswith(" s]")
    assert lines[2] == "mdadm: stopped /dev/md/x"
    assert "s3cret" not in shown.text()
    assert lab.calls[0][1] == b"s3cret-key"


def test_a_failing_required_command_stops_the_story_with_its_error() -> None:
    shown = Transcript(FakeLab(GuestResult(1, "", "mdadm: no such array\n")))
    with pytest.raises(GuestCommandFailed, match="no such array"):
        shown.run(["mdadm", "--stop", "/dev/md/x"])
    assert shown.text() == ""


def test_the_teller_numbers_steps_from_where_it_was_told_to() -> None:
    out = io.StringIO()
    teller = Teller(out, first=3)
    teller.step("plug the stick", lambda: ("mounted", "$ findmnt /srv/nas"))
    teller.step("pull the stick", lambda: ("locked", ""))
    text = out.getvalue()
    assert text.startswith("3. plug the stick\n   -> mounted  [")
    assert "\n4. pull the stick\n   -> locked  [" in text
    assert [s.title for s in teller.steps] == ["plug the stick", "pull the stick"]


def _result(**changes: object) -> StoryResult:
    result = StoryResult(mounted="Welcome\n", state_unlocked="unlocked", state_locked="locked",
                         locked=True, trail=list(EXPECTED_TRAIL))
    for name, value in changes.items():
        setattr(result, name, value)
    return result


@pytest.mark.parametrize(("changes", "well"), [
    ({}, True),
    ({"mounted": ""}, False),
    ({"state_unlocked": "failed"}, False),
    ({"locked": False}, False),
    ({"trail": list(EXPECTED_TRAIL[:-1])}, False),
], ids=["told-in-full", "never-mounted", "never-unlocked", "never-locked", "trail-short"])
def test_the_demo_ends_well_only_when_every_part_happened(changes: dict[str, object],
                                                          well: bool) -> None:
    assert ended_well(_result(**changes)) is well
