"""The per-volume flock, and the direct-mode key sources."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import pytest

from keyd.config import CryptLayer
from keyd.engine.errors import KeyRejected, VolumeLocked
from keyd.engine.keys import MAX_KEY_BYTES, FileKeys, PromptKeys
from keyd.engine.lockfile import VolumeLock
from keyd.errors import KeydError

LAYER = CryptLayer(name="c", type="luks", key="c", key_format="passphrase", device="/dev/sdb")


def test_second_lock_of_a_volume_fails_clearly_naming_the_holder(tmp_path: Path) -> None:
    with (VolumeLock(tmp_path / "run", "tank"), pytest.raises(VolumeLocked) as info,
          VolumeLock(tmp_path / "run", "tank", timeout=0)):
        pass
    assert f"pid {os.getpid()}" in str(info.value) and info.value.exit_code == 5


def test_other_volumes_are_not_blocked(tmp_path: Path) -> None:
    with VolumeLock(tmp_path, "tank"), VolumeLock(tmp_path, "other", timeout=0):
        assert (tmp_path / "other.lock").exists()


def test_second_lock_waits_until_the_first_is_released(tmp_path: Path) -> None:
    first = VolumeLock(tmp_path, "tank").__enter__()
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) == 3:
            first.__exit__(None, None, None)

    with VolumeLock(tmp_path, "tank", timeout=10, clock=lambda: now[0], sleep=sleep):
        assert (tmp_path / "tank.lock").read_text().strip() == str(os.getpid())
    assert len(sleeps) == 3


def test_lock_dir_that_cannot_be_created_is_explained(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KeydError, match="cannot create lock file"):
        VolumeLock(tmp_path / "file" / "run", "tank").__enter__()


def opener_for(files: dict[str, bytes]) -> object:
    def opener(path: str) -> BinaryIO:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return io.BytesIO(files[path])
    return opener


def test_file_keys_by_name_default_and_stdin_read_once() -> None:
    stdin = io.BytesIO(b"from stdin")
    keys = FileKeys("-", {"md0": "/keys/md0"}, stdin,
                    opener_for({"/keys/md0": b"md0 key"}))  # type: ignore[arg-type]
    assert keys.key("tank", "md0", LAYER) == bytearray(b"md0 key")
    assert keys.key("tank", "a", LAYER) == bytearray(b"from stdin")
    assert keys.key("tank", "b", LAYER) == bytearray(b"from stdin")
    keys.wipe()
    assert keys._stdin_data == bytearray(len(b"from stdin"))


@pytest.mark.parametrize(("default", "files", "words"), [
    (None, {}, "no key given for key 'c'"),
    ("/missing", {}, "cannot read key file /missing"),
    ("/huge", {"/huge": b"x" * (MAX_KEY_BYTES + 1)}, "larger than"),
])
def test_file_key_problems(default: str | None, files: dict[str, bytes], words: str) -> None:
    keys = FileKeys(default, {}, io.BytesIO(), opener_for(files))  # type: ignore[arg-type]
    with pytest.raises(KeyRejected, match=words):
        keys.key("tank", "c", LAYER)


def test_prompt_asks_once_per_key_name_and_wipes() -> None:
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return "sesame"

    keys = PromptKeys(ask)
    assert keys.key("tank", "c", LAYER) == bytearray(b"sesame")
    assert keys.key("tank", "c", LAYER) == bytearray(b"sesame")
    assert asked == ["Passphrase for tank/c: "]
    keys.wipe()
    assert keys.key("tank", "c", LAYER) == bytearray(b"sesame") and len(asked) == 2


def test_mapping_keys_hand_out_copies_and_name_missing_keys() -> None:
    from keyd.engine.keys import MappingKeys
    source = bytearray(b"k1")
    keys = MappingKeys({"md0": source})
    copy = keys.key("tank", "md0", LAYER)
    copy[:] = b"\0\0"
    assert source == bytearray(b"k1")
    with pytest.raises(KeyRejected, match="no key 'other'"):
        keys.key("tank", "other", LAYER)
