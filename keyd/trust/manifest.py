"""The signed manifest of a key bundle: a pure parser and writer (format 1).

The manifest is UTF-8 TOML (see docs/bundle-format.md). Parsing is strict:
unknown keys, wrong types, naive datetimes, duplicate volumes or files are
all refused with a :class:`~keyd.trust.errors.ManifestError`; no other
exception escapes :func:`parse_manifest`, whatever the input.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keyd.trust.errors import ManifestError, Reason
from keyd.trust.revocation import Revocations, revocations_from_table, valid_token
from keyd.trust.tomlw import toml_table

FORMAT = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_KEYS = 64
MAX_GENERATION = 2**63 - 1
MANIFEST_NAME = "manifest"
SIGNATURE_NAME = "manifest.sig"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}\Z")
_TOP = frozenset({"format", "created", "key", "revoke"})
_ENTRY = frozenset({"volume", "volume_uuid", "bundle_id", "file", "sha256", "encrypted",
                    "generation", "not_before", "not_after", "bind_serial", "bind_fs_uuid"})


@dataclass(frozen=True)
class KeyEntry:
    """One key of the bundle: which volume it opens, where it may live, and when."""

    volume: str
    bundle_id: str
    file: str
    sha256: str
    generation: int
    not_before: datetime
    not_after: datetime | None = None
    volume_uuid: str | None = None
    bind_serial: str | None = None
    bind_fs_uuid: str | None = None
    encrypted: bool = False


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its keys and the revocations it carries."""

    keys: tuple[KeyEntry, ...]
    revocations: Revocations = field(default_factory=Revocations)
    created: datetime | None = None
    format: int = FORMAT


