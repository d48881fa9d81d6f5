"""The audit of a boot-time unlock: written in the initramfs, journaled by keyd.service.

The initramfs has no journal to write to; /run survives the switch to the root, so
the unlock leaves its records in /run/keyd/boot-audit.json and keyd, when it starts,
writes them to the journal with their MESSAGE_IDs and removes the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from keyd.audit.ids import AuditEvent

log = logging.getLogger("keyd.daemon")

BOOT_AUDIT = "boot-audit.json"  # in keyd's run directory
Record = dict[str, str]
Audit = Callable[..., None]  # Daemon.audit(volume, event, message, **fields)


def write_records(path: Path, records: list[Record]) -> None:
    """Keep ``records`` for keyd.service (the file is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records) + "\n")


def forward_records(path: Path, audit: Audit) -> int:
    """Journal the records kept at ``path`` through ``audit`` and remove the file; how many.

    A record that cannot be read is logged and dropped: a broken file must not stop keyd.
    """
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.error("cannot read the boot-time audit records in %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return 0
    path.unlink(missing_ok=True)
    sent = 0
    for record in records if isinstance(records, list) else []:
        try:
            event = AuditEvent(record.pop("event"))
            volume, message = record.pop("volume"), record.pop("message")
            seconds = int(record.pop("duration_ms", "0")) / 1000
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            log.error("dropping a boot-time audit record (%s): %r", exc, record)
            continue
        audit(volume, event, message, seconds=seconds, **record)
        sent += 1
    return sent
