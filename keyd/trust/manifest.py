"""The signed manifest of a key bundle: a pure parser and writer (formats 1 and 2).

The manifest is UTF-8 TOML (see docs/bundle-format.md). Parsing is strict:
unknown keys, wrong types, naive datetimes, duplicate volumes or files are
all refused with a :class:`~keyd.trust.errors.ManifestError`; no other
exception escapes :func:`parse_manifest`, whatever the input.

Format 1 gives each volume one key file, used for every crypt layer. Format 2
gives an entry one or more ``[[key.secret]]`` tables, each for one key name (a
crypt layer's ``key``), so two layers made with different passphrases open
from one stick. A format 2 entry with a ``[key.share]`` table is one share of
a k-of-n enrollment: its secrets are sealed, and open only once k shares of
the same set are combined (:mod:`keyd.trust.shares`). keyd writes format 1
whenever the bundle fits it, so older keyds keep reading what they can.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keyd.trust.errors import ManifestError, Reason
from keyd.trust.revocation import Revocations, revocations_from_table, valid_token
from keyd.trust.shares import MAX_SHARES
from keyd.trust.tomlw import toml_table

FORMAT = 1
NAMED_FORMAT = 2
FORMATS = (FORMAT, NAMED_FORMAT)
MAX_MANIFEST_BYTES = 64 * 1024
MAX_KEYS = 64
MAX_SECRETS = 16
MAX_GENERATION = 2**63 - 1
MANIFEST_NAME = "manifest"
SIGNATURE_NAME = "manifest.sig"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}\Z")
_TOP = frozenset({"format", "created", "key", "revoke"})
_COMMON = frozenset({"volume", "volume_uuid", "bundle_id", "generation", "not_before",
                     "not_after", "bind_serial", "bind_fs_uuid"})
_FILE = frozenset({"file", "sha256", "encrypted"})
_SECRET = _FILE | {"name", "kind"}
KINDS = ("key", "keyfile")
_SHARE = _FILE | {"set", "index", "threshold", "count"}
_ENTRY = {FORMAT: _COMMON | _FILE, NAMED_FORMAT: _COMMON | {"secret", "share"}}


@dataclass(frozen=True)
class KeyFile:
    """One secret of a bundle: a file in ``keyd/`` and the key name it serves.

    ``name`` None serves every key name of the volume the entry does not list. ``kind``
    "key" is the key (passphrase or key file bytes); "keyfile" is a TrueCrypt/VeraCrypt
    keyfile, given to cryptsetup besides the passphrase (a layer may have several).
    """

    file: str
    sha256: str
    encrypted: bool = False
    name: str | None = None
    kind: str = "key"


@dataclass(frozen=True)
class ShareFile:
    """One share of a k-of-n enrollment: the split it belongs to, its place, and its file."""

    set_id: str
    index: int
    threshold: int
    count: int
    file: KeyFile


@dataclass(frozen=True)
class KeyEntry:
    """One bundle: which volume its secrets open, where they may live, and when."""

    volume: str
    bundle_id: str
    secrets: tuple[KeyFile, ...]
    generation: int
    not_before: datetime
    not_after: datetime | None = None
    volume_uuid: str | None = None
    bind_serial: str | None = None
    bind_fs_uuid: str | None = None
    share: ShareFile | None = None  # set: the secrets are sealed until k shares combine

    @property
    def named(self) -> bool:
        """True when the entry needs format 2 (a named secret, more than one, or a share)."""
        return (len(self.secrets) > 1 or self.share is not None
                or any(s.name is not None or s.kind != "key" for s in self.secrets))

    @property
    def key_names(self) -> list[str]:
        """The key names its secrets are for, sorted, each once."""
        return sorted({s.name for s in self.secrets if s.name is not None})

    @property
    def files(self) -> tuple[KeyFile, ...]:
        """Every file the entry names: its secrets, then its share."""
        return self.secrets + ((self.share.file,) if self.share else ())


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its keys and the revocations it carries."""

    keys: tuple[KeyEntry, ...]
    revocations: Revocations = field(default_factory=Revocations)
    created: datetime | None = None

    @property
    def format(self) -> int:
        """The lowest format that can carry these entries."""
        return NAMED_FORMAT if any(entry.named for entry in self.keys) else FORMAT


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
        raise _bad("format", "must be the integer 1 or 2")
    if version not in FORMATS:
        raise _bad("format", f"version {version} is not supported (this keyd reads 1 and 2)",
                   Reason.UNSUPPORTED_FORMAT)
    created = _optional_time(table, "created", "created")
    keys = _entries(table.get("key"), version)
    revoked = revocations_from_table(table.get("revoke", {}), "revoke")
    return Manifest(keys, revoked, created)


def _entries(value: Any, version: int) -> tuple[KeyEntry, ...]:
    if not isinstance(value, list) or not value:
        raise _bad("key", "needs at least one [[key]] table")
    if len(value) > MAX_KEYS:
        raise _bad("key", f"has more than {MAX_KEYS} entries")
    entries = tuple(_entry(item, f"key[{index}]", version) for index, item in enumerate(value))
    _unique("key", "volume", [entry.volume for entry in entries])
    _unique("key", "bundle_id", [entry.bundle_id for entry in entries])
    _unique("key", "file", [secret.file for entry in entries for secret in entry.files])
    return entries


