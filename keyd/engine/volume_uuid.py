"""Is the volume just opened the one a key bundle was signed for? Its UUIDs against the bundle's.

A bundle may name the volume's UUID (``volume_uuid``: what ``keydctl enroll --device``
reads from the LUKS header, or an md or filesystem UUID the admin gave). keyd knows a
volume's UUIDs only once it is open: the LUKS header UUIDs of its crypt mappings (in
their device-mapper UUID, ``CRYPT-LUKS2-<32 hex>-<name>``), the md UUIDs of its arrays
and the ``UUID=`` device specs of its configuration. When both sides are known and none
matches, the key opened a different volume than the signer meant (a disk swapped, a
stick for another box): the engine closes it again before anything uses it.
"""

from __future__ import annotations

from keyd.config.layers import normalize_uuid
from keyd.config.model import CryptLayer, MountLayer, RaidLayer, Volume
from keyd.engine.names import dm_name
from keyd.engine.observed import ObservedState


def luks_uuid(dm_uuid: str) -> str | None:
    """The LUKS header UUID (32 hex digits) in a dm-crypt mapping's UUID, if it is LUKS."""
    parts = dm_uuid.split("-", 3)
    if len(parts) < 3 or parts[0] != "CRYPT" or not parts[1].startswith("LUKS"):
        return None
    return normalize_uuid(parts[2])


def volume_uuids(volume: Volume, observed: ObservedState) -> set[str]:
    """Every UUID of ``volume`` keyd can tell now, as 32 lower-case hex digits."""
    found: set[str] = set()
    names = {dm_name(volume.name, layer.name) for layer in volume.layers
             if isinstance(layer, CryptLayer)}
    for mapping in observed.dm:
        uuid = luks_uuid(mapping.uuid) if mapping.name in names else None
        if uuid is not None:
            found.add(uuid)
    for layer in volume.layers:
        if isinstance(layer, RaidLayer):
            found.add(layer.uuid)
        elif isinstance(layer, CryptLayer | MountLayer) and layer.device:
            spec = normalize_uuid(layer.device.removeprefix("UUID="))
            if layer.device.startswith("UUID=") and spec is not None:
                found.add(spec)
    return found


def wrong_volume(claimed: str, volume: Volume, observed: ObservedState) -> str | None:
    """Why the bundle's ``claimed`` UUID does not fit the open volume, or None if it does
    (or nothing is known to compare with)."""
    wanted = normalize_uuid(claimed)
    known = volume_uuids(volume, observed)
    if wanted is None or not known or wanted in known:
        return None
    return (f"the key bundle is for the volume with UUID {claimed}, and volume {volume.name} "
            f"has {', '.join(sorted(known))}")
