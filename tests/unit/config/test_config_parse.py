"""parse_config: the happy paths for every layer kind, and the ConfigErrors for bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from keyd.config import (
    Config,
    CryptLayer,
    Degraded,
    LoopLayer,
    MountLayer,
    RaidLayer,
    load_config,
    parse_config,
)
from keyd.errors import ConfigError
from tests import configs

RAID5_PLAIN_XFS = configs.trust_header(
    ["0123 4567 89AB CDEF 0123  4567 89AB CDEF 0123 4567"], gnupghome="/var/lib/keyd/gnupg",
) + configs.seed_001("6b8b4567:327b23c6:643c9869:66334873", volume="tank", crypt_name="crypt0",
                     mountpoint="/mnt/raid5crypt/", options=["noatime"],
                     services=["smbd.service", "nfs-server.service"], description="seed 001")


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "keyd.toml")


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def test_seed_001_stack_parses_bottom_up_with_normalized_values() -> None:
    config = parse(RAID5_PLAIN_XFS)
    volume = config.volume("tank")
    assert [layer.name for layer in volume.layers] == ["md0", "crypt0", "data"]
    assert volume.top == "data"
    assert volume.services == ("smbd.service", "nfs-server.service")
    raid, crypt, mount = volume.layers
    assert isinstance(raid, RaidLayer) and raid.uuid == "6b8b4567327b23c6643c986966334873"
    assert raid.degraded == Degraded("after", 30.0)
    assert isinstance(crypt, CryptLayer) and crypt.raw_key and crypt.key_format == "binary"
    assert crypt.key == "passphrase" and crypt.key_size == 128
    assert isinstance(mount, MountLayer) and mount.mountpoint == "/mnt/raid5crypt"
    assert config.trust.signers == ("0123456789ABCDEF0123456789ABCDEF01234567",)
    assert config.trust.gnupghome == "/var/lib/keyd/gnupg"


def test_empty_file_gives_defaults() -> None:
    config = parse("")
    assert config.volumes == ()
    assert config.trust.signers == () and config.trust.gnupghome == "/etc/keyd/gnupg"


def test_loop_in_ntfs_in_truecrypt_orders_layers_and_defaults_key_name() -> None:
    config = parse("""
        [volume.work.layer.root]
        kind = "mount"
        below = ["img"]
        fstype = "ext3"
        mountpoint = "/mnt/root"
        [volume.work.layer.img]
        kind = "loop"
        below = ["ntfs"]
        image = "rootfs"
        [volume.work.layer.ntfs]
        kind = "mount"
        below = ["tc"]
        fstype = "ntfs-3g"
        mountpoint = "/media/winroot"
        [volume.work.layer.tc]
        kind = "crypt"
        type = "tcrypt"
        device = "PARTUUID=1234-02"
        hidden = false
    """)
    volume = config.volume("work")
    assert [layer.name for layer in volume.layers] == ["tc", "ntfs", "img", "root"]
    tc = volume.layer("tc")
    assert isinstance(tc, CryptLayer)
    assert tc.device == "/dev/disk/by-partuuid/1234-02"
    assert tc.key == "tc" and tc.key_format == "passphrase"
    img = volume.layer("img")
    assert isinstance(img, LoopLayer) and img.image == "rootfs"
    assert [u.name for u in volume.uppers("ntfs")] == ["img"]


def test_veracrypt_with_pim_and_pinned_prf() -> None:
    config = parse(configs.veracrypt_ext4("/dev/disk/by-id/usb-disk", prf="sha512", pim=485,
                                          volume="v", mountpoint="/srv/v"))
    vc = config.volume("v").layer("vc")
    assert isinstance(vc, CryptLayer) and vc.pim == 485 and vc.hash == "sha512"


def test_truecrypt_cipher_pin_names_a_cipher_chain() -> None:
    config = parse(configs.crypt_layer("v", "tc", {**configs.TCRYPT, "cipher": "serpent-twofish-aes"},
                                       device="/dev/disk/by-id/usb-disk"))
    tc = config.volume("v").layer("tc")
    assert isinstance(tc, CryptLayer) and tc.cipher == "serpent-twofish-aes"


def test_crypt_backend_defaults_to_auto_and_takes_kernel_or_userspace() -> None:
    device = "/dev/disk/by-id/usb-disk"
    tc = parse(configs.crypt_layer("v", "tc", configs.TCRYPT, device=device)).volume("v").layer("tc")
    assert isinstance(tc, CryptLayer) and tc.backend == "auto"
    for backend in ("kernel", "userspace"):
        layer = parse(configs.crypt_layer("v", "p", {**configs.PLAIN_2006, "backend": backend},
                                          device=device)).volume("v").layer("p")
        assert isinstance(layer, CryptLayer) and layer.backend == backend


def test_luks_type_aliases_and_plain_hashed_passphrase() -> None:
    config = parse(configs.crypt_mount("a", "UUID=0b0b", {"type": "luks2"}, names=("c", "m"),
                                       fstype="ext4", mountpoint="/a")
                   + configs.crypt_layer("b", "c", configs.PLAIN_2004, device="/dev/sdb2"))
    luks = config.volume("a").layer("c")
    assert isinstance(luks, CryptLayer) and luks.type == "luks"
    plain = config.volume("b").layer("c")
    assert isinstance(plain, CryptLayer) and not plain.raw_key
    assert plain.key_format == "passphrase"


def test_unknown_volume_names_the_configured_ones() -> None:
    config = parse(RAID5_PLAIN_XFS)
    with pytest.raises(ConfigError) as info:
        config.volume("nope")
    assert "tank" in str(info.value) and info.value.exit_code == 3


def test_unknown_key_is_an_error_with_line_key_path_and_suggestion() -> None:
    error = error_of(RAID5_PLAIN_XFS.replace('cipher = "aes-cbc-plain"',
                                             'cipher = "aes-cbc-plain"\nciphr = "x"'))
    assert error.key == "volume.tank.layer.crypt0.ciphr"
    assert error.line == RAID5_PLAIN_XFS.splitlines().index('cipher = "aes-cbc-plain"') + 2
    assert "did you mean 'cipher'" in str(error)
    assert error.file == "keyd.toml"


def test_toml_syntax_error_reports_its_line() -> None:
    error = error_of('[volume.a]\nservices = [\n  "x.service"\nbad line\n')
    assert error.line is not None and "not valid TOML" in error.problem


@pytest.mark.parametrize(("text", "key", "words"), [
    ("[foo]\n", "foo", "unknown table"),
    ("volume = 3\n", "volume", "must be a table"),
    ("[volume]\nTank = {}\n", "volume.Tank", "not allowed"),
    ("[volume]\ntank = 3\n", "volume.tank", "must be a table"),
    ("[volume.tank]\n", "volume.tank", "no layers"),
    ("[volume.tank]\nservices = ['smbd']\n", "volume.tank.services", "unit name"),
    ("[volume.tank]\nservices = [1]\n", "volume.tank.services", "only strings"),
    ("[volume.tank]\nservices = 'a.service'\n", "volume.tank.services", "list of strings"),
    ("[volume.tank.layer]\nX = {}\n", "volume.tank.layer.X", "not allowed"),
    ("[volume.tank.layer]\nx = 1\n", "volume.tank.layer.x", "must be a table"),
    ("[volume.tank.layer.x]\n", "volume.tank.layer.x", "missing required key 'kind'"),
    ("[volume.tank.layer.x]\nkind = 'zfs'\n", "volume.tank.layer.x", "name or its GUID"),
    ("[volume.tank.layer.x]\nkind = 'lvm'\n", "volume.tank.layer.x.kind", "not a layer kind"),
    ("[volume.tank.layer.x]\nkind = 3\n", "volume.tank.layer.x.kind", "must be a string"),
    ("[trust]\nsigners = ['ABCD']\n", "trust.signers", "fingerprint"),
    ("[trust]\ngnupghome = 'rel/dir'\n", "trust.gnupghome", "absolute"),
    ("[trust]\nrevocations = 'revoked.toml'\n", "trust.revocations", "absolute"),
    ("[trust]\nsignerz = []\n", "trust.signerz", "unknown key"),
])
def test_structural_errors(text: str, key: str, words: str) -> None:
    error = error_of(text)
    assert error.key == key
    assert words in error.problem
    assert error.fix


def layer_error(body: str, extra: str = "") -> ConfigError:
    return error_of(f"[volume.v.layer.x]\n{body}\n{extra}")


@pytest.mark.parametrize(("body", "key", "words"), [
    ("kind='raid'\nuuid='nope'", "uuid", "not an md array UUID"),
    ("kind='raid'\nuuid='6b8b4567327b23c6643c986966334873'\ndegraded='sometimes'",
     "degraded", "not a policy"),
    ("kind='raid'\nuuid='6b8b4567327b23c6643c986966334873'\ndevices=['sdb']", "devices",
     "not a device path"),
    ("kind='crypt'\ntype='bitlk'\ndevice='/dev/sdb'", "type", "not a crypt type"),
    ("kind='crypt'\ntype='luks'", "x", "exactly one of device or below"),
    ("kind='crypt'\ntype='luks'\ndevice='sdb'", "device", "not a device path"),
    ("kind='crypt'\ntype='luks'\ndevice='/dev/sdb'\ncipher='aes'", "cipher", "LUKS keeps"),
    ("kind='crypt'\ntype='luks'\ndevice='/dev/sdb'\npim=3", "pim", "TrueCrypt/VeraCrypt"),
    ("kind='crypt'\ntype='luks'\ndevice='/dev/sdb'\nkey='Bad Name'", "key", "not a key name"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\nkey_size=128", "x", "needs cipher"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'", "x", "needs key_size"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=129", "key_size",
     "whole number of bytes"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=4",
     "key_size", "out of range"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=128\n"
     "hash='sha256'\nkeyfile_offset=3", "keyfile_offset", "raw keys"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=128\n"
     "sector_size=8192", "sector_size", "not supported"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=128\n"
     "hidden=true", "hidden", "TrueCrypt/VeraCrypt options"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=128\n"
     "readonly='yes'", "readonly", "true or false"),
    ("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\nkey_size=true",
     "key_size", "an integer"),
    ("kind='crypt'\ntype='tcrypt'\ndevice='/dev/sdb'\npim=5", "pim", "VeraCrypt feature"),
    ("kind='crypt'\ntype='tcrypt'\ndevice='/dev/sdb'\nkey_size=256", "key_size", "header"),
    ("kind='crypt'\ntype='tcrypt'\ndevice='/dev/sdb'\nhash='md5'", "hash", "not a TrueCrypt"),
    ("kind='crypt'\ntype='veracrypt'\ndevice='/dev/sdb'\ncipher='aes-xts-plain64'", "cipher",
     "not a TrueCrypt/VeraCrypt cipher chain"),
    ("kind='crypt'\ntype='tcrypt'\ndevice='/dev/sdb'\nkey_format='binary'", "key_format",
     "passphrase"),
    ("kind='crypt'\ntype='luks'\ndevice='/dev/sdb'\nkey_format='hex'", "key_format",
     "not one of"),
    ("kind='crypt'\ntype='luks'\ndevice='/dev/sdb'\nbackend='userspace'", "backend",
     "dm-crypt only"),
    ("kind='crypt'\ntype='tcrypt'\ndevice='/dev/sdb'\nbackend='fuse'", "backend", "not one of"),
    ("kind='loop'\nimage='/abs/rootfs'\nbelow=['m']", "image", "inside the layer below"),
    ("kind='mount'\nfstype='ext4'\nmountpoint='mnt/x'\ndevice='/dev/sdb'", "mountpoint",
     "absolute"),
    ("kind='mount'\nfstype='ext4'\nmountpoint='/../x'\ndevice='/dev/sdb'", "mountpoint",
     "absolute"),
    ("kind='mount'\nfstype='ext4'\nmountpoint='/x'\ndevice='/dev/sdb'\noptions=['a,b']",
     "options", "own list item"),
    ("kind='mount'\nfstype='ext4'\nmountpoint='/x'", "x", "exactly one of device or below"),
    ("kind='mount'\nfstype='ext4'\nmountpoint='/x'\nbelow=['Bad']", "below",
     "not a layer name"),
])
def test_layer_field_errors(body: str, key: str, words: str) -> None:
    error = layer_error(body)
    assert error.key.endswith("." + key) or error.key == f"volume.v.layer.{key}"
    assert words in error.problem
    assert error.line is not None


def test_error_message_names_file_line_key_and_fix() -> None:
    error = layer_error("kind='crypt'\ntype='plain'\ndevice='/dev/sdb'\ncipher='aes'\n"
                        "key_size=129")
    assert str(error).startswith("keyd.toml:6 [volume.v.layer.x.key_size]: ")
    assert "fix: " in str(error)


MOUNT_ON = "[volume.v.layer.{name}]\nkind='mount'\nfstype='ext4'\nmountpoint='/{name}'\n" \
           "below=[{below}]\n"
CRYPT_ON = "[volume.v.layer.{name}]\nkind='crypt'\ntype='luks'\nbelow=[{below}]\n"
RAID = "[volume.v.layer.{name}]\nkind='raid'\nuuid='{uuid}'\n"
UUID_A = "6b8b4567327b23c6643c986966334873"
UUID_B = "7b8b4567327b23c6643c986966334873"


@pytest.mark.parametrize(("text", "words"), [
    (MOUNT_ON.format(name="m", below="'ghost'"), "not a layer of volume"),
    (CRYPT_ON.format(name="a", below="'b'") + CRYPT_ON.format(name="b", below="'a'"),
     "cycle"),
    (CRYPT_ON.format(name="a", below="'a'"), "cycle"),
    (RAID.format(name="r", uuid=UUID_A) + RAID.format(name="s", uuid=UUID_B),
     "exactly one top layer"),
    (RAID.format(name="r", uuid=UUID_A) + CRYPT_ON.format(name="a", below="'r'")
     + CRYPT_ON.format(name="b", below="'r'"), "already used by"),
    (RAID.format(name="r", uuid=UUID_A) + MOUNT_ON.format(name="m", below="'r'")
     + MOUNT_ON.format(name="n", below="'m'"), "cannot sit on mount"),
    (RAID.format(name="r", uuid=UUID_A) + "[volume.v.layer.l]\nkind='loop'\nimage='i'\n"
     "below=['r']\n", "cannot sit on raid"),
    (RAID.format(name="r", uuid=UUID_A) + RAID.format(name="s", uuid=UUID_B)
     + "[volume.v.layer.m]\nkind='mount'\nfstype='x'\nmountpoint='/m'\nbelow=['r','s']\n",
     "at most 1"),
    ("[volume.v.layer.l]\nkind='loop'\nimage='i'\nbelow=[]\n", "exactly one layer"),
    (RAID.format(name="r", uuid=UUID_A) + "below=['x']\n", "cannot sit on other layers"),
    ("[volume.v.layer.tc]\nkind='crypt'\ntype='tcrypt'\ndevice='/dev/sdb'\n"
     + CRYPT_ON.format(name="tc_1", below="'tc'"), "clashes with cryptsetup"),
])
def test_graph_errors(text: str, words: str) -> None:
    assert words in error_of(text).problem


LUKS_ON_SDB = "[volume.{v}.layer.c]\nkind='crypt'\ntype='luks'\ndevice='/dev/sdb'\n"
MOUNT_AT_A = "[volume.{v}.layer.m]\nkind='mount'\nfstype='x'\nmountpoint='/a'\ndevice='/dev/{d}'\n"


@pytest.mark.parametrize(("first", "second", "words"), [
    (RAID.format(name="r", uuid=UUID_A),
     RAID.format(name="r", uuid=UUID_A).replace("volume.v", "volume.w"), "uuid"),
    (MOUNT_AT_A.format(v="v", d="sdy"), MOUNT_AT_A.format(v="w", d="sdz"), "mountpoint"),
    (LUKS_ON_SDB.format(v="v"), LUKS_ON_SDB.format(v="w"), "device"),
    (RAID.format(name="r", uuid=UUID_A) + "devices=['/dev/sdc']\n",
     RAID.format(name="r", uuid=UUID_B).replace("volume.v", "volume.w")
     + "devices=['/dev/sdc']\n", "devices"),
])
def test_two_layers_cannot_claim_the_same_thing(first: str, second: str, words: str) -> None:
    error = error_of(first + second)
    assert words in error.problem and "also used by volume.v" in error.problem


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keyd.toml"
    path.write_text(RAID5_PLAIN_XFS)
    assert load_config(path).volume("tank").top == "data"


@pytest.mark.parametrize(("content", "words"), [
    (None, "does not exist"), (b"\xff\xfe", "not UTF-8")])
def test_load_config_file_problems(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "keyd.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert words in info.value.problem


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory cannot be read as a file
    assert "cannot read" in info.value.problem
