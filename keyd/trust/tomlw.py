"""The little TOML keyd writes: strings, integers, booleans, datetimes and string lists.

:mod:`tomllib` only reads. Strings are written as JSON strings, which are
valid TOML basic strings (same escapes, ``\\uXXXX`` for anything non-ASCII),
so any value round-trips through :func:`tomllib.loads`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime

Value = str | int | bool | datetime | tuple[str, ...]


def toml_value(value: Value) -> str:
    """Render one value as TOML."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    return json.dumps(value)


def format_datetime(moment: datetime) -> str:
    """An RFC 3339 UTC datetime with second precision, e.g. ``2026-11-23T13:00:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def toml_table(header: str | None, items: Iterable[tuple[str, Value | None]]) -> str:
    """Render ``key = value`` lines under ``header`` (``[x]``, ``[[x]]`` or None).

    Items whose value is None are left out.
    """
    lines = [header] if header else []
    lines += [f"{key} = {toml_value(value)}" for key, value in items if value is not None]
    return "\n".join(lines) + "\n"
