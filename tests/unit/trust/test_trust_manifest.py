"""The manifest parser: what it accepts, every way it refuses, round-trips, and fuzzing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyd.trust.errors import ManifestError, Reason
from keyd.trust.manifest import (
    KeyEntry,
    KeyFile,
    Manifest,
    ShareFile,
    manifest_from_table,
    parse_manifest,
    render_manifest,
)
from keyd.trust.revocation import Revocations

DIGEST = "ab" * 32
VALID = f"""format = 1
created = 2026-11-23T13:00:00Z

[[key]]
volume = "tank"
volume_uuid = "0c5c6d83-311e-495d-8b14-84576dd84ca9"
bundle_id = "tank-1"
file = "tank.key"
sha256 = "{DIGEST}"
encrypted = false
generation = 3
not_before = 2026-01-01T00:00:00Z
not_after = 2027-01-01T00:00:00+01:00
bind_serial = "4C5300012303"
bind_fs_uuid = "1234-ABCD"

[revoke]
bundle_ids = ["tank-0"]
serials = ["LOSTSTICK"]
signers = ["{'a' * 40}"]
"""


def test_valid_manifest_parses_into_frozen_entries() -> None:
    manifest = parse_manifest(VALID.encode())
    (entry,) = manifest.keys
    assert entry == KeyEntry(
        volume="tank", bundle_id="tank-1", secrets=(KeyFile("tank.key", DIGEST),), generation=3,
        not_before=datetime(2026, 1, 1, tzinfo=UTC),
        not_after=datetime(2026, 12, 31, 23, tzinfo=UTC),
        volume_uuid="0c5c6d83-311e-495d-8b14-84576dd84ca9", bind_serial="4C5300012303",
        bind_fs_uuid="1234-ABCD")
    assert manifest.revocations == Revocations(frozenset({"tank-0"}), frozenset({"LOSTSTICK"}),
                                               frozenset({"A" * 40}))
    with pytest.raises(AttributeError):
        entry.generation = 4  # type: ignore[misc]


def edit(old: str, new: str) -> bytes:
    assert old in VALID
    return VALID.replace(old, new).encode()


@pytest.mark.parametrize(("data", "reason", "names"), [
    (b"\xff\xfeformat = 1", Reason.MALFORMED_MANIFEST, "UTF-8"),
    (b"format = \n", Reason.MALFORMED_MANIFEST, "TOML"),
    (b"[" * 5000, Reason.MALFORMED_MANIFEST, "TOML"),
    (edit("format = 1", "format = 3"), Reason.UNSUPPORTED_FORMAT, "version 3"),
    (edit("format = 1", "format = 2"), Reason.MALFORMED_MANIFEST, "not a key-entry field of "
     "format 2"),
    (edit("format = 1", 'format = "1"'), Reason.MALFORMED_MANIFEST, "format"),
    (edit("format = 1\n", ""), Reason.MALFORMED_MANIFEST, "format"),
    (edit("created", "createdd"), Reason.MALFORMED_MANIFEST, "createdd"),
    (edit("bind_serial", "bind_serail"), Reason.MALFORMED_MANIFEST, "bind_serail"),
    (edit('volume = "tank"\n', ""), Reason.MALFORMED_MANIFEST, "volume"),
    (edit('"tank"', '"../tank"'), Reason.MALFORMED_MANIFEST, "volume"),
    (edit('"tank.key"', '"../etc/passwd"'), Reason.MALFORMED_MANIFEST, "file"),
    (edit('"tank.key"', '"manifest.sig"'), Reason.MALFORMED_MANIFEST, "reserved"),
    (edit(DIGEST, "ab" * 31), Reason.MALFORMED_MANIFEST, "sha256"),
    (edit("generation = 3", "generation = 0"), Reason.MALFORMED_MANIFEST, "generation"),
    (edit("generation = 3", "generation = true"), Reason.MALFORMED_MANIFEST, "generation"),
    (edit("encrypted = false", 'encrypted = "no"'), Reason.MALFORMED_MANIFEST, "encrypted"),
    (edit("2026-01-01T00:00:00Z", "2026-01-01T00:00:00"), Reason.MALFORMED_MANIFEST,
     "not_before"),
    (edit("2026-01-01T00:00:00Z", "2026-01-01"), Reason.MALFORMED_MANIFEST, "not_before"),
    (edit("2027-01-01T00:00:00+01:00", "2025-01-01T00:00:00Z"), Reason.MALFORMED_MANIFEST,
     "not_after"),
    (edit('bind_serial = "4C5300012303"\nbind_fs_uuid = "1234-ABCD"\n', ""),
     Reason.MALFORMED_MANIFEST, "binds to no stick"),
    (edit('signers = ["' + "a" * 40, 'signers = ["abc'), Reason.MALFORMED_MANIFEST, "signers"),
    (edit("[[key]]", "[key]"), Reason.MALFORMED_MANIFEST, "key"),
    (b"format = 1\n", Reason.MALFORMED_MANIFEST, "key"),
    (VALID.encode() + VALID.split("\n\n")[1].encode(), Reason.MALFORMED_MANIFEST, "more than once"),
    (VALID.encode() + b"#" * 70000, Reason.TOO_LARGE, "larger"),
])
def test_invalid_manifest_is_refused_with_reason_and_location(data: bytes, reason: Reason,
                                                              names: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data)
    assert caught.value.reason is reason
    assert names in str(caught.value)


def test_non_table_input_is_refused() -> None:
    with pytest.raises(ManifestError):
        manifest_from_table(["format", 1])


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
TOKENS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,20}", fullmatch=True)
TIMES = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                     timezones=st.just(UTC)).map(lambda moment: moment.replace(microsecond=0))


@st.composite
def entries(draw: st.DrawFn, index: int) -> KeyEntry:
    start = draw(TIMES)
    serial = draw(st.one_of(st.none(), TOKENS))
    return KeyEntry(
        volume=f"{draw(NAMES)}{index}", bundle_id=f"{draw(TOKENS)}-{index}",
        secrets=draw(secrets(index)),
        generation=draw(st.integers(1, 2**63 - 1)), not_before=start,
        not_after=draw(st.one_of(st.none(), st.integers(1, 10**9).map(
            lambda s: start + timedelta(seconds=s)))),
        volume_uuid=draw(st.one_of(st.none(), st.uuids().map(str))),
        bind_serial=serial,
        bind_fs_uuid=draw(st.from_regex(r"[0-9A-F]{4}-[0-9A-F]{4}", fullmatch=True))
        if serial is None else None,
        share=draw(st.one_of(st.none(), shares(index))))


@st.composite
def shares(draw: st.DrawFn, index: int) -> ShareFile:
    """A k-of-n share (its entry then needs format 2)."""
    count = draw(st.integers(2, 16))
    return ShareFile(draw(TOKENS), draw(st.integers(1, count)), draw(st.integers(2, count)),
                     count, KeyFile(f"s{index}.share",
                                    draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
                                    draw(st.booleans())))


@st.composite
def secrets(draw: st.DrawFn, index: int) -> tuple[KeyFile, ...]:
    """One unnamed secret (format 1), or up to four named ones (format 2)."""
    named = draw(st.lists(NAMES, max_size=4, unique=True))
    names: list[str | None] = list(named) or [None]
    return tuple(KeyFile(f"f{index}-{position}{draw(NAMES)}",
                         draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
                         draw(st.booleans()), name) for position, name in enumerate(names))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    count = draw(st.integers(1, 4))
    keys = tuple(draw(entries(index)) for index in range(count))
    revoked = Revocations(frozenset(draw(st.lists(TOKENS, max_size=3))),
                          frozenset(draw(st.lists(TOKENS, max_size=3))),
                          frozenset(draw(st.lists(st.from_regex(r"[0-9A-F]{40}", fullmatch=True),
                                                  max_size=2))))
    return Manifest(keys, revoked, draw(st.one_of(st.none(), TIMES)))


@given(manifests())
def test_rendered_manifest_parses_back_to_the_same_value(manifest: Manifest) -> None:
    assert parse_manifest(render_manifest(manifest)) == manifest


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        parse_manifest(data)
    except ManifestError as exc:
        assert isinstance(exc.reason, Reason)


@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.text(max_size=8)), max_size=6))
def test_mutated_manifests_parse_or_raise_typed_errors(edits: list[tuple[int, str]]) -> None:
    text = VALID
    for position, insert in edits:
        text = text[:position] + insert + text[position + 1:]
    try:
        parse_manifest(text.encode("utf-8", "surrogatepass"))
    except ManifestError as exc:
        assert isinstance(exc.reason, Reason)


TOML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
              st.datetimes(), st.datetimes(timezones=st.just(timezone(timedelta(hours=2))))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["format", "key", "revoke", "volume", "file", "sha256", "generation",
                         "not_before", "bind_serial", "bundle_ids", "signers", "x"]),
        inner, max_size=5),
    max_leaves=20)


@given(st.dictionaries(st.sampled_from(["format", "key", "revoke", "created"]), TOML_VALUES))
def test_arbitrary_tables_never_crash_validation(table: dict[str, object]) -> None:
    try:
        manifest_from_table(table)
    except ManifestError as exc:
        assert isinstance(exc.reason, Reason)


NAMED = f"""format = 2

