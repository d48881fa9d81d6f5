"""The daemon's workers hand each crypt layer the key for its key name, and nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from keyd.config.model import CryptLayer, Volume
from keyd.config.parse import parse_config
from keyd.daemon import events as ev
from keyd.daemon import workers
from keyd.daemon.keystore import KeyStore
from keyd.engine.executor import KeySource
from keyd.engine.keys import KeyInventory, SignedFor
from keyd.engine.service import Outcome
from keyd.engine.status import VolumeReport
from keyd.trust.secret import KeySet, SecretBytes
from tests import configs
from tests.support.daemon_fakes import accepted

SEED_002 = parse_config(configs.seed_002("/dev/vdb", "/dev/vdc", volume="secret",
                                         keys=("k1", "k2")), "keyd.toml").volume("secret")


@dataclass
class KeyRecorder:
    """An engine that only reads the key of each crypt layer, as the executor would."""

    seen: dict[str, bytes] = field(default_factory=dict)
    offered: set[str] = field(default_factory=set)
    signed_for: str | None = None

    def unlock(self, volume: Volume, keys: KeySource, *, start_services: bool = False) -> Outcome:
        self.signed_for = keys.volume_uuid if isinstance(keys, SignedFor) else None
        for layer in volume.layers:
            if not isinstance(layer, CryptLayer):
                continue
            if isinstance(keys, KeyInventory) and not keys.has(layer.key):
                continue
            self.offered.add(layer.key)
            self.seen[layer.name] = bytes(keys.key(volume.name, layer.key, layer))
        return Outcome(volume.name, True)

    def lock(self, volume: Volume, *, force: bool = False, quiesce: bool = False) -> Outcome:
        raise AssertionError("not used")

    def mend(self, volume: Volume, keys: KeySource) -> Outcome:
        raise AssertionError("not used")

    def status(self, volumes: Sequence[Volume]) -> list[VolumeReport]:
        raise AssertionError("not used")


def unlock_with(keys: KeySet) -> KeyRecorder:
    store, engine = KeyStore(), KeyRecorder()
    result = workers.unlock(engine, SEED_002, store, store.put(keys))
    assert isinstance(result, ev.UnlockSucceeded), result
    return engine


def test_each_key_name_gets_its_own_secret() -> None:
    engine = unlock_with(KeySet({"k1": SecretBytes(b"first"), "k2": SecretBytes(b"second")}))
    assert engine.seen == {"tc1": b"first", "tc2": b"second"}


def test_one_secret_serves_every_key_name() -> None:
    engine = unlock_with(KeySet.single(SecretBytes(b"shared")))
    assert engine.seen == {"tc1": b"shared", "tc2": b"shared"}


def test_a_key_name_without_a_secret_is_not_offered() -> None:
    engine = unlock_with(KeySet({"k1": SecretBytes(b"first")}))
    assert engine.seen == {"tc1": b"first"} and engine.offered == {"k1"}


def test_the_bundles_volume_uuid_goes_with_its_keys() -> None:
    store, engine = KeyStore(), KeyRecorder()
    report = accepted("secret")
    signed = replace(report.verdicts[0].entry, volume_uuid="0c5c6d83-311e-495d-8b14-84576dd84ca9")
    report.verdicts = (replace(report.verdicts[0], entry=signed),)
    workers.unlock(engine, SEED_002, store, store.put(KeySet.single(SecretBytes(b"k")), report))
    assert engine.signed_for == "0c5c6d83-311e-495d-8b14-84576dd84ca9"
    workers.unlock(engine, SEED_002, store, store.put(KeySet.single(SecretBytes(b"k"))))
    assert engine.signed_for is None


def test_truecrypt_keyfiles_go_to_their_key_name_only() -> None:
    keys = KeySet({"k1": SecretBytes(b"first")}, {"k2": [SecretBytes(b"kf")]})
    store = KeyStore()
    mapping = workers._keys(SEED_002, store, store.put(keys))
    assert mapping.keyfiles("secret", "k2") == [bytearray(b"kf")]
    assert mapping.keyfiles("secret", "k1") == []
    layer = SEED_002.layer("tc2")
    assert isinstance(layer, CryptLayer) and mapping.has("k2")
    assert bytes(mapping.key("secret", "k2", layer)) == b""  # keyfiles only: no passphrase
