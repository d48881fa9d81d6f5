"""The spec keyd hands keyd.crypto.serve: one JSON line naming what to decrypt, and how.

keyd (keyd.adapters.usercrypt) writes it with :meth:`CryptSpec.line`; the server reads
it back with :func:`parse_spec`, refusing anything malformed with a ConfigError that names
the field. It never holds key bytes: the key follows the line on the server's stdin.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import cast

from keyd.crypto.ciphers import SECTOR_SIZES
from keyd.errors import ConfigError

SPEC = "keyd.crypto.serve's spec (stdin)"


@dataclass(frozen=True)
class CryptSpec:
    """What to serve: ``size`` bytes (None: to the end) at byte ``offset`` of ``backing``,
    decrypted as dm-crypt would with ``cipher`` (``aes-xts-plain64``), ``sector_size``,
    ``iv_offset`` (512-byte units; TrueCrypt's is its data offset) and ``iv_large_sectors``."""

    backing: str
    offset: int
    size: int | None
    sector_size: int
    cipher: str
    read_only: bool
    mountpoint: str
    iv_offset: int = 0
    iv_large_sectors: bool = False

    def line(self) -> bytes:
        """The spec as the JSON line the server reads before the key."""
        return json.dumps(asdict(self)).encode() + b"\n"


def _field(data: dict[str, object], key: str, kind: type, problem: str) -> object:
    value = data.get(key)
    # bool is an int in Python: an offset of `true` is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(SPEC, key, problem)
    return value


def _optional(data: dict[str, object], key: str, default: object, problem: str) -> object:
    return default if key not in data else _field(data, key, type(default), problem)


def parse_spec(text: bytes) -> CryptSpec:
    """The spec line: a JSON object of :class:`CryptSpec`'s fields (``size`` may be null)."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(SPEC, "", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(SPEC, "", "not a JSON object")
    spec = CryptSpec(
        backing=cast(str, _field(data, "backing", str, "must be a path")),
        offset=cast(int, _field(data, "offset", int, "must be a byte offset")),
        size=None if data.get("size") is None else cast(int, _field(data, "size", int,
                                                                    "must be bytes or null")),
        sector_size=cast(int, _field(data, "sector_size", int, "must be a number")),
        cipher=cast(str, _field(data, "cipher", str, "must be a cipher spec")),
        read_only=cast(bool, _field(data, "read_only", bool, "must be true or false")),
        mountpoint=cast(str, _field(data, "mountpoint", str, "must be a path")),
        iv_offset=cast(int, _optional(data, "iv_offset", 0, "must be 512-byte sectors")),
        iv_large_sectors=cast(bool, _optional(data, "iv_large_sectors", False,
                                              "must be true or false")))
    _check(spec)
    return spec


def _check(spec: CryptSpec) -> None:
    if spec.sector_size not in SECTOR_SIZES:
        raise ConfigError(SPEC, "sector_size", f"must be one of {SECTOR_SIZES}")
    if spec.offset < 0 or spec.offset % 512:
        raise ConfigError(SPEC, "offset", "must be a multiple of 512")
    if spec.size is not None and (spec.size <= 0 or spec.size % spec.sector_size):
        raise ConfigError(SPEC, "size", "must be a positive multiple of sector_size")
    for key, path in (("backing", spec.backing), ("mountpoint", spec.mountpoint)):
        if not os.path.isabs(path) or "," in path:
            raise ConfigError(SPEC, key, "must be an absolute path without commas")
