"""The parsed configuration: frozen dataclasses, no I/O.

A volume is a graph of named layers. Each layer names the layers it sits on
(``below``); exactly one layer, the top, sits under nothing. Layers are kept in
bottom-up order, so opening walks ``Volume.layers`` forwards and closing walks
it backwards.

New layer kinds (``zfs`` in issue 7) add a dataclass here, a field parser in
:mod:`keyd.config.layers` and a planner handler; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from keyd.errors import ConfigError

DEFAULT_CONFIG = "/etc/keyd/keyd.toml"
DEFAULT_GNUPGHOME = "/etc/keyd/gnupg"
DEFAULT_REVOCATIONS = "/etc/keyd/revoked.toml"

CryptType = Literal["luks", "plain", "tcrypt", "veracrypt"]
KeyFormat = Literal["passphrase", "binary"]
# Who decrypts a crypt layer: dm-crypt (cryptsetup), keyd's userspace crypto (FUSE + loop),
# or "auto": dm-crypt where the kernel has it, else userspace.
CryptBackend = Literal["auto", "kernel", "userspace"]
DegradedMode = Literal["never", "after", "always"]
ZfsDegradedMode = Literal["never", "always"]


@dataclass(frozen=True)
class Degraded:
    """When a RAID layer may start with members missing: never, after a wait, or always."""

    mode: DegradedMode = "never"
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"after={self.seconds:g}" if self.mode == "after" else self.mode


@dataclass(frozen=True)
class RaidLayer:
    """An md array, assembled by UUID from the member devices found (or listed)."""

    name: str
    uuid: str  # 32 lower-case hex digits, no separators
    degraded: Degraded = Degraded()
    devices: tuple[str, ...] = ()  # optional explicit member paths
    below: tuple[str, ...] = ()
    kind: Literal["raid"] = "raid"


@dataclass(frozen=True)
class CryptLayer:
    """A dm-crypt mapping opened by cryptsetup.

    ``key`` names the secret (a stick bundle supplies it by that name);
    ``key_format`` says whether it is a passphrase (one trailing newline is
    dropped, as a terminal would) or binary bytes used exactly.
    """

    name: str
    type: CryptType
    key: str
    key_format: KeyFormat
    device: str | None = None
    below: tuple[str, ...] = ()
    cipher: str | None = None
    key_size: int | None = None  # bits
    hash: str | None = None
    offset: int = 0  # 512-byte sectors
    skip: int = 0  # 512-byte sectors
    sector_size: int | None = None
    keyfile_offset: int = 0  # bytes
    iv_large_sectors: bool = False
    hidden: bool = False
    system: bool = False
    backup_header: bool = False
    pim: int | None = None
    readonly: bool = False
    allow_discards: bool = False
    backend: CryptBackend = "auto"
    kind: Literal["crypt"] = "crypt"

    @property
    def raw_key(self) -> bool:
        """True for plain mode without a hash: the key bytes are the cipher key."""
        return self.type == "plain" and self.hash in (None, "plain")


@dataclass(frozen=True)
class LoopLayer:
    """A loop device over an image file inside the (mounted) layer below."""

    name: str
    image: str  # relative to the mountpoint of the layer below
    below: tuple[str, ...]
    read_only: bool = False
    kind: Literal["loop"] = "loop"


@dataclass(frozen=True)
class MountLayer:
    """A filesystem mounted from the layer below (or from a device)."""

    name: str
    fstype: str
    mountpoint: str
    options: tuple[str, ...] = ()
    device: str | None = None
    below: tuple[str, ...] = ()
    kind: Literal["mount"] = "mount"


@dataclass(frozen=True)
class ZfsLayer:
    """A ZFS pool imported from the crypt mappings below it (its vdevs).

    ``pool`` is the name, ``guid`` the pool GUID (decimal; needed when names clash);
    zfs mounts the datasets itself (``mount``), so nothing sits on a zfs layer.
    ``degraded`` says whether the pool may be imported with a vdev's layer missing.
    """

    name: str
    pool: str | None
    below: tuple[str, ...]
    guid: str | None = None
    search_dir: str = "/dev/mapper"
    altroot: str | None = None
    read_only: bool = False
    mount: bool = True
    degraded: ZfsDegradedMode = "never"
    kind: Literal["zfs"] = "zfs"

    @property
    def target(self) -> str:
        """What ``zpool import`` is given: the GUID when configured, else the name."""
        return self.guid or self.pool or ""

    @property
    def label(self) -> str:
        """The pool as people name it in messages."""
        return self.pool or f"guid {self.guid}"


Layer = RaidLayer | CryptLayer | LoopLayer | MountLayer | ZfsLayer
Dependents = Literal["degraded", "skip"]


@dataclass(frozen=True)
class VolumePolicy:
    """How the daemon treats one volume (times in seconds); keys of [volume.NAME] and [daemon]."""

    auto_unlock: bool = True          # unlock when a stick with a valid bundle appears
    lock_on_removal: bool = False     # lock when the stick that unlocked it is pulled
    grace: float = 30.0               # ... after this long without it
    key_timeout: float = 90.0         # at start-up, wait this long for a stick
    passphrase: bool = False          # then ask with systemd-ask-password
    passphrase_timeout: float = 120.0
    dependents: Dependents = "skip"   # a volume still locked then: dependents skipped/degraded
    member_wait: float = 120.0        # wait for missing RAID members before giving up
    lock_retries: int = 2             # busy lock: retries after stopping services
    lock_retry_delay: float = 5.0
    share_timeout: float = 300.0      # k-of-n: a share is kept this long for the next sticks


@dataclass(frozen=True)
class DaemonSettings:
    """The ``[daemon]`` table: daemon-wide keys and the volume policy every volume starts from."""

    backoff_base: float = 2.0          # seconds after a stick's first failure, doubling
    backoff_max: float = 600.0
    admin_group: str | None = None     # members may call state-changing D-Bus methods
    defaults: VolumePolicy = VolumePolicy()


@dataclass(frozen=True)
class Volume:
    """One storage stack: its layers bottom-up, its top layer, its services and daemon policy."""

    name: str
    layers: tuple[Layer, ...]
    top: str
    services: tuple[str, ...] = ()
    description: str = ""
    policy: VolumePolicy = VolumePolicy()
    # "root": the root file system; the initramfs opens the layers below it (keyd(8), BOOT).
    boot: str = ""

    def layer(self, name: str) -> Layer:
        """The layer called ``name``; a missing name is a programming error."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def uppers(self, name: str) -> tuple[Layer, ...]:
        """The layers that sit directly on ``name``."""
        return tuple(layer for layer in self.layers if name in layer.below)

    @property
    def key_names(self) -> tuple[str, ...]:
        """The key names its crypt layers ask for, bottom-up, each once."""
        return tuple(dict.fromkeys(layer.key for layer in self.layers
                                   if isinstance(layer, CryptLayer)))


@dataclass(frozen=True)
class TrustConfig:
    """The ``[trust]`` table: pinned signer fingerprints, keyd's GnuPG home, the revocation list."""

    signers: tuple[str, ...] = ()
    gnupghome: str = DEFAULT_GNUPGHOME
    revocations: str = DEFAULT_REVOCATIONS


@dataclass(frozen=True)
class Config:
    """The whole configuration file, parsed and validated."""

    file: str
    volumes: tuple[Volume, ...] = ()
    trust: TrustConfig = TrustConfig()
    daemon: DaemonSettings = DaemonSettings()

    def volume(self, name: str) -> Volume:
        """The volume called ``name``, or a ConfigError listing the configured ones."""
        for volume in self.volumes:
            if volume.name == name:
                return volume
        known = ", ".join(v.name for v in self.volumes) or "none"
        raise ConfigError(self.file, f"volume.{name}", f"no volume named {name!r}",
                          fix=f"configured volumes: {known}")
