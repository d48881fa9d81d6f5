"""Revocation lists and the generation store: parsing, atomic persistence, refusal of bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyd.trust.errors import ManifestError, Reason, TrustStateError
from keyd.trust.generations import GenerationStore
from keyd.trust.revocation import (
    MAX_FILE_ENTRIES,
    Revocations,
    load_revocations,
    near_cap,
    parse_revocations,
    render_revocations,
    save_revocations,
)

FPR = "9EFDB299F0E04041D7EEEB40EDE7A9F809657101"


def test_missing_revocation_file_revokes_nothing(tmp_path: Path) -> None:
    assert load_revocations(tmp_path / "revoked.toml") == Revocations()
    assert not Revocations()


def test_learned_revocations_past_the_manifest_cap_still_load(tmp_path: Path) -> None:
    # A long-lived box learns more revocations than one manifest may carry: its own file
    # must not lock every stick out.
    many = Revocations(frozenset(f"bundle-{n}" for n in range(5000)))
    save_revocations(tmp_path / "learned.toml", many)
    assert load_revocations(tmp_path / "learned.toml") == many


def test_a_revocation_file_keyd_could_not_read_back_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "revoked.toml"
    save_revocations(path, Revocations(serials=frozenset({"LOST1"})))
    too_many = Revocations(frozenset(f"b-{n}" for n in range(MAX_FILE_ENTRIES + 1)))
    with pytest.raises(TrustStateError) as caught:
        save_revocations(path, too_many)
    assert f"would hold {MAX_FILE_ENTRIES + 1} bundle_ids" in caught.value.message
    assert caught.value.fix is not None and f"prune {path}" in caught.value.fix
    assert load_revocations(path) == Revocations(serials=frozenset({"LOST1"}))  # left as it was


def test_revocation_file_round_trips(tmp_path: Path) -> None:
    revoked = Revocations(frozenset({"tank-1"}), frozenset({"SERIAL_1"}), frozenset({FPR}))
    save_revocations(tmp_path / "etc" / "revoked.toml", revoked)
    assert load_revocations(tmp_path / "etc" / "revoked.toml") == revoked


def test_revoked_signers_are_normalized() -> None:
    text = f'signers = ["{FPR.lower()}"]\n'.encode()
    assert parse_revocations(text, "r.toml").signers == {FPR}


@pytest.mark.parametrize("text", [b"bundle_ids = 1", b'serials = ["has space"]',
                                  b'signers = ["ABCD"]', b"unknown = []", b"\xff", b"= ="])
def test_bad_revocation_file_is_refused_naming_it(text: bytes) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_revocations(text, "/etc/keyd/revoked.toml")
    assert caught.value.reason is Reason.MALFORMED_MANIFEST
    assert "/etc/keyd/revoked.toml" in str(caught.value)


def test_union_and_covers() -> None:
    one = Revocations(bundle_ids=frozenset({"a"}))
    two = Revocations(serials=frozenset({"s"}))
    both = one.union(two)
    assert both.covers(one) and both.covers(two) and not one.covers(two)


@given(st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,30}", fullmatch=True),
                max_size=5))
def test_rendered_revocations_parse_back(ids: list[str]) -> None:
    revoked = Revocations(bundle_ids=frozenset(ids), serials=frozenset(ids[:2]))
    assert parse_revocations(render_revocations(revoked), "r") == revoked


def test_generations_start_empty_and_only_move_up(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "state")
    assert store.last("tank") is None
    store.record({"tank": 3, "media": 1})
    store.record({"tank": 2})
    assert store.load() == {"tank": 3, "media": 1}
    assert (tmp_path / "state" / "generations.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["generations.json"]


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"volumes": {"tank": "3"}}', b"\xff"])
def test_corrupt_generation_store_is_an_error_not_a_reset(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "generations.json").write_bytes(content)
    with pytest.raises(TrustStateError) as caught:
        GenerationStore(tmp_path).load()
    assert caught.value.reason is Reason.STATE_ERROR
    assert "generations.json" in str(caught.value)


def test_generation_file_is_plain_json(tmp_path: Path) -> None:
    GenerationStore(tmp_path).record({"tank": 7})
    assert json.loads((tmp_path / "generations.json").read_text()) == {
        "format": 1, "volumes": {"tank": 7}}


@pytest.mark.parametrize("unsafe", ["file", "directory"])
def test_a_revocation_file_others_could_change_is_refused(tmp_path: Path, unsafe: str) -> None:
    path = tmp_path / "etc" / "revoked.toml"
    save_revocations(path, Revocations(serials=frozenset({"LOST1"})))
    target = path if unsafe == "file" else path.parent
    target.chmod(target.stat().st_mode | 0o020)  # group-writable
    with pytest.raises(TrustStateError) as caught:
        load_revocations(path)
    assert caught.value.reason is Reason.UNSAFE_REVOCATIONS
    assert str(target) in caught.value.message and f"chmod go-w {target}" in (caught.value.fix or "")


def test_a_revocation_file_at_nine_tenths_of_its_cap_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "learned.toml"
    fine = Revocations(frozenset(f"b-{n}" for n in range(MAX_FILE_ENTRIES * 9 // 10 - 1)))
    assert near_cap(path, fine) is None
    full = fine.union(Revocations(frozenset({"one-more"})))
    warning = near_cap(path, full)
    assert warning is not None and f"{path} holds {MAX_FILE_ENTRIES * 9 // 10} bundle_ids" in warning
