"""One audit record: an event type, a message and the KEYD_* fields; never key bytes.

The guard is structural: every field value must be ``str`` or ``int`` (bytes,
bytearrays, memoryviews and key holders such as SecretBytes are refused with
:class:`UnsafeAuditValue`), and strings are capped, so a key cannot be logged
by passing the buffer itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyd.audit.ids import MESSAGE_IDS, SYSLOG_IDENTIFIER, AuditEvent
from keyd.errors import KeydError

MAX_VALUE_CHARS = 512

# Field name in the record -> journald field.
FIELD_NAMES = {
    "volume": "KEYD_VOLUME",
    "serial": "KEYD_STICK_SERIAL",
    "signer": "KEYD_SIGNER",
    "bundle_id": "KEYD_BUNDLE_ID",
    "result": "KEYD_RESULT",
    "reason": "KEYD_REASON",
    "duration_ms": "KEYD_DURATION_MS",
}

# syslog priorities (journald PRIORITY=)
PRIORITY_ERR, PRIORITY_WARNING, PRIORITY_NOTICE, PRIORITY_INFO = 3, 4, 5, 6


class UnsafeAuditValue(KeydError):
    """An audit field was given something other than text or a number (e.g. key bytes)."""


def _checked(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        # Refuse by type, never echo the value: it may be key material.
        raise UnsafeAuditValue(f"audit field {name} got a {type(value).__name__}; "
                               "only text and integers are logged",
                               fix="pass names, ids and codes, never key buffers")
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + "..."
    return value


@dataclass(frozen=True)
class AuditRecord:
    """A decision to log: ``event`` picks the MESSAGE_ID, the rest become KEYD_* fields."""

    event: AuditEvent
    message: str
    volume: str | None = None
    serial: str | None = None
    signer: str | None = None
    bundle_id: str | None = None
    result: str | None = None
    reason: str | None = None
    duration_ms: int | None = None
    priority: int = PRIORITY_INFO

    def __post_init__(self) -> None:
        for name in ("message", *FIELD_NAMES):
            object.__setattr__(self, name, _checked(name, getattr(self, name)))
        if not isinstance(self.event, AuditEvent):
            raise UnsafeAuditValue(f"audit event must be an AuditEvent, not "
                                   f"{type(self.event).__name__}")

    @property
    def message_id(self) -> str:
        """The journald MESSAGE_ID of this record's event type."""
        return MESSAGE_IDS[self.event]

    def journal_fields(self) -> dict[str, str]:
        """Every field as journald receives it (MESSAGE included); absent fields left out."""
        fields = {"MESSAGE": self.message, "MESSAGE_ID": self.message_id,
                  "PRIORITY": str(self.priority), "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
                  "KEYD_EVENT": self.event.value}
        for name, journal_name in FIELD_NAMES.items():
            value = getattr(self, name)
            if value is not None:
                fields[journal_name] = str(value)
        return fields


def duration_ms(seconds: float | None) -> int | None:
    """Seconds (as measured) to whole milliseconds for KEYD_DURATION_MS."""
    return None if seconds is None else round(seconds * 1000)
