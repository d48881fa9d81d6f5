"""Audit records, sinks, the catalog, and reading the trail back (with a fake journal source)."""

from __future__ import annotations

import argparse
import io
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyd.audit.ids import MESSAGE_IDS, AuditEvent
from keyd.audit.reader import parse_since, read_entries, render_table, to_json
from keyd.audit.record import AuditRecord, UnsafeAuditValue, duration_ms
from keyd.audit.sink import JournalSink, MemorySink
from keyd.cli import audit_commands
from keyd.errors import KeydError
from keyd.trust.secret import SecretBytes

CATALOG = Path(__file__).resolve().parents[3] / "systemd" / "keyd.catalog"


def test_message_ids_are_distinct_128_bit_hex() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids) == len(AuditEvent)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_the_catalog_explains_every_message_id_and_nothing_else() -> None:
    listed = re.findall(r"^-- ([0-9a-f]{32})$", CATALOG.read_text(), re.MULTILINE)
    assert sorted(listed) == sorted(MESSAGE_IDS.values())


def test_journal_fields_carry_the_message_id_and_only_the_fields_given() -> None:
    record = AuditRecord(AuditEvent.UNLOCK_FINISHED, "volume tank unlocked", volume="tank",
                         serial="4C53", signer="AB" * 20, bundle_id="b-1", result="unlocked",
                         duration_ms=duration_ms(1.2346))
    assert record.journal_fields() == {
        "MESSAGE": "volume tank unlocked", "MESSAGE_ID": MESSAGE_IDS[AuditEvent.UNLOCK_FINISHED],
        "PRIORITY": "6", "SYSLOG_IDENTIFIER": "keyd", "KEYD_EVENT": "unlock-finished",
        "KEYD_VOLUME": "tank", "KEYD_STICK_SERIAL": "4C53", "KEYD_SIGNER": "AB" * 20,
        "KEYD_BUNDLE_ID": "b-1", "KEYD_RESULT": "unlocked", "KEYD_DURATION_MS": "1235"}


@pytest.mark.parametrize("value", [b"key", bytearray(b"key"), memoryview(b"key"),
                                   SecretBytes(b"key"), 1.5, True, ["k"]])
def test_key_like_values_are_refused_without_echoing_them(value: object) -> None:
    with pytest.raises(UnsafeAuditValue) as caught:
        AuditRecord(AuditEvent.UNLOCK_STARTED, "x", reason=value)  # type: ignore[arg-type]
    assert "key" not in str(caught.value).replace("key bu", "").replace("keys", "")


def test_the_message_itself_must_be_text() -> None:
    with pytest.raises(UnsafeAuditValue):
        AuditRecord(AuditEvent.UNLOCK_STARTED, b"secret")  # type: ignore[arg-type]


def test_long_values_are_capped() -> None:
    record = AuditRecord(AuditEvent.LOCK_BUSY, "busy", reason="x" * 5000)
    assert record.reason is not None and len(record.reason) < 600


class RecordingSend:
    def __init__(self, error: OSError | None = None) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.error = error

    def __call__(self, message: str, **fields: str) -> None:
        self.calls.append((message, fields))
        if self.error:
            raise self.error


def test_journal_sink_sends_one_call_per_record() -> None:
    send = RecordingSend()
    JournalSink(send).emit(AuditRecord(AuditEvent.LOCK_FINISHED, "locked", volume="tank"))
    [(message, fields)] = send.calls
    assert message == "locked" and fields["KEYD_VOLUME"] == "tank"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS[AuditEvent.LOCK_FINISHED]


def test_journal_sink_survives_a_missing_journald(caplog: pytest.LogCaptureFixture) -> None:
    JournalSink(RecordingSend(FileNotFoundError(2, "No such file"))).emit(
        AuditRecord(AuditEvent.LOCK_FINISHED, "locked"))
    assert "not sent to journald" in caplog.text


def test_memory_sink_keeps_order() -> None:
    sink = MemorySink()
    sink.emit(AuditRecord(AuditEvent.STICK_INSERTED, "in"))
    sink.emit(AuditRecord(AuditEvent.BUNDLE_ACCEPTED, "ok"))
    assert sink.events() == ["stick-inserted", "bundle-accepted"]


T0 = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)


def raw(event: AuditEvent, minutes: int, **fields: Any) -> dict[str, Any]:
    return {"MESSAGE_ID": uuid.UUID(MESSAGE_IDS[event]), "MESSAGE": f"{event.value} msg",
            "__REALTIME_TIMESTAMP": T0 + timedelta(minutes=minutes), **fields}


