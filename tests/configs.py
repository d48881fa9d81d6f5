"""The storage stacks the tests configure, each written once as keyd.toml text.

The five seeds and the RAID1 + LUKS2 + ext4 stack of docs/keyd.toml.5.md (EXAMPLES),
built from four stack shapes: a crypt layer on a device with a filesystem in it, the
same on an md array, an image file in a filesystem, and a ZFS pool on crypt layers.
The parameters are what differs between tests: devices, UUIDs, the volume's name,
mountpoints, the degraded policy, and layer names where a test asserts on its own.
Layer names, keys and paths default to the documented examples. A deliberately broken
or unusual config (an error case) stays in its test, next to what it checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

Value = str | int | bool | Sequence[str]
# A crypt layer's own keys: everything but where it sits (device or below). None: left out.
Crypt = Mapping[str, Value | None]

LUKS: Crypt = {"type": "luks"}
TCRYPT: Crypt = {"type": "tcrypt"}
# Seed 001, `cryptsetup create --key-file FILE --key-size 128` of cryptsetup 1.0 (2006):
# cipher "aes" is the kernel's aes-cbc-plain, and the file's first 16 bytes are the key, unhashed.
PLAIN_2006: Crypt = {"type": "plain", "cipher": "aes-cbc-plain", "key_size": 128}
# Seed 004, `cryptsetup -c aes -h ripemd160 create` (2004): a 256-bit key hashed from the passphrase.
PLAIN_2004: Crypt = {"type": "plain", "cipher": "aes-cbc-plain", "key_size": 256,
                     "hash": "ripemd160"}


def toml_value(value: Value) -> str:
    """``value`` as TOML: a boolean, an integer, a basic string or a list of strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are TOML's
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def table(name: str, **keys: Value | None) -> str:
    """``[name]`` and one line per key, in the order given; keys given as None are left out."""
    lines = [f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in keys.items()
                             if value is not None]
    return "\n".join(lines) + "\n\n"


def trust_header(signers: Sequence[str] | None = None, *, gnupghome: str | Path | None = None,
                 revocations: str | Path | None = None) -> str:
    """``[trust]``: the pinned signers, keyd's GnuPG home and its revocation list."""
    paths = {key: str(path) for key, path in (("gnupghome", gnupghome), ("revocations", revocations))
             if path is not None}
    return table("trust", signers=signers, **paths)


def volume_table(volume: str, *, services: Sequence[str] | None = None,
                 description: str | None = None,
                 policy: Mapping[str, Value] | None = None, boot: str | None = None) -> str:
    """``[volume.VOLUME]`` with the volume's own keys (``policy``: its daemon keys), or nothing
    when it has none."""
    if services is None and description is None and not policy and boot is None:
        return ""
    return table(f"volume.{volume}", services=services, description=description, boot=boot,
                 **(policy or {}))


def layer(volume: str, name: str, kind: str, **keys: Value | None) -> str:
    """``[volume.VOLUME.layer.NAME]`` of that kind."""
    return table(f"volume.{volume}.layer.{name}", kind=kind, **keys)


def crypt_layer(volume: str, name: str, crypt: Crypt, **where: Value | None) -> str:
    """A crypt layer: its type, where it sits (``device=`` or ``below=``), then its other keys."""
    return layer(volume, name, "crypt", **{"type": crypt["type"], **where, **crypt})


def crypt_mount(volume: str, device: str, crypt: Crypt, *, fstype: str, mountpoint: str,
                names: tuple[str, str] = ("crypt", "data"), options: Sequence[str] | None = None,
                services: Sequence[str] | None = None, description: str | None = None,
                policy: Mapping[str, Value] | None = None, boot: str | None = None) -> str:
    """A crypt layer on ``device`` and a filesystem in it."""
    encrypted, filesystem = names
    return (volume_table(volume, services=services, description=description, policy=policy,
                         boot=boot)
            + crypt_layer(volume, encrypted, crypt, device=device)
            + layer(volume, filesystem, "mount", below=[encrypted], fstype=fstype,
                    mountpoint=mountpoint, options=options))


def raid_crypt_mount(volume: str, uuid: str, crypt: Crypt, *, fstype: str, mountpoint: str,
                     names: tuple[str, str, str] = ("md0", "crypt", "data"),
                     degraded: str | None = None, devices: Sequence[str] | None = None,
                     options: Sequence[str] | None = None, services: Sequence[str] | None = None,
                     description: str | None = None) -> str:
    """An md array (by ``uuid``), a crypt layer on it and a filesystem in that."""
    array, encrypted, filesystem = names
    return (volume_table(volume, services=services, description=description)
            + layer(volume, array, "raid", uuid=uuid, degraded=degraded, devices=devices)
            + crypt_layer(volume, encrypted, crypt, below=[array])
            + layer(volume, filesystem, "mount", below=[encrypted], fstype=fstype,
                    mountpoint=mountpoint, options=options))


def image_mount(volume: str, below: str, *, mountpoint: str, image: str = "rootfs",
                fstype: str = "ext3", names: tuple[str, str] = ("img", "root")) -> str:
    """The image file ``image`` of the filesystem layer ``below`` on a loop device, mounted."""
    loop, filesystem = names
    return (layer(volume, loop, "loop", below=[below], image=image)
            + layer(volume, filesystem, "mount", below=[loop], fstype=fstype,
                    mountpoint=mountpoint))


