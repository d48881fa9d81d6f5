"""The daemon's own settings (lock on removal, grace, key timeout, fallback, dependents).

Until keyd.config grows these keys, they live in an optional TOML file
(``/etc/keyd/daemon.toml``)::

    [daemon]                   # daemon-wide, plus defaults for every volume
    backoff_base = 2           # seconds after the first rejected stick
    backoff_max = 600
    admin_group = "keyd"       # members may call state-changing D-Bus methods
    key_timeout = 90

    [daemon.volume.tank]       # per-volume overrides of the volume keys
    lock_on_removal = true
    grace = 30

:func:`parse_policy` is pure; unknown keys are errors, as in keyd.toml.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from keyd.errors import ConfigError

DEFAULT_POLICY_FILE = "/etc/keyd/daemon.toml"

Dependents = Literal["degraded", "skip"]


@dataclass(frozen=True)
class VolumePolicy:
    """How the daemon treats one volume (times in seconds)."""

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


@dataclass(frozen=True)
class DaemonPolicy:
    """Daemon-wide settings and each volume's policy."""

    defaults: VolumePolicy = field(default_factory=VolumePolicy)
    volumes: Mapping[str, VolumePolicy] = field(default_factory=dict)
    backoff_base: float = 2.0
    backoff_max: float = 600.0
    admin_group: str | None = None

    def for_volume(self, name: str) -> VolumePolicy:
        """The policy of volume ``name`` (the defaults if it has no table)."""
        return self.volumes.get(name, self.defaults)


_VOLUME_KEYS = {f.name: f for f in fields(VolumePolicy)}
_DAEMON_KEYS = {"backoff_base", "backoff_max", "admin_group", "volume"}


def _value(file: str, key: str, name: str, value: Any) -> Any:
    default = getattr(VolumePolicy(), name)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        value = float(value) if ok else value
    else:
        ok = value in ("degraded", "skip")
    if not ok:
        raise ConfigError(file, key, f"{value!r} is not a valid {name}",
                          fix=_EXPECT.get(type(default).__name__, 'use "degraded" or "skip"'))
    return value


_EXPECT = {"bool": "use true or false", "int": "use a whole number >= 0",
           "float": "use a number of seconds >= 0"}


def _volume_policy(file: str, prefix: str, table: Mapping[str, Any],
                   base: VolumePolicy) -> VolumePolicy:
    changes = {name: _value(file, f"{prefix}{name}", name, value)
               for name, value in table.items() if name in _VOLUME_KEYS}
    return replace(base, **changes)


def _seconds(file: str, key: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(file, key, f"{value!r} is not a number of seconds > 0",
                          fix="use e.g. 2 or 0.5")
    return float(value)


def _reject_unknown(file: str, prefix: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(file, f"{prefix}{key}", f"unknown key {key!r}",
                              fix=f"known keys: {', '.join(sorted(allowed))}")


def parse_policy(data: Mapping[str, Any], file: str) -> DaemonPolicy:
    """Build the policy from a decoded TOML document (only its ``[daemon]`` table). Pure."""
    _reject_unknown(file, "", data, {"daemon"})
    table = data.get("daemon", {})
    if not isinstance(table, dict):
        raise ConfigError(file, "daemon", "must be a table", fix="write it as [daemon]")
    _reject_unknown(file, "daemon.", table, _DAEMON_KEYS | set(_VOLUME_KEYS))
    defaults = _volume_policy(file, "daemon.", table, VolumePolicy())
    volumes = {}
    for name, body in table.get("volume", {}).items():
        prefix = f"daemon.volume.{name}."
        if not isinstance(body, dict):
            raise ConfigError(file, prefix[:-1], "must be a table", fix=f"write [{prefix[:-1]}]")
        _reject_unknown(file, prefix, body, set(_VOLUME_KEYS))
        volumes[name] = _volume_policy(file, prefix, body, defaults)
    group = table.get("admin_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ConfigError(file, "daemon.admin_group", "must be a group name", fix='e.g. "keyd"')
    return DaemonPolicy(defaults, volumes,
                        _seconds(file, "daemon.backoff_base", table.get("backoff_base"), 2.0),
                        _seconds(file, "daemon.backoff_max", table.get("backoff_max"), 600.0),
                        group)


def load_policy(path: str | Path) -> DaemonPolicy:
    """Read the policy file; a missing file means the defaults."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return DaemonPolicy()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read the daemon policy: {exc}",
                          fix="check the file and its permissions") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}",
                          fix="fix the syntax") from None
    return parse_policy(data, str(path))
