"""keyd fails closed when it could not record what using a stick's keys teaches."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyd.trust.errors import Reason, TrustStateError
from keyd.trust.generations import GenerationStore
from keyd.trust.manifest import Manifest
from keyd.trust.revocation import (
    MAX_FILE_ENTRIES,
    Revocations,
    load_revocations,
    save_revocations,
)
from keyd.trust.settings import TrustSettings
from keyd.trust.verify import LEARNED_REVOCATIONS, commit, recordable
from tests.support.daemon_fakes import accepted, rejected


def settings(state_dir: Path) -> TrustSettings:
    return TrustSettings(signers=("A" * 40,), state_dir=str(state_dir))


def test_keys_are_refused_and_wiped_when_no_generation_could_be_recorded(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the state directory should be")
    report = accepted("tank")
    keys = report.verdicts[0].keys
    refusal = recordable(report, settings(tmp_path / "not-a-dir" / "keyd"))
    assert refusal.reason is Reason.STATE_ERROR and refusal.accepted == ()
    assert f"cannot record accepted generations in {tmp_path}/not-a-dir/keyd" in refusal.message
    assert "fix: make" in refusal.message
    assert keys is not None and all(len(secret) == 0 for _, secret in keys.items())


def test_a_writable_state_directory_lets_the_report_through_and_leaves_nothing(
        tmp_path: Path) -> None:
    report = accepted("tank")
    assert recordable(report, settings(tmp_path / "state")) is report
    assert list((tmp_path / "state").iterdir()) == []
    refusal = rejected()
    assert recordable(refusal, settings(tmp_path / "not" / "used")) is refusal
    assert not (tmp_path / "not").exists()


def test_the_generation_is_recorded_even_when_revocations_cannot_grow(tmp_path: Path) -> None:
    state = tmp_path / "state"
    full = Revocations(frozenset(f"old-{n}" for n in range(MAX_FILE_ENTRIES)))
    save_revocations(state / LEARNED_REVOCATIONS, full)
    report = accepted("tank")
    report.manifest = Manifest(report.manifest.keys if report.manifest else (),
                               Revocations(frozenset({"one-more"})))
    with pytest.raises(TrustStateError, match="more than keyd reads"):
        commit(report, settings(state))
    assert GenerationStore(state).last("tank") == 3
    assert load_revocations(state / LEARNED_REVOCATIONS) == full