def crypt_layers(volume: str, devices: Mapping[str, str], crypt: Crypt = TCRYPT,
                 keys: Mapping[str, str] | None = None) -> str:
    """One crypt layer per entry of ``devices`` (layer name -> device), keyed as ``keys`` says."""
    return "".join(crypt_layer(volume, name, crypt, device=device, key=(keys or {}).get(name))
                   for name, device in devices.items())


def zfs_on_crypt(volume: str, devices: Mapping[str, str], *, pool: str, crypt: Crypt = TCRYPT,
                 keys: Mapping[str, str] | None = None, degraded: str | None = None,
                 services: Sequence[str] | None = None, description: str | None = None,
                 policy: Mapping[str, Value] | None = None) -> str:
    """The ZFS pool ``pool`` (layer ``pool``) on one crypt layer per device (name -> device)."""
    return (volume_table(volume, services=services, description=description, policy=policy)
            + crypt_layers(volume, devices, crypt, keys)
            + layer(volume, "pool", "zfs", below=list(devices), pool=pool, degraded=degraded))


def seed_000(device: str, *, volume: str = "nas", mountpoint: str = "/srv/nas",
             services: Sequence[str] | None = None, description: str | None = None) -> str:
    """Seed 000: TrueCrypt (on a 4 KiB-sector disk) with ext4 inside; layers tc -> media."""
    return crypt_mount(volume, device, TCRYPT, names=("tc", "media"), fstype="ext4",
                       mountpoint=mountpoint, services=services, description=description)


def veracrypt_ext4(device: str, *, prf: str, pim: int, volume: str = "vault",
                   mountpoint: str = "/srv/vault") -> str:
    """VeraCrypt with its PRF (``hash``) and PIM pinned, ext4 inside; layers vc -> fs."""
    crypt: Crypt = {"type": "veracrypt", "hash": prf, "pim": pim}
    return crypt_mount(volume, device, crypt, names=("vc", "fs"), fstype="ext4",
                       mountpoint=mountpoint)


def seed_001(uuid: str, *, volume: str = "raid5", degraded: str = "after=30",
             key: str | None = "passphrase", mountpoint: str = "/mnt/raid5crypt",
             crypt_name: str = "crypt", options: Sequence[str] | None = None,
             services: Sequence[str] | None = None, description: str | None = None) -> str:
    """Seed 001: RAID5 -> plain dm-crypt keyed by a file (2006) -> XFS; layers md0 -> crypt -> data.

    ``crypt_name`` names the crypt layer, ``key`` its secret (None: the layer's name).
    """
    return raid_crypt_mount(volume, uuid, {**PLAIN_2006, "key": key}, fstype="xfs",
                            mountpoint=mountpoint, names=("md0", crypt_name, "data"),
                            degraded=degraded, options=options, services=services,
                            description=description)


def seed_002(disk1: str, disk2: str, *, volume: str = "secretpool",
             keys: tuple[str, str] = ("secretpool", "secretpool"), degraded: str = "always",
             services: Sequence[str] | None = None, description: str | None = None,
             policy: Mapping[str, Value] | None = None) -> str:
    """Seed 002: the ZFS mirror secretpool on two TrueCrypt volumes; layers tc1, tc2 -> pool."""
    return zfs_on_crypt(volume, {"tc1": disk1, "tc2": disk2}, pool="secretpool",
                        keys={"tc1": keys[0], "tc2": keys[1]}, degraded=degraded,
                        services=services, description=description, policy=policy)


def seed_003(device: str, *, volume: str = "work", ntfs: str = "/media/winroot",
             root: str = "/srv/debian", description: str | None = None,
             policy: Mapping[str, Value] | None = None) -> str:
    """Seed 003: TrueCrypt -> NTFS (ntfs-3g) -> an ext3 image; layers tc -> ntfs -> img -> root.
    With ``root = "/"`` the image is the root file system (boot = "root"), as in the seed."""
    return (crypt_mount(volume, device, TCRYPT, names=("tc", "ntfs"), fstype="ntfs-3g",
                        mountpoint=ntfs, description=description, policy=policy,
                        boot="root" if root == "/" else None)
            + image_mount(volume, "ntfs", mountpoint=root))


def seed_004(device: str, *, volume: str = "cryptvol1", mountpoint: str = "/data",
             description: str | None = None) -> str:
    """Seed 004: plain dm-crypt, passphrase hashed with ripemd160 (2004), ext3; layers c -> data."""
    return crypt_mount(volume, device, PLAIN_2004, names=("c", "data"), fstype="ext3",
                       mountpoint=mountpoint, description=description)


def luks_on_raid(uuid: str, *, volume: str = "home", md_name: str = "md", fstype: str = "ext4",
                 mountpoint: str = "/home", degraded: str | None = None,
                 options: Sequence[str] | None = None, description: str | None = None) -> str:
    """The modern default, RAID1 -> LUKS2 -> ext4; layers md (``md_name``) -> luks -> fs."""
    return raid_crypt_mount(volume, uuid, LUKS, fstype=fstype, mountpoint=mountpoint,
                            names=(md_name, "luks", "fs"), degraded=degraded, options=options,
                            description=description)
