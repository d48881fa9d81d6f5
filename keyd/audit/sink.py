"""Where audit records go: journald in production, a list in tests."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from keyd.audit.record import AuditRecord

log = logging.getLogger("keyd.audit")

JournalSend = Callable[..., Any]


class AuditSink(Protocol):
    """Receives every audit record the daemon makes."""

    def emit(self, record: AuditRecord) -> None:
        """Store ``record``; must not raise for an unavailable backend."""
        ...


class JournalSink:
    """Sends records to journald with ``systemd.journal.send`` (one call per record)."""

    def __init__(self, send: JournalSend | None = None) -> None:
        if send is None:
            # Imported on use: only the daemon needs libsystemd's journal module.
            send = importlib.import_module("systemd.journal").send
        self.send = send

    def emit(self, record: AuditRecord) -> None:
        """See AuditSink; a failed send is logged (stderr reaches the journal too)."""
        fields = record.journal_fields()
        message = fields.pop("MESSAGE")
        try:
            self.send(message, **fields)
        except OSError as exc:
            log.error("audit record %s not sent to journald (%s): %s",
                      record.event.value, exc.strerror, message)


class MemorySink:
    """Keeps records in a list; the fake sink for unit tests and the lab's self-checks."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def emit(self, record: AuditRecord) -> None:
        """Append ``record``."""
        self.records.append(record)

    def events(self) -> list[str]:
        """The event types emitted so far, in order."""
        return [record.event.value for record in self.records]
