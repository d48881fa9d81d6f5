"""Field parsers for each layer kind: one function per kind, registered in PARSERS.

Each parser reads a :class:`~keyd.config.fields.Table` into a frozen layer and
checks the fields that only make sense together (plain needs a cipher and a
key size; LUKS keeps its cipher in its header; ...). Graph-wide checks live in
:mod:`keyd.config.graph`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from keyd.config.fields import Table
from keyd.config.model import (
    CryptBackend,
    CryptLayer,
    CryptType,
    Degraded,
    KeyFormat,
    Layer,
    LoopLayer,
    MountLayer,
    RaidLayer,
    ZfsDegradedMode,
    ZfsLayer,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")
NAME_RULE = "1-32 characters: lower-case letters, digits and '_', starting with a letter or digit"
_UUID_HEX = re.compile(r"^[0-9a-f]{32}$")
_DEGRADED_AFTER = re.compile(r"^after\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*s?$")
_SECTOR_SIZES = (512, 1024, 2048, 4096)
_DEVICE_PREFIXES = {"UUID=": "/dev/disk/by-uuid/", "PARTUUID=": "/dev/disk/by-partuuid/",
                    "LABEL=": "/dev/disk/by-label/", "ID=": "/dev/disk/by-id/"}
CRYPT_TYPES: tuple[CryptType, ...] = ("luks", "plain", "tcrypt", "veracrypt")
CRYPT_BACKENDS: tuple[CryptBackend, ...] = ("auto", "kernel", "userspace")
TCRYPT_HASHES = ("sha512", "sha256", "whirlpool", "ripemd160", "streebog")
# The block ciphers of TrueCrypt/VeraCrypt cipher chains (cryptsetup lib/tcrypt/tcrypt.c);
# a pin such as "serpent-twofish-aes" names a chain, never a mode ("xts-plain64").
TCRYPT_CIPHERS = ("aes", "serpent", "twofish", "camellia", "kuznyechik", "blowfish_le", "cast5",
                  "des3_ede")
PLANNED_KINDS: dict[str, str] = {}
# zpool(8): a letter first, then letters, digits and _-.: ; some words name vdev types instead.
_POOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,254}$")
_POOL_RESERVED = re.compile(r"^(mirror|raidz|draid|spare|log|c[0-9])")
_POOL_GUID = re.compile(r"^[0-9]{1,20}$")


def normalize_uuid(text: str) -> str | None:
    """An md/fs UUID in any common spelling as 32 lower-case hex digits, or None."""
    digits = re.sub(r"[-:\s]", "", text).lower()
    return digits if _UUID_HEX.match(digits) else None


def md_uuid(hex32: str) -> str:
    """32 hex digits in mdadm's spelling (four colon-separated words)."""
    return ":".join(hex32[i:i + 8] for i in range(0, 32, 8))


def device_path(table: Table, key: str = "device") -> str | None:
    """A device given as an absolute path or as UUID=/PARTUUID=/LABEL=/ID=; None if absent."""
    text = table.text(key)
    if text is None:
        return None
    for prefix, directory in _DEVICE_PREFIXES.items():
        if text.startswith(prefix) and len(text) > len(prefix) and "/" not in text[len(prefix):]:
            return directory + text[len(prefix):]
    if not text.startswith("/dev/") or "/../" in text or text.endswith("/"):
        raise table.error(key, f"{key} = {text!r} is not a device path",
                          "use a stable path such as /dev/disk/by-id/... or UUID=<uuid>")
    return text


def _below(table: Table) -> tuple[str, ...]:
    below = table.text_list("below")
    for name in below:
        if not NAME.match(name):
            raise table.error("below", f"below names {name!r}, which is not a layer name",
                              f"layer names are {NAME_RULE}")
    return below


def _degraded(table: Table) -> Degraded:
    text = table.text("degraded")
    if text is None or text in ("never", "always"):
        return Degraded("always") if text == "always" else Degraded()
    match = _DEGRADED_AFTER.match(text)
    if match is None:
        raise table.error("degraded", f"degraded = {text!r} is not a policy",
                          'use "never", "always" or "after=SECONDS" (e.g. "after=30")')
    return Degraded("after", float(match.group(1)))


