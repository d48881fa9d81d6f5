"""Deterministic names of what keyd creates, and how keyd recognises its own devices.

A crypt layer ``crypt0`` of volume ``tank`` is the dm device ``keyd-tank-crypt0``;
cryptsetup gives it the dm UUID ``CRYPT-<TYPE>-[<hex uuid>-]keyd-tank-crypt0``.
keyd owns a mapping only when both name and UUID say so. Arrays are assembled
as ``/dev/md/keyd-tank-md0``; mdadm records that name (MD_DEVNAME). A ZFS pool
keeps its own name, so keyd records the GUID of each pool it imported in its run
directory (``keyd.engine.pool_records``) and owns a pool only when that record
matches and every vdev is one of the layer's keyd mappings.
"""

from __future__ import annotations

from keyd.engine.observed import DmMapping

PREFIX = "keyd"
SERVED_ROOT = "/run/keyd/crypt"
SERVED_FILE = "volume"

# dm UUID prefixes cryptsetup sets, per crypt type (TrueCrypt and VeraCrypt are TCRYPT).
_UUID_TYPES = {"luks": ("LUKS1", "LUKS2"), "plain": ("PLAIN",),
               "tcrypt": ("TCRYPT",), "veracrypt": ("TCRYPT",)}


def dm_name(volume: str, layer: str) -> str:
    """The device-mapper name keyd gives a crypt layer."""
    return f"{PREFIX}-{volume}-{layer}"


def served_dir(dm_name: str) -> str:
    """Where keyd's userspace crypto mounts the decrypted ``volume`` file of a crypt layer that
    has no dm-crypt mapping (keyd.adapters.usercrypt); its loop device stands for the mapping."""
    return f"{SERVED_ROOT}/{dm_name}"


def md_name(volume: str, layer: str) -> str:
    """The name (under /dev/md/) keyd assembles a raid layer as."""
    return f"{PREFIX}-{volume}-{layer}"


def record_key(volume: str, layer: str) -> str:
    """How keyd's run records name a zfs layer whose pool keyd imported."""
    return f"{volume}/{layer}"


def owns_mapping(mapping: DmMapping, name: str, crypt_type: str) -> bool:
    """True when ``mapping`` is the one cryptsetup made for keyd's ``name`` of this type."""
    if mapping.name != name or not mapping.uuid.endswith("-" + name):
        return False
    return any(mapping.uuid.startswith(f"CRYPT-{kind}-") for kind in _UUID_TYPES[crypt_type])


def is_helper_of(mapping: DmMapping, name: str) -> bool:
    """True for cryptsetup's extra mappings of a cipher cascade (``<name>_1``...)."""
    stem, _, suffix = mapping.name.rpartition("_")
    return (stem == name and suffix.isdigit()
            and mapping.uuid.startswith(("CRYPT-SUBDEV-", "CRYPT-TCRYPT-")))
