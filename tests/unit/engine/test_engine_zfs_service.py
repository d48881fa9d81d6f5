"""zfs around the executor: run records, the Engine's result, KernelObserver and doctor."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from keyd.config import Config, CryptLayer, Volume, parse_config
from keyd.config.model import ZfsLayer
from keyd.engine import doctor
from keyd.engine.errors import DegradedRefused
from keyd.engine.keys import FileKeys, MappingKeys, NoKeys, PromptKeys
from keyd.engine.observe import KernelObserver
from keyd.engine.observed import DmMapping, ObservedState, PoolVdev, ZfsPool
from keyd.engine.pool_records import PoolRecords
from keyd.engine.ports import Storage
from keyd.engine.service import Engine
from keyd.errors import ProgramMissing
from keyd.runner import Completed
from tests import configs
from tests.support.scripted_runner import Reply, ScriptedRunner

GUID = "16093900627180053822"


def seed002(degraded: str = "always") -> Volume:
    return parse_config(configs.seed_002("/dev/vdb", "/dev/vdc", volume="secret", keys=("k1", "k2"),
                                         degraded=degraded), "t.toml").volume("secret")


LOCKED = ObservedState(paths={"/dev/vdb": "vdb", "/dev/vdc": "vdc"})
IMPORTED = replace(LOCKED, dm=(
    DmMapping("dm-0", "keyd-secret-tc1", "CRYPT-TCRYPT-keyd-secret-tc1", ("vdb",)),),
    pools=(ZfsPool("secretpool", GUID, "DEGRADED", (
        PoolVdev("/dev/mapper/keyd-secret-tc1", "ONLINE"),
        PoolVdev("/dev/mapper/keyd-secret-tc2", "UNAVAIL"))),))


# ---- run records -----------------------------------------------------------------------------

def test_records_survive_in_the_run_dir_and_ignore_junk(tmp_path: Path) -> None:
    PoolRecords(tmp_path).save("secret/pool", GUID)
    (tmp_path / "zfs" / "junk").write_text("x\n")
    (tmp_path / "zfs" / "a.b").write_text("not a guid\n")
    assert PoolRecords(tmp_path).load() == {"secret/pool": GUID}  # a new object: a restart
    PoolRecords(tmp_path).forget("secret/pool")
    PoolRecords(tmp_path).forget("secret/pool")  # twice is fine
    assert PoolRecords(tmp_path).load() == {}
    assert PoolRecords(tmp_path / "missing").load() == {}


# ---- Engine ----------------------------------------------------------------------------------

@dataclass
class Kernel:
    """Observer, crypt, zfs, holders and services in one fake; the state follows the effects."""

    state: ObservedState = LOCKED
    events: list[str] = field(default_factory=list)

    def observe(self, volumes: Sequence[Volume], *, members: bool = True) -> ObservedState:
        return self.state

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        self.events.append(f"open {dm_name}")
        return f"/dev/mapper/{dm_name}"

    def close(self, dm_name: str) -> None:
        self.events.append(f"close {dm_name}")

    def import_pool(self, label: str, layer: ZfsLayer) -> ZfsPool:
        self.events.append(f"import {layer.target}")
        self.state = IMPORTED
        return ZfsPool("secretpool", GUID, "DEGRADED")

    def export_pool(self, label: str, pool: str) -> None:
        self.events.append(f"export {pool}")

    def online(self, label: str, pool: str, device: str) -> None:
        self.events.append(f"online {pool} {device}")

    def holders(self, paths: Sequence[str]) -> list[Any]:
        return []

    def stop(self, units: Sequence[str]) -> None:
        """Nothing to stop."""

    def start(self, units: Sequence[str]) -> None:
        """Nothing to start."""


def engine(kernel: Kernel, run_dir: Path) -> Engine:
    storage = Storage(kernel, kernel, kernel, kernel, kernel)  # type: ignore[arg-type]
    return Engine(kernel, storage, kernel, kernel, run_dir=str(run_dir))


def one_key_file(tmp_path: Path) -> FileKeys:
    (tmp_path / "k1").write_bytes(b"one\n")
    return FileKeys(None, {"k1": str(tmp_path / "k1")}, io.BytesIO(), lambda p: open(p, "rb"))


def test_unlock_with_one_key_imports_degraded_and_says_so(tmp_path: Path) -> None:
    kernel = Kernel()
    outcome = engine(kernel, tmp_path).unlock(seed002("always"), one_key_file(tmp_path))
    assert kernel.events == ["open keyd-secret-tc1", "import secretpool"]
    assert outcome.degraded == ("zfs pool secretpool of layer pool of volume secret was imported "
                                "DEGRADED (without tc2)",)
    assert outcome.devices["pool"] == "secretpool"
    # A restarted keyd (a new Engine on the same run dir) still knows the pool is its own.
    (status,) = engine(kernel, tmp_path).status([seed002("always")])
    assert status.state == "unlocked (degraded)"
    assert status.layers[0].owned


def test_unlock_with_one_key_under_never_touches_nothing(tmp_path: Path) -> None:
    kernel = Kernel()
    with pytest.raises(DegradedRefused, match="no key 'k2' was given"):
        engine(kernel, tmp_path).unlock(seed002("never"), one_key_file(tmp_path))
    assert kernel.events == []


def test_lock_exports_only_what_the_records_say_keyd_imported(tmp_path: Path) -> None:
    kernel = Kernel(state=IMPORTED)
    with pytest.raises(Exception, match="was not imported by keyd"):
        engine(kernel, tmp_path).lock(seed002())
    assert kernel.events == []
    PoolRecords(tmp_path).save("secret/pool", GUID)
    engine(kernel, tmp_path).lock(seed002())
    assert kernel.events == ["export secretpool", "close keyd-secret-tc1"]
    assert PoolRecords(tmp_path).load() == {}


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")


@pytest.mark.parametrize(("keys", "has_k2"), [
    (FileKeys("/k", {}, io.BytesIO(), _open_binary), True),
    (FileKeys(None, {"k1": "/k"}, io.BytesIO(), _open_binary), False),
    (MappingKeys({"k1": b"x"}), False),
    (MappingKeys({"k1": b"x", "k2": b"y"}), True),
])
def test_key_sources_say_which_keys_they_have(keys: FileKeys | MappingKeys, has_k2: bool) -> None:
    assert keys.has("k2") is has_k2


def test_sources_that_cannot_tell_are_trusted_to_have_every_key(tmp_path: Path) -> None:
    kernel = Kernel()
    engine(kernel, tmp_path).unlock(seed002("always"), PromptKeys(lambda prompt: "pw"))
    assert kernel.events[:2] == ["open keyd-secret-tc1", "open keyd-secret-tc2"]
    assert not hasattr(NoKeys(), "has")


# ---- KernelObserver --------------------------------------------------------------------------

LIST = ("zpool", "list", "-H", "-p", "-o", "name,guid,health,altroot")
STATUS = textwrap.dedent("""\
      pool: secretpool
     state: ONLINE
      scan: none requested
    config:

    \tNAME                           STATE     READ WRITE CKSUM
    \tsecretpool                     ONLINE       0     0     0
    \t  /dev/mapper/keyd-secret-tc1  ONLINE       0     0     0

    errors: No known data errors