def parse_raid(name: str, table: Table) -> RaidLayer:
    """``kind = "raid"``: uuid, degraded policy, optional member device list."""
    uuid_text = table.req_text("uuid")
    uuid = normalize_uuid(uuid_text)
    if uuid is None:
        raise table.error("uuid", f"uuid = {uuid_text!r} is not an md array UUID",
                          "copy the UUID from `mdadm --detail --export /dev/mdX` (MD_UUID)")
    devices = tuple(_member(table, path) for path in table.text_list("devices"))
    if _below(table):
        raise table.error("below", "a raid layer cannot sit on other layers yet",
                          "list the member disks with devices = [...] or let keyd find them")
    return RaidLayer(name=name, uuid=uuid, degraded=_degraded(table), devices=devices)


def _member(table: Table, path: str) -> str:
    if not path.startswith("/dev/"):
        raise table.error("devices", f"member {path!r} is not a device path",
                          "use paths like /dev/disk/by-id/ata-...-part1")
    return path


def parse_crypt(name: str, table: Table) -> CryptLayer:
    """``kind = "crypt"``: type, device or below, key naming and the type's parameters."""
    ctype: CryptType = _crypt_type(table)
    layer = CryptLayer(
        name=name, type=ctype, key=_key_name(table, name), key_format="passphrase",
        device=device_path(table), below=_below(table), cipher=table.text("cipher"),
        key_size=table.integer("key_size", minimum=8, maximum=4096),
        hash=table.text("hash"), offset=table.integer("offset") or 0,
        skip=table.integer("skip") or 0, sector_size=table.integer("sector_size"),
        keyfile_offset=table.integer("keyfile_offset") or 0,
        iv_large_sectors=table.flag("iv_large_sectors"), hidden=table.flag("hidden"),
        system=table.flag("system"), backup_header=table.flag("backup_header"),
        pim=table.integer("pim", maximum=2**31 - 1), readonly=table.flag("readonly"),
        allow_discards=table.flag("allow_discards"), backend=_backend(table))
    layer = replace(layer, key_format=_key_format(table, layer))
    _CRYPT_CHECKS[ctype](table, layer)
    _check_common_crypt(table, layer)
    return layer


def _backend(table: Table) -> CryptBackend:
    text = table.choice("backend", CRYPT_BACKENDS, "auto")
    return next(backend for backend in CRYPT_BACKENDS if backend == text)


def _crypt_type(table: Table) -> CryptType:
    text = table.req_text("type")
    for ctype in CRYPT_TYPES:
        if text == ctype:
            return ctype
    if text in ("luks1", "luks2"):
        return "luks"
    raise table.error("type", f"type = {text!r} is not a crypt type",
                      f"use one of: {', '.join(CRYPT_TYPES)}")


def _key_name(table: Table, default: str) -> str:
    key = table.text("key")
    if key is None:
        return default
    if not NAME.match(key):
        raise table.error("key", f"key = {key!r} is not a key name", f"key names are {NAME_RULE}")
    return key


def _key_format(table: Table, layer: CryptLayer) -> KeyFormat:
    default = "binary" if layer.raw_key else "passphrase"
    text = table.choice("key_format", ("passphrase", "binary"), default)
    fmt: KeyFormat = "binary" if text == "binary" else "passphrase"
    if fmt == "binary" and layer.type in ("tcrypt", "veracrypt"):
        raise table.error("key_format", "TrueCrypt/VeraCrypt volumes are opened with a passphrase",
                          'remove key_format or set it to "passphrase"')
    return fmt


