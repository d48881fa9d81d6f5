"""cryptsetup argv/stdin per crypt type, key shaping, and exit-code mapping."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from keyd.adapters.cryptsetup import Cryptsetup, open_command, shape_key
from keyd.adapters.retry import Retry
from keyd.config import CryptLayer
from keyd.engine.errors import KeyRejected, StorageError
from keyd.errors import ProgramError, user_message
from tests.support.scripted_runner import Reply, ScriptedRunner

SEED001 = CryptLayer(name="crypt0", type="plain", key="passphrase", key_format="binary",
                     below=("md0",), cipher="aes-cbc-plain", key_size=128)
SEED004 = CryptLayer(name="c", type="plain", key="c", key_format="passphrase",
                     device="/dev/hdb2", cipher="aes-cbc-plain", key_size=256, hash="ripemd160")
LUKS = CryptLayer(name="c", type="luks", key="c", key_format="passphrase", device="/dev/sdb")
TCRYPT = CryptLayer(name="tc", type="tcrypt", key="tc", key_format="passphrase",
                    device="/dev/sdb")
VERA = CryptLayer(name="vc", type="veracrypt", key="vc", key_format="passphrase",
                  device="/dev/sdc", pim=485, hash="sha512")
KEYFILE32 = b"Zx8kQ2mW9pLr4TbN7vYc1HsD6gJf3AeU"  # like seed 001's `head -c32` file


def test_seed001_raw_key_is_the_first_16_bytes_of_the_file_unhashed() -> None:
    command = open_command("tank", SEED001, "/dev/md127", "keyd-tank-crypt0", KEYFILE32)
    assert command.stdin == KEYFILE32[:16]
    assert command.argv == (
        "cryptsetup", "open", "--type", "plain", "--batch-mode", "--cipher", "aes-cbc-plain",
        "--key-size", "128", "--offset", "0", "--skip", "0", "--key-file=-", "--hash", "plain",
        "/dev/md127", "keyd-tank-crypt0")


def test_seed004_passphrase_goes_to_stdin_as_a_line_and_is_hashed_by_cryptsetup() -> None:
    command = open_command("old", SEED004, "/dev/hdb2", "keyd-old-c", b"my secret\n")
    assert command.stdin == b"my secret\n"
    assert "--key-file=-" not in command.argv and not any(
        a.startswith("--key-file") for a in command.argv)
    assert command.argv[command.argv.index("--hash") + 1] == "ripemd160"


def test_plain_hashed_binary_key_is_read_whole_and_hashed() -> None:
    layer = replace(SEED004, key_format="binary", hash="sha256")
    command = open_command("v", layer, "/dev/x", "n", b"\x00bin\nary")
    assert command.stdin == b"\x00bin\nary"
    assert command.argv[-6:-2] == ("--key-file=-", "--keyfile-size=8", "--hash", "sha256")


def test_luks_reads_the_key_verbatim_from_stdin() -> None:
    command = open_command("v", replace(LUKS, readonly=True, allow_discards=True), "/dev/sdb",
                           "keyd-v-c", b"pass\n")
    assert command.argv == ("cryptsetup", "open", "--type", "luks", "--key-file=-",
                            "--readonly", "--allow-discards", "/dev/sdb", "keyd-v-c")
    assert command.stdin == b"pass"  # a passphrase file's trailing newline is not the key
    binary = replace(LUKS, key_format="binary")
    assert open_command("v", binary, "/dev/sdb", "n", b"\x00k\n").stdin == b"\x00k\n"


def test_truecrypt_only_and_all_header_options() -> None:
    layer = replace(TCRYPT, hidden=True, system=True, backup_header=True, cipher="aes")
    command = open_command("w", layer, "/dev/sdb", "keyd-w-tc", b"pw")
    assert command.argv == ("cryptsetup", "open", "--type", "tcrypt", "--disable-veracrypt",
                            "--tcrypt-hidden", "--tcrypt-system", "--tcrypt-backup",
                            "--cipher", "aes", "/dev/sdb", "keyd-w-tc")
    assert command.stdin == b"pw\n"


def test_veracrypt_with_pinned_prf_and_pim() -> None:
    command = open_command("v", VERA, "/dev/sdc", "keyd-v-vc", b"pw")
    assert command.argv == ("cryptsetup", "open", "--type", "tcrypt", "--veracrypt",
                            "--veracrypt-pim=485", "--hash", "sha512", "/dev/sdc", "keyd-v-vc")


def test_veracrypt_streebog_pin_uses_cryptsetups_prf_name_stribog512() -> None:
    command = open_command("v", replace(VERA, hash="streebog"), "/dev/sdc", "keyd-v-vc", b"pw")
    assert command.argv[command.argv.index("--hash") + 1] == "stribog512"


def test_plain_extras_sector_size_offsets_and_large_iv() -> None:
    layer = replace(SEED004, sector_size=4096, iv_large_sectors=True, offset=8, skip=16)
    argv = open_command("v", layer, "/dev/x", "n", b"pw").argv
    assert argv[argv.index("--sector-size") + 1] == "4096" and "--iv-large-sectors" in argv
    assert argv[argv.index("--offset") + 1] == "8" and argv[argv.index("--skip") + 1] == "16"


def test_raw_key_honours_keyfile_offset() -> None:
    layer = replace(SEED001, keyfile_offset=4)
    assert shape_key("t", layer, KEYFILE32) == KEYFILE32[4:20]


@pytest.mark.parametrize(("layer", "key", "words"), [
    (SEED001, b"Q7zX", "too short"),
    (SEED004, b"\n", "is empty"),
    (SEED004, b"Kq9\nW2x", "line break"),
    (TCRYPT, b"Ab3\nCd4\n", "line break"),
])
def test_bad_keys_are_rejected_without_showing_them(layer: CryptLayer, key: bytes,
                                                    words: str) -> None:
    with pytest.raises(KeyRejected) as info:
        open_command("t", layer, "/dev/x", "n", key)
    assert words in str(info.value)
    assert all(part.decode() not in str(info.value) for part in key.split() if part)
    assert info.value.exit_code == 6


def test_open_passes_the_key_only_as_stdin() -> None:
    runner = ScriptedRunner()
    path = Cryptsetup(runner).open("tank", SEED001, "/dev/md127", "keyd-tank-crypt0", KEYFILE32)
    assert path == "/dev/mapper/keyd-tank-crypt0"
    (call,) = runner.calls
    assert call.secret == KEYFILE32[:16]
    assert not any(KEYFILE32[:16].decode() in arg for arg in call.argv)


def test_exit_2_is_a_wrong_key_for_the_volume() -> None:
    runner = ScriptedRunner().on("cryptsetup", "open", reply=Reply(
        stderr="No key available with this passphrase.\n", returncode=2))
    with pytest.raises(KeyRejected) as info:
        Cryptsetup(runner).open("tank", LUKS, "/dev/sdb", "keyd-tank-c", b"nope")
    assert str(info.value).startswith("wrong key for volume tank (cryptsetup exit 2)")
    assert "No key available" in user_message(info.value)
    assert isinstance(info.value.__cause__, ProgramError)


def test_tcrypt_wrong_key_hint_mentions_header_options() -> None:
    runner = ScriptedRunner().on("cryptsetup", reply=Reply(returncode=2))
    with pytest.raises(KeyRejected, match="hidden/system/pim"):
        Cryptsetup(runner).open("w", TCRYPT, "/dev/sdb", "keyd-w-tc", b"pw")


@pytest.mark.parametrize(("code", "error", "words"), [
    (5, StorageError, "busy or keyd-t-c already exists"),
    (4, StorageError, "rejects device"),
    (1, ProgramError, "cryptsetup exited 1"),
])
def test_other_exit_codes(code: int, error: type[Exception], words: str) -> None:
    runner = ScriptedRunner().on("cryptsetup", reply=Reply(returncode=code))
    with pytest.raises(error, match=words):
        Cryptsetup(runner).open("t", LUKS, "/dev/sdb", "keyd-t-c", b"pw")


def test_close_is_idempotent_and_busy_is_explained() -> None:
    runner = ScriptedRunner().on("cryptsetup", "close", "gone", reply=Reply(returncode=4)) \
        .on("cryptsetup", "close", "held", reply=Reply(returncode=5)) \
        .on("cryptsetup", "close", "odd", reply=Reply(returncode=1))
    sleeps: list[float] = []
    crypt = Cryptsetup(runner, Retry(attempts=3, delay=0.5, sleep=sleeps.append))
    crypt.close("gone")
    with pytest.raises(StorageError, match="still in use"):
        crypt.close("held")
    assert sleeps == [0.5, 0.5]  # busy is retried, then reported
    with pytest.raises(ProgramError):
        crypt.close("odd")
    assert sleeps == [0.5, 0.5]  # other failures are not retried


def test_close_succeeds_once_udev_lets_go() -> None:
    replies = [Reply(returncode=5), Reply(returncode=5), Reply()]
    runner = ScriptedRunner().on("cryptsetup", reply=lambda argv: replies.pop(0))
    sleeps: list[float] = []
    Cryptsetup(runner, Retry(sleep=sleeps.append)).close("keyd-t-c")
    assert len(runner.calls) == 3 and len(sleeps) == 2


def test_truecrypt_keyfiles_go_as_key_file_paths_and_the_passphrase_may_be_empty() -> None:
    command = open_command("v", TCRYPT, "/dev/sdc", "n", b"", keyfile_paths=["/proc/1/fd/7",
                                                                             "/proc/1/fd/8"])
    assert command.argv[-6:] == ("--key-file", "/proc/1/fd/7", "--key-file", "/proc/1/fd/8",
                                 "/dev/sdc", "n")
    assert command.stdin == b"\n"
    with pytest.raises(KeyRejected, match="a luks layer"):
        open_command("v", LUKS, "/dev/sdb", "n", b"pw", keyfile_paths=["/proc/1/fd/7"])


def test_keyfiles_reach_cryptsetup_as_in_memory_files_only_while_it_runs() -> None:
    seen: list[bytes] = []

    def read_keyfiles(argv: Sequence[str]) -> Reply:
        paths = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--key-file"]
        seen.extend(Path(path).read_bytes() for path in paths)
        assert all(os.readlink(path).startswith("/memfd:") for path in paths)
        return Reply()

    runner = ScriptedRunner().on("cryptsetup", "open", reply=read_keyfiles)
    Cryptsetup(runner).open("v", TCRYPT, "/dev/sdc", "n", b"pw", keyfiles=[b"kf one", b"kf two"])
    assert seen == [b"kf one", b"kf two"]
    assert runner.calls[0].secret == b"pw\n"
    assert b"kf one" not in b" ".join(arg.encode() for arg in runner.calls[0].argv)
