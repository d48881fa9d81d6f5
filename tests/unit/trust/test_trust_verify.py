"""Full verification with real gpg: one test per way a stick must be accepted or refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from keyd.trust.errors import Reason
from keyd.trust.gpg import GnuPG
from keyd.trust.manifest import KeyFile
from keyd.trust.report import StickReport
from keyd.trust.revocation import Revocations
from keyd.trust.settings import Limits, TrustSettings
from keyd.trust.verify import (
    StickIdentity,
    TrustState,
    Verifier,
    commit,
    load_state,
    verify_directory,
)

if TYPE_CHECKING:  # the fixtures' types; conftest is not imported at run time
    from tests.unit.trust.conftest import StickDir

KEY = b"\x00\x01secret key bytes\xff" * 4


def sha(data: bytes) -> str:
    """The manifest's sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def verify(stick: StickDir, *, signers: tuple[str, ...] | None = None,
           state: TrustState | None = None, identity: StickIdentity | None = None,
           limits: Limits | None = None) -> StickReport:
    """Read and verify the stick as the daemon would."""
    world = stick.world
    gpg = GnuPG(str(world.keyd))
    verifier = Verifier(gpg, signers or (world.good,), decryptor=gpg, clock=lambda: stick.now)
    return verify_directory(stick.root, verifier,
                            identity or StickIdentity(stick.serial, stick.fs_uuid),
                            state or TrustState(), limits)


def only_reason(report: StickReport) -> Reason | None:
    """The reason of the single key, or the stick-wide reason."""
    if report.reason is not None:
        assert not report.accepted
        return report.reason
    assert len(report.verdicts) == 1
    return report.verdicts[0].reason