def _reject(table: Table, layer: CryptLayer, keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        if key in table.data:
            raise table.error(key, f"{key} does not apply to type = {layer.type!r}: {why}",
                              f"remove {key}")


def _check_luks(table: Table, layer: CryptLayer) -> None:
    if layer.backend == "userspace":
        raise table.error("backend", "LUKS volumes are opened by dm-crypt only",
                          'remove backend (or set it to "kernel"); keyd\'s userspace crypto '
                          "reads TrueCrypt, VeraCrypt and plain volumes")
    _reject(table, layer, ("cipher", "key_size", "hash", "offset", "skip", "sector_size",
                           "iv_large_sectors", "keyfile_offset"),
            "LUKS keeps its parameters in its header")
    _reject(table, layer, ("hidden", "system", "backup_header", "pim"),
            "these are TrueCrypt/VeraCrypt options")


def _check_plain(table: Table, layer: CryptLayer) -> None:
    _reject(table, layer, ("hidden", "system", "backup_header", "pim"),
            "these are TrueCrypt/VeraCrypt options")
    if layer.cipher is None or layer.key_size is None:
        missing = "cipher" if layer.cipher is None else "key_size"
        raise table.error(None, f"plain mode needs {missing}: cryptsetup's defaults changed "
                                "over the years, so keyd never relies on them",
                          f'add {missing} (e.g. cipher = "aes-cbc-essiv:sha256", key_size = 256)')
    if layer.key_size % 8:
        raise table.error("key_size", f"key_size = {layer.key_size} is not a whole number of bytes",
                          "key_size is in bits and must be a multiple of 8")
    if layer.keyfile_offset and not layer.raw_key:
        raise table.error("keyfile_offset", "keyfile_offset only applies to raw keys (no hash)",
                          "remove keyfile_offset or the hash")


def _check_tcrypt(table: Table, layer: CryptLayer) -> None:
    _reject(table, layer, ("key_size", "offset", "skip", "sector_size", "iv_large_sectors",
                           "keyfile_offset"), "the TrueCrypt header holds them")
    if layer.type == "tcrypt":
        _reject(table, layer, ("pim",), 'PIM is a VeraCrypt feature; use type = "veracrypt"')
    if layer.hash is not None and layer.hash not in TCRYPT_HASHES:
        raise table.error("hash", f"hash = {layer.hash!r} is not a TrueCrypt/VeraCrypt PRF",
                          f"use one of: {', '.join(TCRYPT_HASHES)}")
    if layer.cipher is not None and not set(layer.cipher.split("-")) <= set(TCRYPT_CIPHERS):
        raise table.error("cipher", f"cipher = {layer.cipher!r} is not a TrueCrypt/VeraCrypt "
                                    "cipher chain (the header fixes the mode)",
                          'name the chain only, e.g. "aes" or "serpent-twofish-aes", built '
                          f"from: {', '.join(TCRYPT_CIPHERS)}")


def _check_common_crypt(table: Table, layer: CryptLayer) -> None:
    if (layer.device is None) == (not layer.below):
        raise table.error(None, "a crypt layer needs exactly one of device or below",
                          'set device = "/dev/disk/by-id/..." or below = ["<layer>"]')
    if layer.sector_size is not None and layer.sector_size not in _SECTOR_SIZES:
        raise table.error("sector_size", f"sector_size = {layer.sector_size} is not supported",
                          f"use one of: {', '.join(map(str, _SECTOR_SIZES))}")


_CRYPT_CHECKS: dict[str, Callable[[Table, CryptLayer], None]] = {
    "luks": _check_luks, "plain": _check_plain, "tcrypt": _check_tcrypt,
    "veracrypt": _check_tcrypt}


def parse_loop(name: str, table: Table) -> LoopLayer:
    """``kind = "loop"``: an image path inside the mount layer below."""
    image = table.req_text("image")
    parts = image.split("/")
    if image.startswith("/") or ".." in parts or not image.strip("/"):
        raise table.error("image", f"image = {image!r} must be a path inside the layer below",
                          'give it relative to that mountpoint, e.g. image = "rootfs"')
    return LoopLayer(name=name, image=image, below=_below(table),
                     read_only=table.flag("read_only"))


def parse_mount(name: str, table: Table) -> MountLayer:
    """``kind = "mount"``: fstype, absolute mountpoint, options; device or below."""
    mountpoint = table.req_text("mountpoint")
    if not mountpoint.startswith("/") or ".." in mountpoint.split("/"):
        raise table.error("mountpoint", f"mountpoint {mountpoint!r} is not an absolute path",
                          'use an absolute directory such as "/srv/tank"')
    options = table.text_list("options")
    if any("," in option or not option for option in options):
        raise table.error("options", "each mount option is its own list item",
                          'write options = ["noatime", "nodev"], not "noatime,nodev"')
    layer = MountLayer(name=name, fstype=table.req_text("fstype"),
                       mountpoint=mountpoint.rstrip("/") or "/", options=options,
                       device=device_path(table), below=_below(table))
    if (layer.device is None) == (not layer.below):
        raise table.error(None, "a mount layer needs exactly one of device or below",
                          'set below = ["<layer>"] (or device = "/dev/...")')
    return layer


def parse_zfs(name: str, table: Table) -> ZfsLayer:
    """``kind = "zfs"``: pool and/or guid, below (crypt layers), import options, degraded."""
    if "mountpoint" in table.data:
        raise table.error("mountpoint", "a zfs layer has no mountpoint: each dataset carries "
                                        "its own mountpoint property",
                          'remove it; set altroot = "/mnt/x" to import the pool under a '
                          "directory, or `zfs set mountpoint=... POOL/DATASET` once")
    layer = ZfsLayer(name=name, pool=_pool_name(table), below=_below(table),
                     guid=_pool_guid(table),
                     search_dir=_zfs_dir(table, "search_dir") or "/dev/mapper",
                     altroot=_zfs_dir(table, "altroot"), read_only=table.flag("read_only"),
                     mount=table.flag("mount", True), degraded=_zfs_degraded(table))
    if layer.pool is None and layer.guid is None:
        raise table.error(None, "a zfs layer needs the pool's name or its GUID",
                          'add pool = "<name>" (and guid = "<zpool get -H -o value guid>" '
                          "when names clash)")
    if not layer.below:
        raise table.error("below", "a zfs layer imports its pool from the crypt layers below it",
                          'list them: below = ["tc1", "tc2"]')
    return layer


def _pool_name(table: Table) -> str | None:
    pool = table.text("pool")
    if pool is not None and (not _POOL_NAME.match(pool) or _POOL_RESERVED.match(pool)):
        raise table.error("pool", f"pool = {pool!r} is not a ZFS pool name",
                          "pool names start with a letter, use letters, digits and _-.: and "
                          "do not start with mirror, raidz, draid, spare, log or c<digit>")
    return pool


def _pool_guid(table: Table) -> str | None:
    guid = table.text("guid")
    if guid is not None and not (_POOL_GUID.match(guid) and int(guid) < 2**64):
        raise table.error("guid", f"guid = {guid!r} is not a pool GUID",
                          'write the decimal number in quotes, e.g. guid = "16093900627180053822" '
                          "(`zpool import` lists it as id)")
    return guid


def _zfs_dir(table: Table, key: str) -> str | None:
    path = table.text(key)
    if path is not None and (not path.startswith("/") or ".." in path.split("/")):
        raise table.error(key, f"{key} = {path!r} is not an absolute directory",
                          'use an absolute path such as "/dev/mapper" or "/mnt/pool"')
    return path


def _zfs_degraded(table: Table) -> ZfsDegradedMode:
    text = table.text("degraded")
    if text is None or text == "never":
        return "never"
    if text == "always":
        return "always"
    raise table.error("degraded", f"degraded = {text!r} is not a zfs degraded policy",
                      'use "never" (refuse unless every vdev\'s layer opens) or "always" '
                      "(import with the vdevs that open; zfs reports the pool DEGRADED)")


PARSERS: dict[str, Callable[[str, Table], Layer]] = {
    "raid": parse_raid, "crypt": parse_crypt, "loop": parse_loop, "mount": parse_mount,
    "zfs": parse_zfs}