def _bad(where: str, problem: str, reason: Reason = Reason.MALFORMED_MANIFEST) -> ManifestError:
    return ManifestError(reason, f"manifest {where}: {problem}", subject=where,
                         fix="re-create the bundle with keydctl enroll "
                             "(the format is in docs/bundle-format.md)")


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise ManifestError on any problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _bad("file", f"is larger than {MAX_MANIFEST_BYTES} bytes", Reason.TOO_LARGE)
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad("file", "is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise _bad("file", f"is not valid TOML ({exc})") from None
    except RecursionError:
        raise _bad("file", "nests too deeply") from None
    return manifest_from_table(table)


def manifest_from_table(table: Any) -> Manifest:
    """Validate an already-decoded TOML table as a manifest (pure; raises ManifestError)."""
    if not isinstance(table, dict):
        raise _bad("file", "must be a TOML table")
    unknown = sorted(set(table) - _TOP)
    if unknown:
        raise _bad(unknown[0], "is not a manifest key")
    version = table.get("format")
    if type(version) is not int:
        raise _bad("format", "must be the integer 1")
    if version != FORMAT:
        raise _bad("format", f"version {version} is not supported (this keyd reads {FORMAT})",
                   Reason.UNSUPPORTED_FORMAT)
    created = _optional_time(table, "created", "created")
    keys = _entries(table.get("key"))
    revoked = revocations_from_table(table.get("revoke", {}), "revoke")
    return Manifest(keys, revoked, created)


def _entries(value: Any) -> tuple[KeyEntry, ...]:
    if not isinstance(value, list) or not value:
        raise _bad("key", "needs at least one [[key]] table")
    if len(value) > MAX_KEYS:
        raise _bad("key", f"has more than {MAX_KEYS} entries")
    entries = tuple(_entry(item, f"key[{index}]") for index, item in enumerate(value))
    for name in ("volume", "file", "bundle_id"):
        seen = [getattr(entry, name) for entry in entries]
        duplicates = sorted({item for item in seen if seen.count(item) > 1})
        if duplicates:
            raise _bad("key", f"{name} {duplicates[0]!r} appears more than once")
    return entries


def _entry(item: Any, where: str) -> KeyEntry:
    if not isinstance(item, dict):
        raise _bad(where, "must be a table")
    unknown = sorted(set(item) - _ENTRY)
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", "is not a key-entry field")
    entry = KeyEntry(
        volume=_matching(item, "volume", where, _NAME),
        bundle_id=_token(item, "bundle_id", where),
        file=_file_name(item, where),
        sha256=_matching(item, "sha256", where, _HEX64),
        generation=_generation(item, where),
        not_before=_time(item, "not_before", where),
        not_after=_optional_time(item, "not_after", f"{where}.not_after"),
        volume_uuid=_optional_match(item, "volume_uuid", where, _UUID),
        bind_serial=_optional_token(item, "bind_serial", where),
        bind_fs_uuid=_optional_match(item, "bind_fs_uuid", where, _UUID),
        encrypted=_boolean(item, "encrypted", where),
    )
    return _checked(entry, where)


def _checked(entry: KeyEntry, where: str) -> KeyEntry:
    if entry.not_after is not None and entry.not_after <= entry.not_before:
        raise _bad(f"{where}.not_after", "must be later than not_before")
    if entry.bind_serial is None and entry.bind_fs_uuid is None:
        raise _bad(where, "binds to no stick: set bind_serial and/or bind_fs_uuid")
    return entry


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise _bad(f"{where}.{name}", "is required and must be a string")
    return value


def _matching(item: dict[str, Any], name: str, where: str, pattern: re.Pattern[str]) -> str:
    value = _string(item, name, where)
    if not pattern.match(value):
        raise _bad(f"{where}.{name}", f"{value[:80]!r} is not allowed here")
    return value


def _optional_match(item: dict[str, Any], name: str, where: str,
                    pattern: re.Pattern[str]) -> str | None:
    return _matching(item, name, where, pattern) if name in item else None


def _token(item: dict[str, Any], name: str, where: str) -> str:
    value = _string(item, name, where)
    if not valid_token(value):
        raise _bad(f"{where}.{name}", f"{value[:80]!r} is not a valid id")
    return value


def _optional_token(item: dict[str, Any], name: str, where: str) -> str | None:
    return _token(item, name, where) if name in item else None


def _file_name(item: dict[str, Any], where: str) -> str:
    value = _matching(item, "file", where, _NAME)
    if value in (MANIFEST_NAME, SIGNATURE_NAME):
        raise _bad(f"{where}.file", f"{value!r} is reserved for the manifest")
    return value


def _generation(item: dict[str, Any], where: str) -> int:
    value = item.get("generation")
    if type(value) is not int or not 1 <= value <= MAX_GENERATION:
        raise _bad(f"{where}.generation", "is required and must be a positive integer")
    return value


def _boolean(item: dict[str, Any], name: str, where: str) -> bool:
    value = item.get(name, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}.{name}", "must be true or false")
    return value


def _time(item: dict[str, Any], name: str, where: str) -> datetime:
    value = item.get(name)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _bad(f"{where}.{name}",
                   "is required and must be a datetime with an offset, e.g. 2026-01-31T00:00:00Z")
    return value


def _optional_time(item: dict[str, Any], name: str, where: str) -> datetime | None:
    if name not in item:
        return None
    value = item[name]
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _bad(where, "must be a datetime with an offset, e.g. 2026-01-31T00:00:00Z")
    return value


def render_manifest(manifest: Manifest) -> bytes:
    """The manifest as TOML text; :func:`parse_manifest` reads back an equal Manifest."""
    parts = [toml_table(None, [("format", manifest.format), ("created", manifest.created)])]
    parts += [toml_table("[[key]]", _entry_items(entry)) for entry in manifest.keys]
    if manifest.revocations:
        revoked = manifest.revocations
        parts.append(toml_table("[revoke]", [
            ("bundle_ids", tuple(sorted(revoked.bundle_ids))),
            ("serials", tuple(sorted(revoked.serials))),
            ("signers", tuple(sorted(revoked.signers)))]))
    return "\n".join(parts).encode()


def _entry_items(entry: KeyEntry) -> list[tuple[str, Any]]:
    return [("volume", entry.volume), ("volume_uuid", entry.volume_uuid),
            ("bundle_id", entry.bundle_id), ("file", entry.file), ("sha256", entry.sha256),
            ("encrypted", entry.encrypted), ("generation", entry.generation),
            ("not_before", entry.not_before), ("not_after", entry.not_after),
            ("bind_serial", entry.bind_serial), ("bind_fs_uuid", entry.bind_fs_uuid)]