def _unique(where: str, name: str, seen: list[Any]) -> None:
    duplicates = sorted({item for item in seen if seen.count(item) > 1}, key=str)
    if duplicates:
        raise _bad(where, f"{name} {duplicates[0]!r} appears more than once")


def _table(item: Any, where: str, allowed: frozenset[str], what: str) -> dict[str, Any]:
    """``item`` as a table with only ``allowed`` keys (``what`` names an unknown one)."""
    if not isinstance(item, dict):
        raise _bad(where, "must be a table")
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", f"is not {what}")
    return item


def _entry(value: Any, where: str, version: int) -> KeyEntry:
    item = _table(value, where, _ENTRY[version], f"a key-entry field of format {version}")
    entry = KeyEntry(
        volume=_matching(item, "volume", where, _NAME),
        bundle_id=_token(item, "bundle_id", where),
        secrets=(_secrets(item.get("secret"), f"{where}.secret") if version == NAMED_FORMAT
                 else (_key_file(item, where),)),
        generation=_generation(item, where),
        not_before=_time(item, "not_before", where),
        not_after=_optional_time(item, "not_after", f"{where}.not_after"),
        volume_uuid=_optional_match(item, "volume_uuid", where, _UUID),
        bind_serial=_optional_token(item, "bind_serial", where),
        bind_fs_uuid=_optional_match(item, "bind_fs_uuid", where, _UUID),
        share=_share(item["share"], f"{where}.share") if "share" in item else None,
    )
    return _checked(entry, where)


def _share(value: Any, where: str) -> ShareFile:
    item = _table(value, where, _SHARE, "a share field (set, index, threshold, count, file, "
                  "sha256, encrypted)")
    share = ShareFile(set_id=_token(item, "set", where), index=_small(item, "index", where),
                      threshold=_small(item, "threshold", where),
                      count=_small(item, "count", where), file=_key_file(item, where))
    if not 2 <= share.threshold <= share.count or share.index > share.count:
        raise _bad(where, f"needs 2 <= threshold <= count and index <= count (index "
                   f"{share.index}, threshold {share.threshold}, count {share.count})")
    return share


def _small(item: dict[str, Any], name: str, where: str) -> int:
    value = item.get(name)
    if type(value) is not int or not 1 <= value <= MAX_SHARES:
        raise _bad(f"{where}.{name}", f"is required and must be an integer from 1 to {MAX_SHARES}")
    return value


def _secrets(value: Any, where: str) -> tuple[KeyFile, ...]:
    if not isinstance(value, list) or not value:
        raise _bad(where, "needs at least one [[key.secret]] table")
    if len(value) > MAX_SECRETS:
        raise _bad(where, f"has more than {MAX_SECRETS} secrets")
    secrets = tuple(_named_file(item, f"{where}[{index}]") for index, item in enumerate(value))
    _unique(where, "name", [secret.name or "(every other key name)" for secret in secrets
                             if secret.kind == "key"])
    return secrets


def _named_file(value: Any, where: str) -> KeyFile:
    item = _table(value, where, _SECRET, "a secret field (name, kind, file, sha256, encrypted)")
    secret = _key_file(item, where)
    name = _optional_match(item, "name", where, _NAME)
    kind = item.get("kind", "key")
    if kind not in KINDS:
        raise _bad(f"{where}.kind", f"must be one of {', '.join(KINDS)}")
    return KeyFile(secret.file, secret.sha256, secret.encrypted, name, kind)


def _key_file(item: dict[str, Any], where: str) -> KeyFile:
    return KeyFile(file=_file_name(item, where), sha256=_matching(item, "sha256", where, _HEX64),
                   encrypted=_boolean(item, "encrypted", where))


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
    for entry in manifest.keys:
        parts.append(toml_table("[[key]]", _entry_items(entry, manifest.format)))
        if entry.share is not None:
            parts.append(toml_table("[key.share]", _share_items(entry.share)))
        if manifest.format == NAMED_FORMAT:
            parts += [toml_table("[[key.secret]]", _file_items(secret))
                      for secret in entry.secrets]
    if manifest.revocations:
        revoked = manifest.revocations
        parts.append(toml_table("[revoke]", [
            ("bundle_ids", tuple(sorted(revoked.bundle_ids))),
            ("serials", tuple(sorted(revoked.serials))),
            ("signers", tuple(sorted(revoked.signers)))]))
    return "\n".join(parts).encode()


def _entry_items(entry: KeyEntry, version: int) -> list[tuple[str, Any]]:
    files = _file_items(entry.secrets[0]) if version == FORMAT else []
    return [("volume", entry.volume), ("volume_uuid", entry.volume_uuid),
            ("bundle_id", entry.bundle_id), *files, ("generation", entry.generation),
            ("not_before", entry.not_before), ("not_after", entry.not_after),
            ("bind_serial", entry.bind_serial), ("bind_fs_uuid", entry.bind_fs_uuid)]


def _share_items(share: ShareFile) -> list[tuple[str, Any]]:
    return [("set", share.set_id), ("index", share.index), ("threshold", share.threshold),
            ("count", share.count), *_file_items(share.file)]


def _file_items(secret: KeyFile) -> list[tuple[str, Any]]:
    kind = secret.kind if secret.kind != "key" else None
    return [("name", secret.name), ("kind", kind), ("file", secret.file),
            ("sha256", secret.sha256), ("encrypted", secret.encrypted)]