""")


def test_observer_asks_zpool_only_when_a_zfs_layer_is_configured(tmp_path: Path) -> None:
    runner = ScriptedRunner().on(*LIST, reply=Reply(f"secretpool\t{GUID}\tONLINE\t-\n")) \
        .on("zpool", "status", "-P", reply=Reply(STATUS))
    plain = parse_config(configs.crypt_layer("v", "c", configs.LUKS, device="/dev/vdb"),
                         "t.toml").volumes
    assert KernelObserver(runner, tmp_path).observe(plain).pools == ()
    assert runner.argvs("zpool") == []
    (found,) = KernelObserver(runner, tmp_path).observe([seed002()], members=False).pools
    assert (found.name, found.guid, found.vdevs[0].path) == \
        ("secretpool", GUID, "/dev/mapper/keyd-secret-tc1")


class NoZpool(ScriptedRunner):
    def run(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        if argv[0] == "zpool":
            raise ProgramMissing("zpool", "zfsutils-linux")
        return super().run(argv, **kwargs)


def test_observer_without_zpool_sees_no_pools(tmp_path: Path) -> None:
    assert KernelObserver(NoZpool(), tmp_path).observe([seed002()]).pools == ()


# ---- doctor ----------------------------------------------------------------------------------

def test_doctor_checks_zfs_only_when_configured(tmp_path: Path) -> None:
    config = Config("t.toml", (seed002(),))
    assert doctor.needed_programs(config)[-2:] == ["zpool", "zfs"]
    assert doctor.needed_modules(config) == ["dm_crypt", "zfs"]
    assert "zfs" not in doctor.needed_modules(Config("t.toml"))
    (program,) = doctor.check_programs(NoZpool(), ["zpool"])
    (module,) = doctor.check_modules(ScriptedRunner().on("modprobe", reply=Reply(
        stderr="modprobe: FATAL: Module zfs not found\n", returncode=1)), ["zfs"], tmp_path)
    for finding in (program, module):
        assert finding.status == "fail"
        assert "contrib" in str(finding.fix) and "zfs-dkms zfsutils-linux" in str(finding.fix)
