"""``keydctl audit``: keyd's audit trail from the journal, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from keyd.audit.reader import (
    AuditSource,
    JournalSource,
    parse_since,
    read_entries,
    render_table,
    to_json,
)


def _audit(args: argparse.Namespace) -> int:
    source: AuditSource = args.audit_source or JournalSource(args.journal_dir)
    since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    entries = read_entries(source, volume=args.volume, since=since)
    out = args.stdout or sys.stdout
    if args.json:
        print(json.dumps(to_json(entries), indent=2), file=out)
    elif not entries:
        print("no keyd audit records" + (f" for volume {args.volume}" if args.volume else ""),
              file=out)
    else:
        print(render_table(entries), end="", file=out)
    return 0


def register(subparsers: Any) -> None:
    """Add ``audit`` to keydctl."""
    parser = subparsers.add_parser(
        "audit", help="show who unlocked and locked what, when, with which key",
        description="Read keyd's audit records (one per decision) from the journal.\n\n"
                    "examples:\n  keydctl audit\n  keydctl audit --volume tank --since 2h\n"
                    "  keydctl audit --since 2026-11-23 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", metavar="VOLUME", help="only records about this volume")
    parser.add_argument("--since", metavar="TIME",
                        help="only records since TIME (ISO date/time, or 30m, 2h, 1d ago)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--journal-dir", metavar="DIR", help="read journal files from DIR")
    parser.set_defaults(func=_audit, audit_source=None, stdout=None)
