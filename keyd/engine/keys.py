"""Key sources for direct mode (keydctl): key files, stdin, or a passphrase prompt.

Keys live only in ``bytearray`` buffers that the executor wipes after use;
they are never logged, never put in argv, environment or files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

from keyd.config.model import CryptLayer
from keyd.engine.errors import KeyRejected

MAX_KEY_BYTES = 8 * 1024 * 1024  # cryptsetup's own key file limit


@runtime_checkable
class KeyInventory(Protocol):
    """A key source that can tell, before any layer opens, which keys it has.

    The planner uses it for zfs layers whose degraded policy lets a vdev stay shut.
    """

    def has(self, name: str) -> bool:
        """True when a key named ``name`` can be supplied."""
        ...


def read_limited(stream: BinaryIO, what: str) -> bytearray:
    """All of ``stream`` (at most MAX_KEY_BYTES); what was read is wiped if it is too large."""
    data = bytearray(stream.read(MAX_KEY_BYTES + 1))
    if len(data) > MAX_KEY_BYTES:
        data[:] = bytes(len(data))
        raise KeyRejected(f"{what} is larger than {MAX_KEY_BYTES} bytes",
                          fix="point --key-file at the key, not at a disk image")
    return data


def open_binary(path: str) -> BinaryIO:
    """Open ``path`` for reading bytes (the real opener of key files)."""
    return open(path, "rb")


def read_key_file(path: str, opener: Callable[[str], BinaryIO] = open_binary) -> bytearray:
    """The key in file ``path`` (``--key-file PATH``); unreadable files are KeyRejected."""
    try:
        with opener(path) as stream:
            return read_limited(stream, f"key file {path}")
    except OSError as exc:
        raise KeyRejected(f"cannot read key file {path}: {exc.strerror}",
                          fix="check the path given to --key-file") from None


@dataclass
class FileKeys:
    """Keys from files: ``by_name`` for named keys, ``default`` for the rest; ``-`` is stdin.

    stdin is read once and reused, so one ``--key-file -`` serves every layer.
    """

    default: str | None
    by_name: Mapping[str, str]
    stdin: BinaryIO
    opener: Callable[[str], BinaryIO]
    _stdin_data: bytearray | None = field(default=None, repr=False)

    def has(self, name: str) -> bool:
        """See KeyInventory: a file is named for this key, or a default file is given."""
        return self.by_name.get(name, self.default) is not None

    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        """See KeySource."""
        path = self.by_name.get(name, self.default)
        if path is None:
            raise KeyRejected(f"no key given for key {name!r} of volume {volume}",
                              fix=f"pass --key-file {name}=PATH (or one --key-file for all)")
        if path == "-":
            if self._stdin_data is None:
                self._stdin_data = read_limited(self.stdin, "the key on stdin")
            return bytearray(self._stdin_data)
        return read_key_file(path, self.opener)

    def wipe(self) -> None:
        """Overwrite the key read from stdin."""
        if self._stdin_data is not None:
            self._stdin_data[:] = bytes(len(self._stdin_data))


@dataclass
class PromptKeys:
    """Passphrases asked once per key name (``ask`` is getpass on a terminal)."""

    ask: Callable[[str], str]
    _cache: dict[str, bytearray] = field(default_factory=dict, repr=False)

    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        """See KeySource."""
        if name not in self._cache:
            text = self.ask(f"Passphrase for {volume}/{name}: ")
            self._cache[name] = bytearray(text.encode("utf-8"))
        return bytearray(self._cache[name])

    def wipe(self) -> None:
        """Overwrite the cached passphrases."""
        for buffer in self._cache.values():
            buffer[:] = bytes(len(buffer))
        self._cache.clear()


class NoKeys:
    """A key source for runs that must not need keys (lock)."""

    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        """Always refuses."""
        raise KeyRejected(f"no key source for {volume}/{name} in this operation")


@runtime_checkable
class KeyfileSource(Protocol):
    """A key source that also has TrueCrypt/VeraCrypt keyfiles for some key names."""

    def keyfiles(self, volume: str, name: str) -> list[bytearray]:
        """The keyfiles of key name ``name`` (copies the executor wipes), maybe none."""
        ...


@runtime_checkable
class SignedFor(Protocol):
    """Keys from a signed bundle that names its volume's UUID (None: it names none)."""

    volume_uuid: str | None


@dataclass
class MappingKeys:
    """Keys already in memory by name (the daemon fills it from a verified stick bundle);
    ``volume_uuid`` is the UUID the bundle was signed for, checked once the volume is open."""

    keys: Mapping[str, bytes | bytearray]
    volume_uuid: str | None = None
    keyfiles_by_name: Mapping[str, Sequence[bytes | bytearray]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        """See KeyInventory (keyfiles alone are a key: a keyfile-only TrueCrypt volume)."""
        return name in self.keys or bool(self.keyfiles_by_name.get(name))

    def key(self, volume: str, name: str, layer: CryptLayer) -> bytearray:
        """See KeySource; a copy, so the executor's wipe leaves the caller's buffer alone.
        A name with keyfiles only has the empty passphrase."""
        if name not in self.keys and not self.has(name):
            raise KeyRejected(f"the key bundle has no key {name!r} for volume {volume}",
                              fix=f"enroll a bundle that contains {name!r}")
        return bytearray(self.keys.get(name, b""))

    def keyfiles(self, volume: str, name: str) -> list[bytearray]:
        """See KeyfileSource."""
        return [bytearray(data) for data in self.keyfiles_by_name.get(name, ())]
