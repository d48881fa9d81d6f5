"""keyd.toml -> :class:`~keyd.config.model.Config`: a pure parser plus a thin file loader.

Layout (see docs/keyd.toml.5.md)::

    [trust]
    signers = ["<40 hex digits>"]
    gnupghome = "/etc/keyd/gnupg"

    [volume.tank]
    services = ["smbd.service"]

    [volume.tank.layer.md0]
    kind = "raid"
    ...

Every error is a :class:`~keyd.errors.ConfigError` naming file, line (when it
can be found), key path, the problem and the fix; unknown keys are errors.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from keyd.config.daemon import daemon_settings, volume_policy
from keyd.config.fields import Source, Table
from keyd.config.graph import order_layers
from keyd.config.layers import NAME, NAME_RULE, PARSERS, PLANNED_KINDS
from keyd.config.model import (
    DEFAULT_GNUPGHOME,
    DEFAULT_REVOCATIONS,
    Config,
    CryptLayer,
    Layer,
    MountLayer,
    RaidLayer,
    TrustConfig,
    Volume,
    VolumePolicy,
    ZfsLayer,
)
from keyd.errors import ConfigError
from keyd.fingerprint import normalize_fingerprint

_UNIT = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|socket|target|mount|timer|path)$")
_TOML_LINE = re.compile(r"at line (\d+)")


def load_config(path: str | Path) -> Config:
    """Read and parse the configuration file at ``path``."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "", "the configuration file does not exist",
                          fix="create it (see keyd.toml(5)) or pass --config FILE") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the configuration: {exc.strerror}",
                          fix="check the path and its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "", f"not UTF-8 text (byte {exc.start})",
                          fix="save the file as UTF-8") from None
    return parse_config(text, str(path))


def parse_config(text: str, file: str) -> Config:
    """Parse keyd.toml text; ``file`` names it in errors. No I/O."""
    source = Source(file, text)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        message = str(exc)
        match = _TOML_LINE.search(message)
        raise ConfigError(file, "", f"not valid TOML: {message}",
                          fix="fix the syntax (strings need quotes; tables are [name])",
                          line=int(match.group(1)) if match else None) from None
    root = Table(source, "", data)
    trust = _trust(Table(source, "trust", root.subtable("trust")))
    daemon = daemon_settings(Table(source, "daemon", root.subtable("daemon")))
    volumes = tuple(_volume(source, name, body, daemon.defaults)
                    for name, body in root.subtable("volume").items())
    _reject_unknown_top(root)
    _check_across(source, volumes)
    return Config(file=file, volumes=volumes, trust=trust, daemon=daemon)


def _reject_unknown_top(root: Table) -> None:
    for key in root.data:
        if key not in root.used:
            raise root.source.error(key, None, f"unknown table or key {key!r}",
                                    "the file has [trust], [daemon] and [volume.<name>] tables only")


def _trust(table: Table) -> TrustConfig:
    signers = tuple(_fingerprint(table, text) for text in table.text_list("signers"))
    home = _absolute(table, "gnupghome", DEFAULT_GNUPGHOME)
    revocations = _absolute(table, "revocations", DEFAULT_REVOCATIONS)
    table.done()
    return TrustConfig(signers=signers, gnupghome=home, revocations=revocations)


def _absolute(table: Table, key: str, default: str) -> str:
    path = table.text(key) or default
    if not path.startswith("/"):
        raise table.error(key, f"{key} {path!r} is not an absolute path",
                          f'use an absolute path, e.g. "{default}"')
    return path


def _fingerprint(table: Table, text: str) -> str:
    fpr = normalize_fingerprint(text)
    if fpr is None:
        raise table.error("signers", f"{text[:80]!r} is not a full key fingerprint",
                          "use the 40-hex-digit primary fingerprint "
                          "(gpg --with-colons --fingerprint)")
    return fpr


