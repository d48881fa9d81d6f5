"""keydctl enroll / verify / revoke end to end, with real gpg in a throwaway home."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyd.cli.enroll_command import enroll_main
from keyd.cli.main import build_parser, main
from keyd.cli.trust_args import parse_date
from keyd.errors import ProgramError
from keyd.runner import SubprocessRunner
from keyd_lab import gpg_scratch
from tests import configs

SERIAL = "USBSERIAL0001"


@dataclass(frozen=True)
class Keys:
    """One GnuPG home with a signing key and a host (encryption) key, as keyd's home."""

    home: Path
    signer: str
    host: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    """Fast keys, made once for this module; the agent is stopped afterwards."""
    runner = SubprocessRunner()
    home = gpg_scratch.make_home(tmp_path_factory.mktemp("cli-gpg") / "home")
    signer = gpg_scratch.new_key(runner, home, "Admin <admin@keyd.test>")
    host = gpg_scratch.new_key(runner, home, "Host <host@keyd.test>", usage="cert")
    gpg_scratch.add_encryption_subkey(runner, home, host)
    try:
        yield Keys(home, signer, host)
    finally:
        gpg_scratch.stop_agent(runner, home)


@dataclass
class Cli:
    """keydctl with scratch state, revocation list and config, as a non-root user would run it."""

    keys: Keys
    tmp: Path

    @property
    def stick(self) -> Path:
        return self.tmp / "stick"

    def common(self) -> list[str]:
        return ["--config", str(self.tmp / "keyd.toml"), "--state-dir", str(self.tmp / "state"),
                "--revocations", str(self.tmp / "revoked.toml")]

    def enroll(self, volume: str, *extra: str) -> int:
        return main(["enroll", *self.common(), "--volume", volume, "--signing-key",
                     self.keys.signer, "--output", str(self.stick), "--bind-serial", SERIAL,
                     *extra])

    def verify(self, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        code = main(["verify", *self.common(), str(self.stick), "--json", *extra])
        return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def cli(keys: Keys, tmp_path: Path) -> Cli:
    """A config whose [trust] table pins the signer and names the home."""
    (tmp_path / "keyd.toml").write_text(configs.trust_header([keys.signer], gnupghome=keys.home))
    return Cli(keys, tmp_path)


def reasons(document: dict[str, Any]) -> dict[str, str | None]:
    return {v["volume"]: v["reason"] for v in document["volumes"]}


def test_enroll_then_verify_accepts_three_volumes(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    for volume in ("tank", "media", "backup"):
        assert cli.enroll(volume, "--generate", "32") == 0
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 0
    assert reasons(document) == {"tank": None, "media": None, "backup": None}
    assert document["signer"] == cli.keys.signer
    assert len((cli.stick / "keyd" / "tank.key").read_bytes()) == 32


def test_verify_human_output_names_each_volume(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    capsys.readouterr()
    code = main(["verify", *cli.common(), str(cli.stick), "--serial", SERIAL])
    out = capsys.readouterr().out
    assert code == 0 and "tank: ACCEPTED" in out and cli.keys.signer in out


def test_verify_on_another_stick_exits_6_with_wrong_stick(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    code, document = cli.verify("--serial", "SOMEOTHERSTICK", capsys=capsys)
    assert code == 6
    assert reasons(document) == {"tank": "WRONG_STICK"}


def test_encrypted_enrollment_verifies_with_the_host_key(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank", "--encrypt-to", cli.keys.host)
    assert (cli.stick / "keyd" / "tank.key.gpg").exists()
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 0 and reasons(document) == {"tank": None}


def test_revoked_bundle_id_is_refused_by_verify(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank", "--bundle-id", "tank-2026")
    assert main(["revoke", *cli.common(), "tank-2026"]) == 0
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 6 and reasons(document) == {"tank": "REVOKED_BUNDLE"}


def test_revoked_serial_and_signer_refuse_the_stick(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    assert main(["revoke", *cli.common(), "--serial", SERIAL]) == 0
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 6 and document["reason"] == "REVOKED_STICK"
    (cli.tmp / "revoked.toml").unlink()
    assert main(["revoke", *cli.common(), "--signer", cli.keys.signer.lower()]) == 0
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 6 and document["reason"] == "REVOKED_SIGNER"


def test_re_enrolling_raises_the_generation_and_old_copy_is_replayed(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    old = cli.tmp / "old-copy"
    shutil.copytree(cli.stick, old)
    assert cli.verify("--serial", SERIAL, "--record", capsys=capsys)[0] == 0
    cli.enroll("tank")
    code, document = cli.verify("--serial", SERIAL, "--record", capsys=capsys)
    assert code == 0 and document["volumes"][0]["generation"] == 2
    shutil.rmtree(cli.stick)
    shutil.copytree(old, cli.stick)
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    # The old bundle id was revoked by the newer manifest, and its generation is older.
    assert code == 6 and reasons(document)["tank"] in ("REVOKED_BUNDLE", "REPLAYED_GENERATION")


def test_enroll_refuses_to_re_sign_a_tampered_manifest(cli: Cli) -> None:
    cli.enroll("tank")
    manifest = cli.stick / "keyd" / "manifest"
    manifest.write_bytes(manifest.read_bytes().replace(b"generation = 1", b"generation = 7"))
    assert cli.enroll("media") == 6
    assert b"generation = 7" in manifest.read_bytes()


def test_enroll_without_stick_binding_is_refused(cli: Cli) -> None:
    code = main(["enroll", *cli.common(), "--volume", "tank", "--signing-key", cli.keys.signer,
                 "--output", str(cli.stick)])
    assert code == 1
    assert not cli.stick.exists()


def test_verify_without_pinned_signers_is_a_config_error(cli: Cli) -> None:
    (cli.tmp / "keyd.toml").write_text(configs.trust_header(gnupghome=cli.keys.home))
    assert main(["verify", *cli.common(), str(cli.stick)]) == 3


def test_signer_flag_works_without_a_config_file(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    (cli.tmp / "keyd.toml").unlink()
    code = main(["verify", "--state-dir", str(cli.tmp / "state"), "--revocations",
                 str(cli.tmp / "r.toml"), "--gnupghome", str(cli.keys.home), "--signer",
                 cli.keys.signer, str(cli.stick), "--serial", SERIAL])
    assert code == 0
    assert main(["verify", "--config", str(cli.tmp / "missing.toml"), str(cli.stick)]) == 3


def test_empty_directory_is_refused_with_no_bundle(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.stick.mkdir()
    code, document = cli.verify(capsys=capsys)
    assert code == 6 and document["reason"] == "NO_BUNDLE"


@pytest.mark.parametrize(("text", "iso"), [
    ("2027-01-31", "2027-01-31T00:00:00+00:00"),
    ("2027-01-31T12:00:00+01:00", "2027-01-31T12:00:00+01:00"),
    ("2027-01-31T12:00:00", "2027-01-31T12:00:00+00:00"),
])
def test_dates_are_parsed_as_utc_unless_an_offset_is_given(text: str, iso: str) -> None:
    assert parse_date(text).isoformat() == iso


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A LUKS1 image file (no loop device needed) whose key is b"old passphrase"."""
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    path = tmp_path / "luks.img"
    path.write_bytes(bytes(8 * 1024 * 1024))
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1",
                    "--iter-time", "1", str(path), "--key-file", "-"],
                   input=b"old passphrase", check=True, capture_output=True)
    return path


def test_enroll_with_device_adds_a_working_luks_keyslot(cli: Cli, image: Path) -> None:
    args = build_parser().parse_args(
        ["enroll", *cli.common(), "--volume", "tank", "--signing-key", cli.keys.signer,
         "--output", str(cli.stick), "--bind-serial", SERIAL, "--device", str(image),
         "--iter-time", "1"])
    assert enroll_main(args, io.BytesIO(b"old passphrase"), io.StringIO()) == 0
    key_file = cli.stick / "keyd" / "tank.key"
    subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(key_file),
                    str(image)], check=True)
    manifest = (cli.stick / "keyd" / "manifest").read_text()
    uuid = subprocess.run(["cryptsetup", "luksUUID", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert f'volume_uuid = "{uuid}"' in manifest


def test_enroll_with_wrong_existing_key_writes_no_bundle(cli: Cli, image: Path) -> None:
    args = build_parser().parse_args(
        ["enroll", *cli.common(), "--volume", "tank", "--signing-key", cli.keys.signer,
         "--output", str(cli.stick), "--bind-serial", SERIAL, "--device", str(image)])
    with pytest.raises(ProgramError) as caught:
        enroll_main(args, io.BytesIO(b"Zq7notthekey"), io.StringIO())
    assert caught.value.argv[:2] == ["cryptsetup", "luksAddKey"]
    assert not any("Zq7notthekey" in arg for arg in caught.value.argv)
    assert not cli.stick.exists()


def test_verify_reads_the_trust_table_the_way_check_config_does(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    revoked = cli.tmp / "from-config-revoked.toml"
    config = cli.tmp / "keyd.toml"
    config.write_text(configs.trust_header([cli.keys.signer], gnupghome=cli.keys.home,
                                           revocations=revoked))
    assert main(["revoke", "--config", str(config), "--serial", SERIAL]) == 0
    assert revoked.exists()  # the [trust] revocations path from the config was used
    config.write_text(config.read_text() + "[volume.tank]\n")  # a volume with no layers
    assert main(["verify", "--config", str(config), str(cli.stick), "--serial", SERIAL]) == 3
    assert main(["check-config", "--config", str(config)]) == 3


def test_a_key_per_layer_is_written_as_format_2_and_verified_per_name(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("k1", "k2"):
        (cli.tmp / name).write_bytes(f"passphrase of {name}\n".encode())
    assert cli.enroll("secret", "--key-file", f"k1={cli.tmp / 'k1'}",
                      "--key-file", f"k2={cli.tmp / 'k2'}") == 0
    keyd = cli.stick / "keyd"
    assert (keyd / "secret.k1.key").read_bytes() == b"passphrase of k1\n"
    assert (keyd / "secret.k2.key").read_bytes() == b"passphrase of k2\n"
    assert (keyd / "manifest").read_bytes().startswith(b"format = 2\n")
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 0 and document["volumes"][0]["key_names"] == ["k1", "k2"]
    # Re-enrolled with one key for every layer: format 1 again, and the old files leave.
    assert cli.enroll("secret", "--generate", "16") == 0
    assert sorted(p.name for p in keyd.iterdir()) == ["manifest", "manifest.sig", "secret.key"]
    assert (keyd / "manifest").read_bytes().startswith(b"format = 1\n")


def test_generated_keys_per_name_and_what_does_not_go_together(cli: Cli) -> None:
    assert cli.enroll("secret", "--key-name", "k1", "--key-name", "k2", "--generate", "8") == 0
    assert [len((cli.stick / "keyd" / f"secret.{n}.key").read_bytes()) for n in ("k1", "k2")] \
        == [8, 8]
    (cli.tmp / "k1").write_bytes(b"x")
    assert cli.enroll("secret", "--key-file", f"k1={cli.tmp / 'k1'}", "--key-name", "k1") == 2
    assert cli.enroll("secret", "--key-name", "k1", "--key-name", "k2",
                      "--device", "/dev/null") == 2


def test_a_backup_stick_keeps_the_generation_and_neither_retires_the_other(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.enroll("tank")
    primary, backup = cli.stick, cli.tmp / "backup"
    assert main(["enroll", *cli.common(), "--volume", "tank", "--signing-key", cli.keys.signer,
                 "--output", str(backup), "--bind-serial", "BACKUP0002",
                 "--backup-of", str(primary)]) == 0
    assert (backup / "keyd" / "tank.key").read_bytes() == \
        (primary / "keyd" / "tank.key").read_bytes()
    code, document = cli.verify("--serial", SERIAL, "--record", capsys=capsys)
    assert code == 0 and document["volumes"][0]["generation"] == 1
    capsys.readouterr()
    code = main(["verify", *cli.common(), str(backup), "--serial", "BACKUP0002", "--json",
                 "--record"])
    copy = json.loads(capsys.readouterr().out)["volumes"][0]
    assert code == 0 and copy["generation"] == 1
    assert copy["bundle_id"] != document["volumes"][0]["bundle_id"]
    assert cli.verify("--serial", SERIAL, capsys=capsys)[0] == 0  # the primary still works
    # Re-keying the primary retires both.
    cli.enroll("tank")
    assert cli.verify("--serial", SERIAL, "--record", capsys=capsys)[0] == 0
    capsys.readouterr()
    assert main(["verify", *cli.common(), str(backup), "--serial", "BACKUP0002"]) == 6
    assert "REPLAYED_GENERATION" in capsys.readouterr().out


def test_a_backup_takes_its_keys_from_the_primary_only(cli: Cli) -> None:
    cli.enroll("tank")
    def backup(volume: str, *extra: str) -> int:
        return main(["enroll", *cli.common(), "--volume", volume, "--signing-key",
                     cli.keys.signer, "--output", str(cli.tmp / "backup"), "--bind-serial",
                     "BACKUP0002", "--backup-of", str(cli.stick), *extra])

    assert backup("tank", "--generation", "5") == 2
    assert backup("media") == 6  # the primary holds no bundle for media
    assert not (cli.tmp / "backup" / "keyd" / "manifest").exists()


def enroll_shares(cli: Cli, *extra: str, count: int = 3, threshold: int = 2) -> int:
    sticks = [arg for index in range(count) for arg in (
        "--output", str(cli.tmp / f"share{index}"), "--bind-serial", f"SHARE{index}")]
    return main(["enroll", *cli.common(), "--volume", "vault", "--signing-key", cli.keys.signer,
                 "--shares", str(count), "--threshold", str(threshold), *sticks, *extra])


def test_k_of_n_writes_one_signed_share_per_stick(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    (cli.tmp / "vault.key").write_bytes(b"the volume's existing key")
    assert enroll_shares(cli, "--key-file", str(cli.tmp / "vault.key")) == 0
    out = capsys.readouterr().out
    assert [f"share {i} of 3 (2 needed)" in out for i in (1, 2, 3)] == [True] * 3
    for index in range(3):
        keyd = cli.tmp / f"share{index}" / "keyd"
        assert sorted(p.name for p in keyd.iterdir()) == [
            "manifest", "manifest.sig", "vault.sealed", "vault.share"]
        assert b"existing key" not in (keyd / "vault.sealed").read_bytes()
        code = main(["verify", *cli.common(), str(keyd.parent), "--serial", f"SHARE{index}",
                     "--json"])
        verdict = json.loads(capsys.readouterr().out)["volumes"][0]
        assert code == 0 and f"share {index + 1} of 3 accepted (2 needed" in verdict["message"]
    sets = {(cli.tmp / f"share{i}" / "keyd" / "vault.sealed").read_bytes() for i in range(3)}
    assert len(sets) == 1  # every stick carries the same sealed key


@pytest.mark.parametrize(("argv", "words"), [
    (("--shares", "3"), "needs --threshold"),
    (("--threshold", "2"), "--threshold goes with --shares"),
    (("--shares", "2", "--threshold", "3"), "needs --threshold K with 2 <= K <= 2"),
])
def test_k_of_n_options_that_do_not_fit_are_usage_errors(
        cli: Cli, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], words: str) -> None:
    assert cli.enroll("vault", *argv) == 2
    assert words in capsys.readouterr().err


def test_each_share_stick_needs_its_own_output_and_binding(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert enroll_shares(cli, "--bind-serial", "ONEMORE") == 2
    assert "--bind-serial is given 4 times for 3 stick(s)" in capsys.readouterr().err
    assert cli.enroll("vault", "--shares", "2", "--threshold", "2") == 2
    assert "give --output 2 times" in capsys.readouterr().err


def test_truecrypt_keyfiles_are_enrolled_beside_the_passphrase(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    for name, data in (("pass", b"tc passphrase\n"), ("kf1", b"\x00keyfile one"),
                       ("kf2", b"keyfile two")):
        (cli.tmp / name).write_bytes(data)
    assert cli.enroll("media", "--key-file", f"tc={cli.tmp / 'pass'}",
                      "--tcrypt-keyfile", f"tc={cli.tmp / 'kf1'}",
                      "--tcrypt-keyfile", f"tc={cli.tmp / 'kf2'}") == 0
    keyd = cli.stick / "keyd"
    assert (keyd / "media.tc.keyfile1").read_bytes() == b"\x00keyfile one"
    assert (keyd / "media.tc.keyfile2").read_bytes() == b"keyfile two"
    assert b'kind = "keyfile"' in (keyd / "manifest").read_bytes()
    code, document = cli.verify("--serial", SERIAL, capsys=capsys)
    assert code == 0 and document["volumes"][0]["key_names"] == ["tc"]
    assert document["volumes"][0]["keyfiles"] == 2
    capsys.readouterr()
    assert enroll_shares(cli, "--tcrypt-keyfile", str(cli.tmp / "kf1")) == 2
    assert "k-of-n sticks seal keys, not TrueCrypt keyfiles" in capsys.readouterr().err
