"""The small Protocols the executor drives; keyd.adapters implements them with real programs.

``label`` arguments ("crypt layer crypt0 of volume tank") only make error
messages specific; adapters never log or raise key material.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from keyd.config.model import CryptLayer, ZfsLayer
from keyd.engine.errors import Holder
from keyd.engine.observed import ZfsPool


class CryptPort(Protocol):
    """Opens and closes dm-crypt mappings."""

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        """Open ``device`` as ``dm_name`` with ``key`` (and TrueCrypt/VeraCrypt
        ``keyfiles``); return the mapped device path."""
        ...

    def close(self, dm_name: str) -> None:
        """Close the mapping; closing one that is gone is not an error."""
        ...


class RaidPort(Protocol):
    """Assembles and stops md arrays."""

    def assemble(self, label: str, md_name: str, uuid: str, members: Sequence[str],
                 *, run: bool) -> str:
        """Assemble array ``uuid`` as /dev/md/``md_name``; return its device path."""
        ...

    def stop(self, label: str, device: str) -> None:
        """Stop the array."""
        ...

    def re_add(self, label: str, device: str, member: str) -> None:
        """Put a member that was missing back into the running array ``device``."""
        ...


class MountPort(Protocol):
    """Mounts and unmounts filesystems."""

    def mount(self, label: str, source: str, mountpoint: str, fstype: str,
              options: Sequence[str]) -> None:
        """Mount ``source`` at ``mountpoint``."""
        ...

    def unmount(self, label: str, mountpoint: str) -> None:
        """Unmount ``mountpoint``."""
        ...

    def quiesce(self, label: str, mountpoint: str) -> str:
        """Flush ``mountpoint`` and remount it read-only if it can be; what happened."""
        ...


class LoopPort(Protocol):
    """Attaches and detaches loop devices."""

    def attach(self, label: str, image: str, *, read_only: bool) -> str:
        """Attach ``image`` to a free loop device; return its path."""
        ...

    def detach(self, label: str, device: str) -> None:
        """Detach the loop device (done already, by autoclear, is fine)."""
        ...

    def autoclear(self, label: str, device: str) -> None:
        """Have the kernel detach the loop device once nothing holds it open any more."""
        ...


class HolderPort(Protocol):
    """Finds processes using mountpoints or devices."""

    def holders(self, paths: Sequence[str]) -> list[Holder]:
        """Processes with a cwd, root, open file or mapping at or below any of ``paths``."""
        ...


class ServicePort(Protocol):
    """Starts and stops systemd units."""

    def stop(self, units: Sequence[str]) -> None:
        """Stop ``units``."""
        ...

    def start(self, units: Sequence[str]) -> None:
        """Start ``units``."""
        ...


class ZfsPort(Protocol):
    """Imports and exports ZFS pools."""

    def import_pool(self, label: str, layer: ZfsLayer) -> ZfsPool:
        """Import the layer's pool as configured; return its name, GUID and health."""
        ...

    def export_pool(self, label: str, pool: str) -> None:
        """Export ``pool``; a busy pool raises VolumeBusy."""
        ...

    def online(self, label: str, pool: str, device: str) -> None:
        """Bring vdev ``device`` of the imported ``pool`` online (zfs resilvers it)."""
        ...


@dataclass(frozen=True)
class Storage:
    """The adapters one executor uses (``zfs`` only where a zfs layer may be configured)."""

    crypt: CryptPort
    raid: RaidPort
    mounts: MountPort
    loops: LoopPort
    zfs: ZfsPort | None = None
