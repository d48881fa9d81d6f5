"""The daemon's keys in keyd.toml: the ``[daemon]`` table and each volume's policy keys. Pure.

::

    [daemon]                 # daemon-wide keys, and defaults of the volume keys
    backoff_base = 2
    admin_group = "keyd"
    key_timeout = 90

    [volume.tank]            # a volume's own policy keys sit in its table
    lock_on_removal = true
    grace = 30

The volume keys are read by :func:`volume_policy` from the volume's table, on top
of the ``[daemon]`` defaults; keydctl's direct mode ignores them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from keyd.config.fields import Table
from keyd.config.model import DaemonSettings, Dependents, VolumePolicy

POLICY_KEYS = tuple(f.name for f in fields(VolumePolicy))
DEPENDENTS: tuple[Dependents, ...] = ("degraded", "skip")
_DEFAULTS = VolumePolicy()


def _policy_value(table: Table, key: str) -> Any:
    default = getattr(_DEFAULTS, key)
    if isinstance(default, bool):
        value = table.flag(key)  # marks the key as known even when absent (typo hints)
        return value if key in table.data else None
    if isinstance(default, int):
        return table.integer(key, minimum=0, maximum=1000)
    if isinstance(default, float):
        return table.number(key)
    return table.choice(key, DEPENDENTS)


def volume_policy(table: Table, base: VolumePolicy) -> VolumePolicy:
    """The policy keys present in ``table`` laid over ``base`` (marks them as used)."""
    changes = {key: value for key in POLICY_KEYS
               if (value := _policy_value(table, key)) is not None}
    return replace(base, **changes)


def daemon_settings(table: Table) -> DaemonSettings:
    """The ``[daemon]`` table (then :meth:`Table.done`: unknown keys are errors)."""
    defaults = volume_policy(table, VolumePolicy())
    group = table.text("admin_group")
    if group is not None and not group.strip():
        raise table.error("admin_group", "admin_group is empty",
                          'name a group, e.g. admin_group = "keyd", or remove the key')
    base = table.number("backoff_base", above=True)
    most = table.number("backoff_max", above=True)
    table.done()
    settings = DaemonSettings(admin_group=group, defaults=defaults)
    return replace(settings, backoff_base=base or settings.backoff_base,
                   backoff_max=most or settings.backoff_max)
