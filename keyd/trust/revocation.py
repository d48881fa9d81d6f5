"""Revocation lists: bundle ids, stick serials and signer fingerprints keyd must refuse.

The same shape is used in three places: the admin's ``/etc/keyd/revoked.toml``,
the ``[revoke]`` table a newer signed manifest carries, and the list keyd
learned from such manifests (kept in its state directory). The effective list
is their union. Parsing is pure; loading and saving are thin adapters.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyd.fingerprint import normalize_fingerprint
from keyd.trust.atomic import write_atomic
from keyd.trust.errors import ManifestError, Reason, TrustStateError
from keyd.trust.tomlw import toml_table

# A bundle id or a serial (udev's ID_SERIAL_SHORT): no spaces or quotes, bounded.
_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}\Z")
_FIELDS = ("bundle_ids", "serials", "signers")
MAX_ENTRIES = 4096          # per list, in a manifest (read from a stick: hostile input)
# keyd's own files (the admin's revocation file, what keyd learned from manifests) only ever
# grow; they are root's, so their limit only bounds memory and never locks the box out.
MAX_FILE_ENTRIES = 1 << 16
MAX_FILE_BYTES = 8 << 20


def valid_token(text: str) -> bool:
    """True if ``text`` is acceptable as a bundle id or a USB serial."""
    return bool(_TOKEN.match(text))


@dataclass(frozen=True)
class Revocations:
    """What must be refused: bundle ids, USB serials, signer primary fingerprints."""

    bundle_ids: frozenset[str] = field(default_factory=frozenset)
    serials: frozenset[str] = field(default_factory=frozenset)
    signers: frozenset[str] = field(default_factory=frozenset)

    def union(self, other: Revocations) -> Revocations:
        """Everything revoked by either list."""
        return Revocations(self.bundle_ids | other.bundle_ids, self.serials | other.serials,
                           self.signers | other.signers)

    def covers(self, other: Revocations) -> bool:
        """True if every revocation in ``other`` is already in this list."""
        return self.union(other) == self

    def __bool__(self) -> bool:
        return bool(self.bundle_ids or self.serials or self.signers)


def revocations_from_table(table: Any, where: str, limit: int = MAX_ENTRIES) -> Revocations:
    """Validate a ``{bundle_ids, serials, signers}`` table; raise ManifestError naming ``where``.

    ``limit``: entries allowed per list.
    """
    if not isinstance(table, dict):
        raise _bad(where, "must be a table")
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise _bad(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(_FIELDS)})")
    values = {name: _string_list(table.get(name, []), f"{where}.{name}", limit)
              for name in _FIELDS}
    signers = set()
    for text in values["signers"]:
        fpr = normalize_fingerprint(text)
        if fpr is None:
            raise _bad(f"{where}.signers", f"{text[:80]!r} is not a full key fingerprint")
        signers.add(fpr)
    for name in ("bundle_ids", "serials"):
        for text in values[name]:
            if not valid_token(text):
                raise _bad(f"{where}.{name}", f"{text[:80]!r} is not a valid id")
    return Revocations(frozenset(values["bundle_ids"]), frozenset(values["serials"]),
                       frozenset(signers))


def _string_list(value: Any, where: str, limit: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(where, "must be a list of strings")
    if len(value) > limit:
        raise _bad(where, f"has more than {limit} entries")
    return value


def _bad(where: str, problem: str) -> ManifestError:
    return ManifestError(Reason.MALFORMED_MANIFEST, f"{where}: {problem}", subject=where)


def parse_revocations(data: bytes, source: str) -> Revocations:
    """Parse a revocation file (top-level ``bundle_ids``, ``serials``, ``signers``)."""
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise _bad(source, f"not valid UTF-8 TOML ({type(exc).__name__})") from None
    table.pop("format", None)
    return revocations_from_table(table, source, MAX_FILE_ENTRIES)


def render_revocations(revoked: Revocations) -> bytes:
    """The TOML text of a revocation file; :func:`parse_revocations` reads it back."""
    header = "# Revoked keyd bundles, USB stick serials and signer fingerprints.\nformat = 1\n"
    body = toml_table(None, [(name, tuple(sorted(getattr(revoked, name)))) for name in _FIELDS])
    return (header + body).encode()


def load_revocations(path: Path) -> Revocations:
    """Read a revocation file; a missing file means nothing is revoked."""
    try:
        with path.open("rb") as stream:
            _check_safe(path, os.fstat(stream.fileno()))
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return Revocations()
    except OSError as exc:
        raise TrustStateError(Reason.STATE_ERROR, f"cannot read {path}: "
                              f"{errno.errorcode.get(exc.errno or 0, exc.strerror)}",
                              subject=str(path)) from None
    if len(data) > MAX_FILE_BYTES:
        raise TrustStateError(Reason.STATE_ERROR, f"{path} is larger than {MAX_FILE_BYTES} bytes",
                              subject=str(path))
    return parse_revocations(data, str(path))


def near_cap(path: Path, revoked: Revocations) -> str | None:
    """A warning once a revocation file holds 90 % of what keyd reads back, else None."""
    largest = max(_FIELDS, key=lambda name: len(getattr(revoked, name)))
    count, size = len(getattr(revoked, largest)), len(render_revocations(revoked))
    if count < MAX_FILE_ENTRIES * 9 // 10 and size < MAX_FILE_BYTES * 9 // 10:
        return None
    return (f"{path} holds {count} {largest} ({size} bytes) of at most {MAX_FILE_ENTRIES} "
            f"({MAX_FILE_BYTES} bytes): prune it before keyd has to refuse to learn more")


def _check_safe(path: Path, info: os.stat_result) -> None:
    """Refuse a revocation file (or its directory) that someone else could change: they
    could take a lost stick off the list."""
    me = os.geteuid()
    for where, what in ((path, info), (path.parent, path.parent.stat())):
        if what.st_uid != me or what.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise TrustStateError(
                Reason.UNSAFE_REVOCATIONS, f"{where} is owned by uid {what.st_uid} with mode "
                f"{stat.filemode(what.st_mode)}: someone besides keyd's user could un-revoke a "
                "stick", subject=str(where), fix=f"chown {me} {where} && chmod go-w {where}")


def save_revocations(path: Path, revoked: Revocations) -> None:
    """Write a revocation file atomically (mode 0644: it holds no secrets).

    A file keyd could not read back would refuse every stick, so one past the caps is
    never written: the old file stays and TrustStateError says what to prune.
    """
    data = render_revocations(revoked)
    largest = max(_FIELDS, key=lambda name: len(getattr(revoked, name)))
    count = len(getattr(revoked, largest))
    if count > MAX_FILE_ENTRIES or len(data) > MAX_FILE_BYTES:
        raise TrustStateError(
            Reason.STATE_ERROR, f"{path} would hold {count} {largest} ({len(data)} bytes), more "
            f"than keyd reads ({MAX_FILE_ENTRIES} per list, {MAX_FILE_BYTES} bytes); it is left "
            "as it was", subject=str(path),
            fix=f"prune {path}: bundle ids of re-keyed bundles are refused by their generation "
                "anyway, serials of destroyed sticks no longer matter")
    try:
        write_atomic(path, data, mode=0o644)
    except OSError as exc:
        raise TrustStateError(Reason.STATE_ERROR, f"cannot write {path}: {exc.strerror}",
                              subject=str(path)) from None