class FakeSource:
    """Yields canned entries, like journald would, plus noise a real match would drop."""

    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        self.entries_ = entries
        self.asked: list[tuple[str | None, datetime | None]] = []

    def entries(self, *, volume: str | None,
                since: datetime | None) -> Iterable[Mapping[str, Any]]:
        self.asked.append((volume, since))
        return self.entries_


TRAIL = [
    raw(AuditEvent.STICK_INSERTED, 0, KEYD_STICK_SERIAL="4C53"),
    raw(AuditEvent.BUNDLE_ACCEPTED, 1, KEYD_VOLUME="tank",
        KEYD_SIGNER="AAAAAAAABBBBBBBB" + "0123456789ABCDEF",
        KEYD_BUNDLE_ID="b-1", KEYD_STICK_SERIAL="4C53"),
    raw(AuditEvent.UNLOCK_FINISHED, 2, KEYD_VOLUME="tank", KEYD_RESULT="unlocked",
        KEYD_DURATION_MS=1234),
    raw(AuditEvent.BUNDLE_REJECTED, 3, KEYD_VOLUME="work", KEYD_REASON="BAD_SIGNATURE"),
    {"MESSAGE_ID": uuid.uuid4(), "MESSAGE": "someone else's", "__REALTIME_TIMESTAMP": T0},
]


def test_read_entries_filters_volume_and_time_even_if_the_source_does_not() -> None:
    entries = read_entries(FakeSource(TRAIL), volume="tank", since=T0 + timedelta(minutes=2))
    assert [(e.event, e.result, e.duration_ms) for e in entries] == \
        [("unlock-finished", "unlocked", "1234")]


def test_the_table_shows_the_trail_in_order_with_short_signers() -> None:
    table = render_table(read_entries(FakeSource(TRAIL)))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["TIME", "EVENT", "VOLUME", "RESULT"]
    assert [line.split()[2] for line in lines[1:]] == \
        ["stick-inserted", "bundle-accepted", "unlock-finished", "bundle-rejected"]
    assert "0123456789ABCDEF" in table and "BBBB" not in table


def test_json_output_keeps_full_values() -> None:
    data = to_json(read_entries(FakeSource(TRAIL)))
    assert data[1]["signer"] == "AAAAAAAABBBBBBBB0123456789ABCDEF"
    assert data[0]["time"] == "2026-11-23T14:00:00+00:00"


def test_bytes_fields_and_microsecond_timestamps_are_decoded() -> None:
    entry = {"MESSAGE_ID": MESSAGE_IDS[AuditEvent.LOCK_FINISHED].encode(),
             "__REALTIME_TIMESTAMP": str(int(T0.timestamp() * 1e6)), "KEYD_VOLUME": b"tank"}
    [parsed] = read_entries(FakeSource([entry]))
    assert (parsed.volume, parsed.time, parsed.event) == ("tank", T0, "lock-finished")


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", T0 - timedelta(minutes=30)), ("2h", T0 - timedelta(hours=2)),
    ("1d", T0 - timedelta(days=1)), ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
    ("2026-11-20T10:00:00+01:00", datetime(2026, 11, 20, 9, tzinfo=UTC)),
])
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, T0) == expected


def test_parse_since_refuses_nonsense_with_a_fix() -> None:
    with pytest.raises(KeydError) as caught:
        parse_since("yesterdayish", T0)
    assert caught.value.fix


def run_cli(*argv: str, source: FakeSource) -> str:
    parser = argparse.ArgumentParser()
    audit_commands.register(parser.add_subparsers())
    args = parser.parse_args(["audit", *argv])
    out = io.StringIO()
    args.audit_source, args.stdout = source, out
    assert args.func(args) == 0
    return out.getvalue()


def test_keydctl_audit_table_and_json() -> None:
    assert "unlock-finished" in run_cli(source=FakeSource(TRAIL))
    data = json.loads(run_cli("--json", "--volume", "work", source=FakeSource(TRAIL)))
    assert [d["reason"] for d in data] == ["BAD_SIGNATURE"]


def test_keydctl_audit_passes_the_filters_to_the_source_and_says_when_empty() -> None:
    source = FakeSource([])
    assert run_cli("--volume", "tank", "--since", "2026-11-23", source=source) == \
        "no keyd audit records for volume tank\n"
    assert source.asked == [("tank", datetime(2026, 11, 23, tzinfo=UTC))]


def test_the_man_page_lists_every_message_id() -> None:
    page = (CATALOG.parents[1] / "docs" / "keyd.8.md").read_text()
    assert all(f"| `{event.value}` | `{mid}` |" in page for event, mid in MESSAGE_IDS.items())
