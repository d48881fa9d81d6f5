"""What the trust code needs from the configuration, independent of the config parser.

``TrustSettings`` is built by the CLI (from flags or the ``[trust]`` table)
and by the daemon (from ``keyd.config``'s ``Config.trust``); the trust code
never reads configuration files itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keyd.config.model import DEFAULT_GNUPGHOME, DEFAULT_REVOCATIONS
from keyd.errors import ConfigError
from keyd.fingerprint import normalize_fingerprint

DEFAULT_STATE_DIR = "/var/lib/keyd"
DEFAULT_RUN_DIR = "/run/keyd"
DEFAULT_FILESYSTEMS = ("vfat", "exfat", "ext4")


@dataclass(frozen=True)
class Limits:
    """Caps on what is read from a stick's ``keyd/`` directory."""

    manifest_bytes: int = 64 * 1024
    signature_bytes: int = 64 * 1024
    key_bytes: int = 1024 * 1024
    total_bytes: int = 8 * 1024 * 1024
    files: int = 64


@dataclass(frozen=True)
class TrustSettings:
    """Pinned signers, keyd's GnuPG home, and where trust state lives.

    ``signers`` are primary-key fingerprints, normalized to upper-case hex
    without spaces; an entry that is not a full fingerprint is a ConfigError.
    """

    signers: tuple[str, ...]
    gnupghome: str = DEFAULT_GNUPGHOME
    revocations_file: str = DEFAULT_REVOCATIONS
    state_dir: str = DEFAULT_STATE_DIR
    run_dir: str = DEFAULT_RUN_DIR
    filesystems: tuple[str, ...] = DEFAULT_FILESYSTEMS
    limits: Limits = field(default_factory=Limits)
    source: str = "command line"

    def __post_init__(self) -> None:
        normalized = []
        for text in self.signers:
            fpr = normalize_fingerprint(text)
            if fpr is None:
                raise ConfigError(self.source, "trust.signers",
                                  f"{text[:80]!r} is not a full key fingerprint",
                                  fix="use the 40-hex-digit primary fingerprint "
                                      "(gpg --with-colons --fingerprint)")
            normalized.append(fpr)
        object.__setattr__(self, "signers", tuple(normalized))

    @property
    def state_path(self) -> Path:
        """The state directory as a Path."""
        return Path(self.state_dir)
