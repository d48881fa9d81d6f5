"""Which backend opens a crypt layer, and which one closes a mapping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from keyd.adapters.crypt_backends import CryptBackends, DmCryptProbe
from keyd.adapters.usercrypt import UserspaceCrypt
from keyd.config.model import CryptBackend, CryptLayer, CryptType
from keyd.engine.errors import StorageError
from tests.support.scripted_runner import Reply, ScriptedRunner

TC = CryptLayer(name="tc", type="tcrypt", key="tc", key_format="passphrase", device="/dev/sdb")
# modprobe --dry-run --verbose dm_crypt: a module to load, one disabled, none (exit 1)
WITH_CRYPT = "insmod /lib/modules/6.1.0-57-amd64/kernel/drivers/md/dm-crypt.ko \n"
DISABLED = "install /bin/false\n"


class Recorder:
    """A crypt port that records what it was asked."""

    def __init__(self, name: str, serving: Sequence[str] = ()) -> None:
        self.name = name
        self.serving = set(serving)
        self.calls: list[tuple[str, str]] = []

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        self.calls.append(("open", dm_name))
        return f"/dev/{self.name}"

    def close(self, dm_name: str) -> None:
        self.calls.append(("close", dm_name))

    def serves(self, dm_name: str) -> bool:
        return dm_name in self.serving


def backends(modprobe: str | None, serving: Sequence[str] = (),
             root: str = "/nonexistent") -> tuple[CryptBackends, ScriptedRunner]:
    runner = ScriptedRunner().on("modprobe", reply=Reply(stdout=modprobe or "",
                                                         returncode=0 if modprobe else 1))
    user = Recorder("loop7", serving)
    chosen = CryptBackends(Recorder("mapper"), user,  # type: ignore[arg-type]
                           DmCryptProbe(runner, root))
    return chosen, runner


@pytest.mark.parametrize(("backend", "ctype", "modprobe", "device"), [
    ("auto", "tcrypt", WITH_CRYPT, "/dev/mapper"),
    ("auto", "tcrypt", DISABLED, "/dev/loop7"),
    ("auto", "plain", None, "/dev/loop7"),
    ("auto", "luks", None, "/dev/mapper"),  # LUKS has no userspace path: cryptsetup says why
    ("kernel", "veracrypt", None, "/dev/mapper"),
    ("userspace", "tcrypt", WITH_CRYPT, "/dev/loop7"),
])
def test_the_layer_and_the_kernel_choose_the_backend(backend: CryptBackend, ctype: CryptType,
                                                     modprobe: str | None, device: str) -> None:
    chosen, _ = backends(modprobe)
    layer = replace(TC, backend=backend, type=ctype)
    assert chosen.open("v", layer, "/dev/sdb", "keyd-v-tc", b"pw") == device


def test_a_kernel_with_dm_crypt_is_probed_once() -> None:
    chosen, runner = backends(WITH_CRYPT)
    for _ in range(3):
        chosen.open("v", TC, "/dev/sdb", "keyd-v-tc", b"pw")
    assert runner.argvs("modprobe") == [("modprobe", "--dry-run", "--verbose", "dm_crypt")]


def test_a_loaded_dm_crypt_needs_no_modprobe(tmp_path: Path) -> None:
    (tmp_path / "sys" / "module" / "dm_crypt").mkdir(parents=True)
    chosen, runner = backends(None, root=str(tmp_path))
    assert chosen.open("v", TC, "/dev/sdb", "keyd-v-tc", b"pw") == "/dev/mapper"
    assert runner.argvs("modprobe") == []


def test_a_mapping_closes_where_it_is_served_whatever_the_config_says() -> None:
    chosen, _ = backends(WITH_CRYPT, serving=["keyd-v-tc"])
    chosen.close("keyd-v-tc")
    chosen.close("keyd-v-other")
    assert isinstance(chosen.userspace, Recorder) and isinstance(chosen.kernel, Recorder)
    assert chosen.userspace.calls == [("close", "keyd-v-tc")]
    assert chosen.kernel.calls == [("close", "keyd-v-other")]


def test_keyfiles_need_dm_crypt() -> None:
    with pytest.raises(StorageError, match="keyfiles need dm-crypt") as caught:
        UserspaceCrypt(ScriptedRunner()).open("v", TC, "/dev/sdb", "keyd-v-tc", b"pw",
                                              keyfiles=[b"k"])
    assert caught.value.fix is not None and 'backend = "kernel"' in caught.value.fix
