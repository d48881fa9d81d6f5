"""Enrollment's pure parts: generation numbering and merging a new entry into a manifest."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyd.trust.enroll import EnrollRequest, merge, new_entry, next_generation, readable
from keyd.trust.errors import TrustError
from keyd.trust.manifest import KeyEntry, KeyFile, Manifest, parse_manifest, render_manifest
from keyd.trust.revocation import Revocations

WHEN = datetime(2026, 11, 23, 13, 0, 0, 123456, tzinfo=UTC)
ENTRY = KeyEntry(volume="tank", bundle_id="tank-1", secrets=(KeyFile("tank.key", "0" * 64),),
                 generation=3, not_before=WHEN.replace(microsecond=0), bind_serial="S1")


def request(**changes: object) -> EnrollRequest:
    base = EnrollRequest(volume="tank", signing_key="F" * 40, output=Path("/stick"),
                         not_before=WHEN, bind_serial="S1")
    return replace(base, **changes)  # type: ignore[arg-type]


def test_next_generation_is_above_host_and_stick() -> None:
    manifest = Manifest((ENTRY,))
    assert next_generation(None, "tank", None) == 1
    assert next_generation(None, "tank", 5) == 6
    assert next_generation(manifest, "tank", 1) == 4
    assert next_generation(manifest, "media", None) == 1


def test_new_entry_hashes_what_is_stored_and_drops_microseconds() -> None:
    entry = new_entry(request(encrypt_to="A" * 40, bundle_id="b-1"), {None: b"abc"}, 2)
    assert entry.secrets == (KeyFile(
        "tank.key.gpg", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", True),)
    assert entry.not_before.microsecond == 0 and entry.generation == 2
    assert parse_manifest(render_manifest(Manifest((entry,)))).keys == (entry,)


def test_random_bundle_ids_differ() -> None:
    assert new_entry(request(), {None: b"k"}, 1).bundle_id != \
        new_entry(request(), {None: b"k"}, 1).bundle_id


def test_merge_replaces_the_volume_and_revokes_its_old_bundle() -> None:
    media = replace(ENTRY, volume="media", bundle_id="media-1",
                    secrets=(KeyFile("media.key", "0" * 64),))
    newer = replace(ENTRY, bundle_id="tank-2", generation=4)
    merged = merge(Manifest((ENTRY, media), Revocations(serials=frozenset({"LOST"}))), newer, WHEN)
    assert merged.keys == (media, newer)
    assert merged.revocations == Revocations(bundle_ids=frozenset({"tank-1"}),
                                             serials=frozenset({"LOST"}))
    assert merged.created == WHEN.replace(microsecond=0)


def test_merge_into_nothing_starts_a_manifest() -> None:
    assert merge(None, ENTRY, WHEN) == Manifest((ENTRY,), Revocations(),
                                                WHEN.replace(microsecond=0))


def test_a_manifest_keyd_would_refuse_is_never_written(tmp_path: Path) -> None:
    carried = Revocations(frozenset(f"retired-bundle-{n:06d}" for n in range(3000)))
    manifest = Manifest((ENTRY,), carried, datetime(2026, 12, 3, tzinfo=UTC))
    with pytest.raises(TrustError, match="would be refused by keyd") as caught:
        readable(tmp_path, render_manifest(manifest))
    assert "move" in str(caught.value.fix) and "away" in str(caught.value.fix)
    readable(tmp_path, render_manifest(replace(manifest, revocations=Revocations())))
