"""Reading the audit trail back: a journal source behind a Protocol, and pure rendering.

:class:`JournalSource` reads journald with ``systemd.journal.Reader``, matching
keyd's MESSAGE_IDs (ORed) and, if asked, one ``KEYD_VOLUME``. Entries become
:class:`AuditEntry` values; :func:`render_table` and :func:`to_json` are pure.
"""

from __future__ import annotations

import importlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from keyd.audit.ids import EVENT_BY_ID, MESSAGE_IDS
from keyd.errors import KeydError

_RELATIVE = re.compile(r"^(\d+)\s*(s|m|h|d)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class BadTime(KeydError):
    """``--since`` is not a time (a usage error)."""

    exit_code = 2


@dataclass(frozen=True)
class AuditEntry:
    """One audit record as read back from the journal."""

    time: datetime
    event: str
    message: str
    volume: str = ""
    serial: str = ""
    signer: str = ""
    bundle_id: str = ""
    result: str = ""
    reason: str = ""
    duration_ms: str = ""


class AuditSource(Protocol):
    """Yields raw journal entries (field -> value) of keyd's audit records, oldest first."""

    def entries(self, *, volume: str | None, since: datetime | None) -> Iterable[Mapping[str, Any]]:
        """Entries with a keyd MESSAGE_ID, for ``volume`` if given, not older than ``since``."""
        ...


class JournalSource:
    """The :class:`AuditSource` over the system journal (``systemd.journal.Reader``)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def entries(self, *, volume: str | None, since: datetime | None) -> Iterable[Mapping[str, Any]]:
        """See AuditSource."""
        journal = importlib.import_module("systemd.journal")
        reader = journal.Reader(path=self.path) if self.path else journal.Reader()
        for message_id in MESSAGE_IDS.values():
            reader.add_match(MESSAGE_ID=message_id)  # same field: ORed by journald
        if volume is not None:
            reader.add_conjunction()
            reader.add_match(KEYD_VOLUME=volume)
        if since is not None:
            reader.seek_realtime(since)
        yield from reader


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, uuid.UUID):
        return value.hex
    return str(value)


def to_entry(raw: Mapping[str, Any]) -> AuditEntry | None:
    """One raw journal entry as an AuditEntry; None if it is not a keyd audit record."""
    event = EVENT_BY_ID.get(_text(raw.get("MESSAGE_ID")))
    if event is None:
        return None
    when = raw.get("__REALTIME_TIMESTAMP")
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(int(_text(when) or 0) / 1e6, UTC)
    return AuditEntry(when, event.value, _text(raw.get("MESSAGE")),
                      *(_text(raw.get(f"KEYD_{name}")) for name in (
                          "VOLUME", "STICK_SERIAL", "SIGNER", "BUNDLE_ID", "RESULT", "REASON",
                          "DURATION_MS")))


def read_entries(source: AuditSource, *, volume: str | None = None,
                 since: datetime | None = None) -> list[AuditEntry]:
    """The audit entries ``source`` yields, filtered again here (so any source is safe)."""
    found = []
    for raw in source.entries(volume=volume, since=since):
        entry = to_entry(raw)
        if entry is None or (volume is not None and entry.volume != volume):
            continue
        if since is not None and entry.time < since:
            continue
        found.append(entry)
    return found


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: an ISO date/time (UTC if no zone) or an age such as ``30m``, ``2h``, ``1d``."""
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTime(f"--since {text!r} is not a time",
                        fix="use e.g. 2026-11-23, '2026-11-23 14:00', 30m, 2h or 1d") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _short(signer: str) -> str:
    return signer[-16:] if len(signer) > 16 else signer


def render_table(entries: Sequence[AuditEntry]) -> str:
    """A readable table, oldest first; long fingerprints shortened to their last 16 digits."""
    rows = [("TIME", "EVENT", "VOLUME", "RESULT", "REASON", "STICK", "SIGNER", "BUNDLE", "MS",
             "MESSAGE")]
    for e in entries:
        stamp = e.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((stamp, e.event, e.volume, e.result, e.reason, e.serial, _short(e.signer),
                     e.bundle_id, e.duration_ms, e.message))
    cells = [[cell or "-" for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def to_json(entries: Sequence[AuditEntry]) -> list[dict[str, str]]:
    """The entries for programs (``keydctl audit --json``)."""
    return [{**{k: v for k, v in asdict(e).items() if k != "time"},
             "time": e.time.astimezone(UTC).isoformat()} for e in entries]
