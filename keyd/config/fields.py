"""Typed access to one TOML table, with errors that name file, line, key path and fix.

:class:`Table` wraps a parsed ``dict``; every getter checks the type, records
that the key was used, and :meth:`Table.done` rejects keys nobody asked for,
suggesting the closest known key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keyd.errors import ConfigError

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _header_path(line: str) -> str | None:
    match = _HEADER.match(line)
    if match is None:
        return None
    return "".join(match.group(1).split()).replace('"', "").replace("'", "")


def find_line(text: str, table: str, key: str | None) -> int | None:
    """Best-effort 1-based line of ``key`` in ``[table]`` (or of the header when key is None)."""
    lines = text.splitlines()
    start: int | None = None
    for number, line in enumerate(lines):
        path = _header_path(line)
        if path == table:
            start = number
            if key is None:
                return number + 1
        elif path is not None and start is not None:
            break
        elif start is not None and key is not None and _assigns(line, key):
            return number + 1
    return _first_assignment(lines, key) if key is not None else None


def _assigns(line: str, key: str) -> bool:
    return re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", line) is not None


def _first_assignment(lines: Sequence[str], key: str) -> int | None:
    for number, line in enumerate(lines):
        if _assigns(line, key):
            return number + 1
    return None


@dataclass
class Source:
    """The file a table came from: its name (for messages) and text (for line numbers)."""

    file: str
    text: str

    def error(self, table: str, key: str | None, problem: str, fix: str) -> ConfigError:
        """A ConfigError for ``table.key`` with the line found in the text."""
        path = f"{table}.{key}" if table and key else (key or table)
        return ConfigError(self.file, path, problem, fix=fix,
                           line=find_line(self.text, table, key))


@dataclass
class Table:
    """One TOML table at key path ``path``; getters validate and mark keys as used."""

    source: Source
    path: str
    data: dict[str, Any]
    used: set[str] = field(default_factory=set)

    def error(self, key: str | None, problem: str, fix: str) -> ConfigError:
        """A ConfigError located at ``key`` in this table."""
        return self.source.error(self.path, key, problem, fix)

    def _get(self, key: str, kinds: tuple[type, ...], what: str, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(None, f"missing required key {key!r}",
                                 f"add {key} = <{what}> to [{self.path}]")
            return None
        value = self.data[key]
        # bool is an int in Python; a TOML boolean is never a number here.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(key, f"{key} must be {what}, not {type(value).__name__}",
                             f"write {key} as {what}")
        return value

    def text(self, key: str, *, required: bool = False) -> str | None:
        """A string value (None when absent and not required)."""
        value: str | None = self._get(key, (str,), "a string", required)
        return value

    def req_text(self, key: str) -> str:
        """A required string value."""
        value: str = self._get(key, (str,), "a string", True)
        return value

    def integer(self, key: str, *, minimum: int = 0, maximum: int = 2**63) -> int | None:
        """An integer within [minimum, maximum], or None when absent."""
        value: int | None = self._get(key, (int,), "an integer", False)
        if value is not None and not minimum <= value <= maximum:
            raise self.error(key, f"{key} = {value} is out of range",
                             f"use a value from {minimum} to {maximum}")
        return value

    def number(self, key: str, *, minimum: float = 0.0, above: bool = False) -> float | None:
        """A number (integer or float) >= ``minimum`` (> with ``above``), or None when absent."""
        value: float | None = self._get(key, (int, float), "a number", False)
        if value is not None and (value < minimum or (above and value == minimum)):
            raise self.error(key, f"{key} = {value} is out of range",
                             f"use a number {'>' if above else '>='} {minimum:g}")
        return None if value is None else float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        """A boolean, ``default`` when absent."""
        value: bool | None = self._get(key, (bool,), "true or false", False)
        return default if value is None else value

    def text_list(self, key: str) -> tuple[str, ...]:
        """A list of strings (empty when absent)."""
        value: list[Any] | None = self._get(key, (list,), "a list of strings", False)
        if value is None:
            return ()
        if not all(isinstance(item, str) for item in value):
            raise self.error(key, f"{key} must contain only strings",
                             f'write {key} = ["...", "..."]')
        return tuple(value)

    def subtable(self, key: str) -> dict[str, Any]:
        """A sub-table (empty when absent)."""
        value: dict[str, Any] | None = self._get(key, (dict,), "a table", False)
        return {} if value is None else value

    def choice(self, key: str, choices: Sequence[str], default: str | None = None) -> str | None:
        """A string that must be one of ``choices``."""
        value = self.text(key)
        if value is None:
            return default
        if value not in choices:
            raise self.error(key, f"{key} = {value!r} is not one of {', '.join(choices)}",
                             f"set {key} to one of: {', '.join(choices)}")
        return value

    def done(self) -> None:
        """Reject every key that no getter asked for (unknown keys are errors)."""
        for key in self.data:
            if key in self.used:
                continue
            close = difflib.get_close_matches(key, sorted(self.used), n=1)
            hint = f"did you mean {close[0]!r}?" if close else \
                f"known keys here: {', '.join(sorted(self.used)) or 'none'}"
            raise self.error(key, f"unknown key {key!r}", f"remove it; {hint}")
