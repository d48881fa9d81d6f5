"""``--key-file [NAME=]PATH``: one key for every key name of a volume, or one per key name.

keydctl unlock (direct and through keyd) and keydctl enroll read keys the same way, so
the same words mean the same thing on every verb.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from keyd.errors import KeydError

_NAMED_KEY = re.compile(r"^([a-z0-9][a-z0-9_]*)=(.+)$")


class UsageError(KeydError):
    """The command line asks for something impossible."""

    exit_code = 2


@dataclass(frozen=True)
class KeyFiles:
    """Where the keys are: ``default`` serves every key name without one in ``by_name``."""

    default: str | None = None
    by_name: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when no key file was given."""
        return self.default is None and not self.by_name


def split_named(entry: str) -> tuple[str | None, str]:
    """``NAME=PATH`` as (NAME, PATH); anything else (a path, even with a "=") as (None, it)."""
    match = _NAMED_KEY.match(entry)
    return (match.group(1), match.group(2)) if match else (None, entry)


def parse_key_files(entries: Sequence[str], volume: str,
                    names: Sequence[str] | None = None) -> KeyFiles:
    """Split ``--key-file`` values; ``names`` (when known) are the volume's key names."""
    default, by_name = None, {}
    for entry in entries:
        name, path = split_named(entry)
        if name is None:
            if default is not None:
                raise UsageError("give only one --key-file without NAME=",
                                 fix="use --key-file NAME=PATH for each key of the volume")
            default = path
            continue
        if names is not None and name not in names:
            raise UsageError(f"volume {volume} has no key named {name!r}",
                             fix=f"its keys are: {', '.join(names) or 'none'}")
        if name in by_name:
            raise UsageError(f"--key-file {name}= is given twice", fix="give each key name once")
        by_name[name] = path
    return KeyFiles(default, by_name)