def test_valid_bundle_is_accepted_and_hands_out_the_key(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    with verify(stick) as report:
        assert report.reason is None
        assert report.signer == stick.world.good
        (verdict,) = report.accepted
        assert verdict.entry.volume == "tank"
        assert verdict.keys is not None
        key = verdict.keys.get("any key name")
        assert key is not None and bytes(key.buffer) == KEY
    assert len(key) == 0  # wiped when the report's with-block ended


def test_three_volume_bundle_accepts_each_volume(stick: StickDir) -> None:
    stick.write({"tank": KEY, "media": KEY[::-1], "backup": b"b" * 32})
    with verify(stick) as report:
        assert sorted(v.entry.volume for v in report.accepted) == ["backup", "media", "tank"]


def test_tampered_key_file_is_hash_mismatch(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    (stick.keyd / "tank.key").write_bytes(KEY + b"x")
    assert only_reason(verify(stick)) is Reason.HASH_MISMATCH


def test_one_bad_key_does_not_refuse_the_others(stick: StickDir) -> None:
    stick.write({"tank": KEY, "media": KEY[::-1]})
    (stick.keyd / "media.key").write_bytes(b"swapped")
    report = verify(stick)
    reasons = {v.entry.volume: v.reason for v in report.verdicts}
    assert reasons == {"tank": None, "media": Reason.HASH_MISMATCH}


def test_tampered_manifest_is_bad_signature(stick: StickDir) -> None:
    manifest = stick.write({"tank": KEY})
    (stick.keyd / "manifest").write_bytes(manifest.replace(b"generation = 1", b"generation = 9"))
    assert only_reason(verify(stick)) is Reason.BAD_SIGNATURE


def test_signature_by_unpinned_key_is_unknown_signer(stick: StickDir) -> None:
    stick.write({"tank": KEY}, signer=stick.world.other)
    assert only_reason(verify(stick)) is Reason.UNKNOWN_SIGNER


def test_signature_by_key_missing_from_keyd_home_is_no_pubkey(stick: StickDir) -> None:
    stick.write({"tank": KEY}, signer=stick.world.stranger)
    assert only_reason(verify(stick, signers=(stick.world.good, stick.world.stranger))) \
        is Reason.NO_PUBKEY


def test_expired_signer_is_refused_even_though_gpg_exits_zero(stick: StickDir) -> None:
    world = stick.world
    stick.write({"tank": KEY}, signer=world.expired, faked_time="20200101T060000")
    assert only_reason(verify(stick, signers=(world.good, world.expired))) \
        is Reason.EXPIRED_SIGNER


def test_revoked_signer_is_refused(stick: StickDir) -> None:
    world = stick.world
    stick.write({"tank": KEY}, signer=world.revoked)
    assert only_reason(verify(stick, signers=(world.good, world.revoked))) \
        is Reason.REVOKED_SIGNER


def test_signer_on_local_revocation_list_is_refused(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    state = TrustState(revocations=Revocations(signers=frozenset({stick.world.good})))
    assert only_reason(verify(stick, state=state)) is Reason.REVOKED_SIGNER


def test_garbage_signature_is_bad_signature(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    (stick.keyd / "manifest.sig").write_bytes(b"not an OpenPGP signature")
    assert only_reason(verify(stick)) is Reason.BAD_SIGNATURE


def test_bundle_past_not_after_is_expired(stick: StickDir) -> None:
    entry = stick.entry("tank", KEY, not_after=datetime(2026, 5, 1, tzinfo=UTC))
    stick.write({"tank": KEY}, [entry])
    assert only_reason(verify(stick)) is Reason.EXPIRED_BUNDLE


def test_bundle_before_not_before_is_not_yet_valid(stick: StickDir) -> None:
    entry = stick.entry("tank", KEY, not_before=datetime(2026, 7, 1, tzinfo=UTC))
    stick.write({"tank": KEY}, [entry])
    assert only_reason(verify(stick)) is Reason.NOT_YET_VALID


def test_bundle_copied_to_stick_with_other_serial_is_wrong_stick(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    other = StickIdentity("OTHERSERIAL", stick.fs_uuid)
    assert only_reason(verify(stick, identity=other)) is Reason.WRONG_STICK


def test_filesystem_uuid_binding_ignores_case(stick: StickDir) -> None:
    entry = stick.entry("tank", KEY, bind_serial=None, bind_fs_uuid="1234-abcd")
    stick.write({"tank": KEY}, [entry])
    assert only_reason(verify(stick, identity=StickIdentity(None, "1234-ABCD"))) is None
    assert only_reason(verify(stick, identity=StickIdentity(None, "9999-ABCD"))) \
        is Reason.WRONG_STICK


def test_older_generation_replayed_is_refused_and_equal_is_accepted(stick: StickDir) -> None:
    stick.write({"tank": KEY}, [stick.entry("tank", KEY, generation=4)])
    assert only_reason(verify(stick, state=TrustState({"tank": 5}))) \
        is Reason.REPLAYED_GENERATION
    assert only_reason(verify(stick, state=TrustState({"tank": 4}))) is None


def test_revoked_bundle_id_is_refused(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    state = TrustState(revocations=Revocations(bundle_ids=frozenset({"bundle-tank"})))
    assert only_reason(verify(stick, state=state)) is Reason.REVOKED_BUNDLE


def test_revoked_stick_serial_is_refused(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    state = TrustState(revocations=Revocations(serials=frozenset({stick.serial})))
    assert only_reason(verify(stick, state=state)) is Reason.REVOKED_STICK


def test_revocations_learned_from_newer_manifest_refuse_the_old_stick(
        stick: StickDir, tmp_path: Path) -> None:
    settings = TrustSettings((stick.world.good,), revocations_file=str(tmp_path / "none.toml"),
                             state_dir=str(tmp_path / "state"))
    old = stick.entry("tank", KEY, bundle_id="old-tank")
    stick.write({"tank": KEY}, [old])
    old_files = {p.name: p.read_bytes() for p in stick.keyd.iterdir()}
    new = stick.entry("tank", KEY, bundle_id="new-tank", generation=2)
    stick.write({"tank": KEY}, [new], revocations=Revocations(bundle_ids=frozenset({"old-tank"})))
    commit(verify(stick, state=load_state(settings)), settings)
    for name, data in old_files.items():
        (stick.keyd / name).write_bytes(data)
    state = load_state(settings)
    assert state.generations == {"tank": 2}
    assert only_reason(verify(stick, state=state)) is Reason.REVOKED_BUNDLE


def test_symlinked_key_file_is_unsafe(stick: StickDir, tmp_path: Path) -> None:
    outside = tmp_path / "outside.key"
    outside.write_bytes(KEY)
    stick.write({}, [stick.entry("tank", KEY)])
    (stick.keyd / "tank.key").symlink_to(outside)
    assert only_reason(verify(stick)) is Reason.UNSAFE_FILE


def test_fifo_key_file_is_unsafe_and_does_not_hang(stick: StickDir) -> None:
    stick.write({}, [stick.entry("tank", KEY)])
    os.mkfifo(stick.keyd / "tank.key")
    assert only_reason(verify(stick)) is Reason.UNSAFE_FILE


def test_device_key_file_is_unsafe(stick: StickDir) -> None:
    stick.write({}, [stick.entry("tank", KEY)])
    try:
        os.mknod(stick.keyd / "tank.key", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    assert only_reason(verify(stick)) is Reason.UNSAFE_FILE


def test_oversized_key_file_is_too_large(stick: StickDir) -> None:
    big = b"k" * 2048
    stick.write({"tank": big})
    assert only_reason(verify(stick, limits=Limits(key_bytes=1024))) is Reason.TOO_LARGE


def test_oversized_manifest_is_too_large(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    assert only_reason(verify(stick, limits=Limits(manifest_bytes=64))) is Reason.TOO_LARGE


def test_too_many_files_refuses_the_stick(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    for index in range(5):
        (stick.keyd / f"junk{index}").write_bytes(b"")
    assert only_reason(verify(stick, limits=Limits(files=4))) is Reason.TOO_MANY_FILES


def test_total_size_cap_refuses_the_stick(stick: StickDir) -> None:
    stick.write({"a": b"a" * 600, "b": b"b" * 600})
    assert only_reason(verify(stick, limits=Limits(total_bytes=1500))) is Reason.TOO_LARGE


@pytest.mark.parametrize("manifest", [b"format = 1\n\xff\xfe not utf-8\n", b"format = = 1\n[[key",
                                      b'{"format": 1, "key": []}'])
def test_signed_but_malformed_manifest_is_refused(stick: StickDir, manifest: bytes) -> None:
    stick.write({"tank": KEY}, manifest=manifest)
    assert only_reason(verify(stick)) is Reason.MALFORMED_MANIFEST


def test_empty_stick_has_no_bundle(stick: StickDir) -> None:
    assert only_reason(verify(stick)) is Reason.NO_BUNDLE


def test_manifest_without_signature_is_refused(stick: StickDir) -> None:
    stick.write({"tank": KEY})
    (stick.keyd / "manifest.sig").unlink()
    assert only_reason(verify(stick)) is Reason.NO_SIGNATURE


def test_encrypted_key_file_is_decrypted_in_memory(stick: StickDir) -> None:
    world = stick.world
    ciphertext = GnuPG(str(world.admin)).encrypt(KEY, world.host)
    (stick.keyd).mkdir()
    (stick.keyd / "tank.key.gpg").write_bytes(ciphertext)
    entry = stick.entry("tank", ciphertext, secrets=(KeyFile("tank.key.gpg", sha(ciphertext), True),))
    stick.write({}, [entry])
    with verify(stick) as report:
        (verdict,) = report.accepted
        key = verdict.keys.get("tank") if verdict.keys else None
        assert key is not None and bytes(key.buffer) == KEY
    assert KEY not in (stick.keyd / "tank.key.gpg").read_bytes()


def test_key_encrypted_to_another_key_fails_to_decrypt(stick: StickDir) -> None:
    world = stick.world
    ciphertext = GnuPG(str(world.admin)).encrypt(KEY, world.stranger)
    stick.keyd.mkdir()
    (stick.keyd / "tank.key.gpg").write_bytes(ciphertext)
    stick.write({}, [stick.entry("tank", ciphertext,
                                 secrets=(KeyFile("tank.key.gpg", sha(ciphertext), True),))])
    assert only_reason(verify(stick)) is Reason.DECRYPT_FAILED


def test_bundle_written_by_hand_as_documented_is_accepted(stick: StickDir) -> None:
    """docs/bundle-format.md: sha256sum, a TOML file, gpg --detach-sign."""
    world = stick.world
    stick.keyd.mkdir()
    (stick.keyd / "tank.key").write_bytes(KEY)
    digest = hashlib.sha256(KEY).hexdigest()
    (stick.keyd / "manifest").write_text(
        "format = 1\n\n[[key]]\nvolume = \"tank\"\nbundle_id = \"tank-2026-1\"\n"
        f"file = \"tank.key\"\nsha256 = \"{digest}\"\ngeneration = 1\n"
        "not_before = 2026-01-01T00:00:00Z\nnot_after = 2027-01-01T00:00:00Z\n"
        f"bind_serial = \"{stick.serial}\"\n")
    subprocess.run(["gpg", "--homedir", str(world.admin), "--batch", "--local-user", world.good,
                    "--detach-sign", "--output", str(stick.keyd / "manifest.sig"),
                    str(stick.keyd / "manifest")], check=True, capture_output=True)
    assert only_reason(verify(stick)) is None


@pytest.mark.parametrize("mode", ["--sign", "--clearsign"])
def test_non_detached_signature_of_other_data_is_refused(stick: StickDir, mode: str) -> None:
    """A message the signer signed elsewhere must not vouch for a forged manifest."""
    world = stick.world
    stick.write({"tank": KEY})
    signed = subprocess.run(["gpg", "--homedir", str(world.admin), "--batch", "--local-user",
                             world.good, mode, "--output", "-"],
                            input=(stick.keyd / "manifest").read_bytes(), check=True,
                            capture_output=True).stdout
    (stick.keyd / "manifest.sig").write_bytes(signed)
    assert only_reason(verify(stick)) is Reason.BAD_SIGNATURE


def named_bundle(stick: StickDir, secrets: dict[str, bytes]) -> None:
    """A format 2 bundle for volume secret with one key file per key name."""
    stick.keyd.mkdir(parents=True, exist_ok=True)
    for name, data in secrets.items():
        (stick.keyd / f"secret.{name}.key").write_bytes(data)
    files = tuple(KeyFile(f"secret.{name}.key", sha(data), name=name)
                  for name, data in secrets.items())
    stick.write({}, [stick.entry("secret", b"", secrets=files)])


def test_a_format_2_bundle_hands_out_a_key_per_name(stick: StickDir) -> None:
    named_bundle(stick, {"k1": b"first passphrase", "k2": b"second passphrase"})
    assert (stick.keyd / "manifest").read_bytes().startswith(b"format = 2\n")
    with verify(stick) as report:
        (verdict,) = report.accepted
        assert verdict.keys is not None and verdict.keys.names == {"k1", "k2"}
        got = {name: bytes(s.buffer) for name in ("k1", "k2", "k3")
               if (s := verdict.keys.get(name)) is not None}
        assert got == {"k1": b"first passphrase", "k2": b"second passphrase"}
        assert "keys k1, k2" in verdict.message


def test_one_bad_file_refuses_the_whole_bundle(stick: StickDir) -> None:
    named_bundle(stick, {"k1": b"first passphrase", "k2": b"second passphrase"})
    (stick.keyd / "secret.k2.key").write_bytes(b"tampered")
    with verify(stick) as report:
        assert only_reason(report) is Reason.HASH_MISMATCH and not report.accepted
    (stick.keyd / "secret.k2.key").unlink()
    with verify(stick) as report:
        assert only_reason(report) is Reason.MISSING_KEY_FILE