[[key]]
volume = "secret"
bundle_id = "secret-1"
generation = 1
not_before = 2026-01-01T00:00:00Z
bind_serial = "4C5300012303"

[[key.secret]]
name = "k1"
file = "secret.k1.key"
sha256 = "{DIGEST}"

[[key.secret]]
name = "k2"
file = "secret.k2.key"
sha256 = "{"cd" * 32}"
encrypted = true
"""


def test_format_2_gives_each_key_name_its_own_file() -> None:
    manifest = parse_manifest(NAMED.encode())
    (entry,) = manifest.keys
    assert entry.secrets == (KeyFile("secret.k1.key", DIGEST, False, "k1"),
                             KeyFile("secret.k2.key", "cd" * 32, True, "k2"))
    assert manifest.format == 2 and render_manifest(manifest).startswith(b"format = 2\n")
    assert parse_manifest(render_manifest(manifest)) == manifest


def test_a_format_2_bundle_that_fits_format_1_is_written_as_format_1() -> None:
    unnamed = NAMED.split("[[key.secret]]\nname")[0] + \
        f'[[key.secret]]\nfile = "secret.key"\nsha256 = "{DIGEST}"\n'
    manifest = parse_manifest(unnamed.encode())
    assert manifest.keys[0].secrets == (KeyFile("secret.key", DIGEST),)
    assert render_manifest(manifest).startswith(b"format = 1\n")


@pytest.mark.parametrize(("old", "new", "words"), [
    ('name = "k2"', 'name = "k1"', "name 'k1' appears more than once"),
    ('file = "secret.k2.key"', 'file = "secret.k1.key"', "file 'secret.k1.key' appears"),
    ('name = "k2"\n', "", None),  # one unnamed secret beside a named one: allowed
    ('name = "k1"\n', 'name = "k1"\nkind = "pem"\n', "must be one of key, keyfile"),
    (NAMED[NAMED.index("[[key.secret]]"):], "", "needs at least one [[key.secret]] table"),
    ('bind_serial = "4C5300012303"', 'bind_serial = "4C5300012303"\nfile = "x.key"',
     "is not a key-entry field of format 2"),
])
def test_format_2_secrets_are_checked_strictly(old: str, new: str, words: str | None) -> None:
    data = NAMED.replace(old, new, 1).encode()
    if words is None:
        assert parse_manifest(data).keys[0].secrets[1].name is None
        return
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data)
    assert caught.value.reason is Reason.MALFORMED_MANIFEST and words in str(caught.value)


SHARE_TABLE = f"""[key.share]
set = "set-1"
index = 2
threshold = 2
count = 3
file = "secret.share"
sha256 = "{DIGEST}"

"""
SHARE = NAMED.replace("[[key.secret]]", SHARE_TABLE + "[[key.secret]]", 1)


def test_a_share_entry_names_its_split_and_its_file() -> None:
    manifest = parse_manifest(SHARE.encode())
    share = manifest.keys[0].share
    assert share == ShareFile("set-1", 2, 2, 3, KeyFile("secret.share", DIGEST))
    assert manifest.keys[0].files[-1] == share.file
    assert parse_manifest(render_manifest(manifest)) == manifest


@pytest.mark.parametrize(("old", "new", "words"), [
    ("threshold = 2", "threshold = 1", "needs 2 <= threshold <= count"),
    ("index = 2", "index = 4", "index <= count"),
    ("count = 3", "count = 17", "from 1 to 16"),
    ('set = "set-1"', 'set = "set 1"', "not a valid id"),
    ('set = "set-1"', 'set = "set-1"\nname = "k9"', "not a share field"),
])
def test_share_tables_are_checked_strictly(old: str, new: str, words: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(SHARE.replace(old, new, 1).encode())
    assert words in str(caught.value)