def _volume(source: Source, name: str, body: Any, defaults: VolumePolicy) -> Volume:
    path = f"volume.{name}"
    if not NAME.match(name):
        raise source.error(path, None, f"volume name {name!r} is not allowed",
                           f"volume names are {NAME_RULE}")
    if not isinstance(body, dict):
        raise source.error("volume", name, f"volume.{name} must be a table",
                           f"write it as [volume.{name}]")
    table = Table(source, path, body)
    services = table.text_list("services")
    for unit in services:
        if not _UNIT.match(unit):
            raise table.error("services", f"{unit!r} is not a systemd unit name",
                              'write full unit names such as "smbd.service"')
    description = table.text("description") or ""
    boot = table.text("boot") or ""
    if boot not in ("", "root"):
        raise table.error("boot", f"boot = {boot!r} is not known",
                          'boot = "root" marks the root file system\'s volume; otherwise leave '
                          "it out")
    policy = volume_policy(table, defaults)
    layers = {lname: _layer(source, name, lname, lbody)
              for lname, lbody in table.subtable("layer").items()}
    table.done()
    ordered, top = order_layers(source, name, layers)
    _check_root(table, boot, layers, top)
    return Volume(name=name, layers=ordered, top=top, services=services,
                  description=description, policy=policy, boot=boot)


def _check_root(table: Table, boot: str, layers: dict[str, Layer], top: str) -> None:
    """The root file system is the top of a boot = "root" volume, and only there."""
    root = [n for n, layer in layers.items()
            if isinstance(layer, MountLayer) and layer.mountpoint == "/"]
    top_layer = layers[top]
    if boot == "root" and not (isinstance(top_layer, MountLayer) and top_layer.mountpoint == "/"):
        raise table.error("boot", 'a boot = "root" volume has the root file system on top',
                          f'make its top layer {top!r} a mount layer with mountpoint = "/"')
    if root and boot != "root":
        raise table.error(None, f'layer {root[0]} mounts "/": only the root file system\'s '
                                "volume may", 'add boot = "root" to the volume (keyd(8), BOOT)')


def _layer(source: Source, volume: str, name: str, body: Any) -> Layer:
    path = f"volume.{volume}.layer.{name}"
    if not NAME.match(name):
        raise source.error(path, None, f"layer name {name!r} is not allowed",
                           f"layer names are {NAME_RULE}")
    if not isinstance(body, dict):
        raise source.error(f"volume.{volume}.layer", name, f"{path} must be a table",
                           f"write it as [{path}]")
    table = Table(source, path, body)
    kind = table.req_text("kind")
    parser = PARSERS.get(kind)
    if parser is None:
        later = PLANNED_KINDS.get(kind)
        problem = f"layer kind {kind!r} is not supported yet ({later})" if later \
            else f"kind = {kind!r} is not a layer kind"
        raise table.error("kind", problem, f"use one of: {', '.join(PARSERS)}")
    layer = parser(name, table)
    table.done()
    return layer


def _check_across(source: Source, volumes: tuple[Volume, ...]) -> None:
    roots = [volume.name for volume in volumes if volume.boot == "root"]
    if len(roots) > 1:
        raise source.error(f"volume.{roots[1]}", "boot", 'only one volume has boot = "root"',
                           f"volume {roots[0]} holds the root file system already")
    # Two layers claiming one device, array or mountpoint would fight each other.
    seen: dict[tuple[str, str], str] = {}
    for volume in volumes:
        for layer in volume.layers:
            for claim in _claims(layer):
                where = f"volume.{volume.name}.layer.{layer.name}"
                if claim in seen:
                    raise source.error(where, claim[0],
                                       f"{claim[0]} {claim[1]!r} is also used by {seen[claim]}",
                                       "each device, array and mountpoint belongs to one layer")
                seen[claim] = where


def _claims(layer: Layer) -> list[tuple[str, str]]:
    claims: list[tuple[str, str]] = []
    if isinstance(layer, RaidLayer):
        claims.append(("uuid", layer.uuid))
        claims.extend(("devices", path) for path in layer.devices)
    if isinstance(layer, CryptLayer | MountLayer) and layer.device is not None:
        claims.append(("device", layer.device))
    if isinstance(layer, MountLayer):
        claims.append(("mountpoint", layer.mountpoint))
    if isinstance(layer, ZfsLayer):
        claims += [("pool", layer.pool)] if layer.pool else []
        claims += [("guid", layer.guid)] if layer.guid else []
    return claims
