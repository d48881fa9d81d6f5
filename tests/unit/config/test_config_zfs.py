"""parse_config for ``kind = "zfs"``: seed 002's mirror, the import options, and each error."""

from __future__ import annotations

import textwrap

import pytest

from keyd.config import parse_config
from keyd.config.model import ZfsLayer
from keyd.errors import ConfigError
from tests import configs

DISKS = {"tc1": "/dev/vdb", "tc2": "/dev/vdc"}
TC = configs.crypt_layers("secret", DISKS)


def zfs_of(body: str, extra: str = "") -> ZfsLayer:
    text = TC + extra + "[volume.secret.layer.pool]\nkind = \"zfs\"\n" + textwrap.dedent(body)
    layer = parse_config(text, "t.toml").volume("secret").layer("pool")
    assert isinstance(layer, ZfsLayer)
    return layer


def error_of(body: str, extra: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        zfs_of(body, extra)
    return info.value


def test_seed002_mirror_defaults() -> None:
    layer = zfs_of('pool = "secretpool"\nbelow = ["tc1", "tc2"]\n')
    assert layer == ZfsLayer(name="pool", pool="secretpool", below=("tc1", "tc2"))
    assert (layer.search_dir, layer.altroot, layer.read_only, layer.mount, layer.degraded) == \
        ("/dev/mapper", None, False, True, "never")
    assert (layer.target, layer.label) == ("secretpool", "secretpool")


def test_zfs_layer_is_the_top_and_comes_after_its_vdev_layers() -> None:
    text = TC + '[volume.secret.layer.pool]\nkind = "zfs"\npool = "p"\nbelow = ["tc2", "tc1"]\n'
    volume = parse_config(text, "t.toml").volume("secret")
    assert volume.top == "pool"
    assert [layer.name for layer in volume.layers][-1] == "pool"


def test_every_import_option() -> None:
    layer = zfs_of('''
        pool = "tank"
        guid = "16093900627180053822"
        below = ["tc1", "tc2"]
        search_dir = "/dev/disk/by-id"
        altroot = "/mnt/tank"
        read_only = true
        mount = false
        degraded = "always"
    ''')
    assert (layer.guid, layer.search_dir, layer.altroot, layer.read_only, layer.mount,
            layer.degraded) == ("16093900627180053822", "/dev/disk/by-id", "/mnt/tank", True,
                                False, "always")
    assert layer.target == "16093900627180053822"  # a GUID is unambiguous


def test_guid_alone_names_the_pool() -> None:
    layer = zfs_of('guid = "2464308567901183139"\nbelow = ["tc1", "tc2"]\n')
    assert (layer.pool, layer.target, layer.label) == \
        (None, "2464308567901183139", "guid 2464308567901183139")


@pytest.mark.parametrize(("body", "key", "words"), [
    ('below = ["tc1"]\n', "volume.secret.layer.pool", "name or its GUID"),
    ('pool = "p"\n', "volume.secret.layer.pool.below", "crypt layers below"),
    ('pool = "1pool"\nbelow = ["tc1"]\n', "volume.secret.layer.pool.pool", "not a ZFS pool"),
    ('pool = "mirror0"\nbelow = ["tc1"]\n', "volume.secret.layer.pool.pool", "not a ZFS pool"),
    ('pool = "p/q"\nbelow = ["tc1"]\n', "volume.secret.layer.pool.pool", "not a ZFS pool"),
    ('pool = "p"\nguid = "0x12"\nbelow = ["tc1"]\n', "volume.secret.layer.pool.guid",
     "not a pool GUID"),
    ('pool = "p"\nguid = "99999999999999999999"\nbelow = ["tc1"]\n',
     "volume.secret.layer.pool.guid", "not a pool GUID"),
    ('pool = "p"\nbelow = ["tc1"]\ndegraded = "after=30"\n', "volume.secret.layer.pool.degraded",
     "zfs degraded policy"),
    ('pool = "p"\nbelow = ["tc1"]\nsearch_dir = "dev/mapper"\n',
     "volume.secret.layer.pool.search_dir", "absolute"),
    ('pool = "p"\nbelow = ["tc1"]\naltroot = "/mnt/../etc"\n',
     "volume.secret.layer.pool.altroot", "absolute"),
    ('pool = "p"\nbelow = ["tc1"]\nmountpoint = "/srv/p"\n',
     "volume.secret.layer.pool.mountpoint", "own mountpoint property"),
    ('pool = "p"\nbelow = ["tc1"]\nreadonly = true\n', "volume.secret.layer.pool.readonly",
     "did you mean 'read_only'"),
    ('pool = "p"\nbelow = ["tc1", "nope"]\n', "volume.secret.layer.pool.below",
     "not a layer of volume"),
])
def test_zfs_errors_name_the_key_and_the_fix(body: str, key: str, words: str) -> None:
    error = error_of(body)
    assert error.key == key
    assert words in str(error)
    assert error.fix


def test_a_zfs_layer_sits_only_on_crypt_layers() -> None:
    extra = '[volume.secret.layer.m]\nkind = "mount"\ndevice = "/dev/vdd"\nfstype = "ext4"\n' \
            'mountpoint = "/srv/m"\n'
    error = error_of('pool = "p"\nbelow = ["tc1", "tc2", "m"]\n', extra)
    assert "cannot sit on mount layer 'm'" in str(error)
    assert "sits on: crypt" in str(error.fix)


def test_nothing_sits_on_a_zfs_layer() -> None:
    text = TC + '''
[volume.secret.layer.pool]
kind = "zfs"
pool = "p"
below = ["tc1", "tc2"]
[volume.secret.layer.data]
kind = "mount"
below = ["pool"]
fstype = "zfs"
mountpoint = "/srv/p"
'''
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.toml")
    assert info.value.key == "volume.secret.layer.data.below"
    assert "nothing sits on zfs layer 'pool'" in str(info.value)
    assert "mountpoint property" in str(info.value.fix)


def test_two_volumes_cannot_import_the_same_pool() -> None:
    one = configs.zfs_on_crypt("secret", DISKS, pool="p")
    two = one.replace("secret", "other").replace("/dev/vd", "/dev/sd")
    with pytest.raises(ConfigError, match=r"pool .p. is also used by volume\.secret\.layer\.pool"):
        parse_config(one + two, "t.toml")
