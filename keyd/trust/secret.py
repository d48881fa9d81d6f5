"""Key material held in memory only, in a buffer that is zeroed when done (best effort).

Python may still have copied the bytes elsewhere (e.g. python-gnupg's
``bytes`` result, pipe buffers); zeroing our buffer shortens the window, it is
not a guarantee. The bytes never appear in ``repr``, ``str`` or exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Self


class WipeOnExit:
    """Base of holders of key bytes: leaving a ``with`` block calls :meth:`wipe`."""

    __slots__ = ()

    def wipe(self) -> None:
        """Zero the key bytes held."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.wipe()


class SecretBytes(WipeOnExit):
    """A zeroable key buffer; use as a context manager so it is wiped on exit."""

    __slots__ = ("_buffer",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer = bytearray(data)

    @classmethod
    def adopt(cls, buffer: bytearray) -> SecretBytes:
        """Take ownership of ``buffer`` without copying it (the caller drops its reference)."""
        secret = cls(b"")
        secret._buffer = buffer
        return secret

    @property
    def buffer(self) -> bytearray:
        """The key bytes; pass this to the runner's ``secret=``, never copy it into a str."""
        return self._buffer

    def __len__(self) -> int:
        return len(self._buffer)

    def wipe(self) -> None:
        """Overwrite the bytes with zeros and empty the buffer."""
        self._buffer[:] = bytes(len(self._buffer))
        self._buffer.clear()

    def __repr__(self) -> str:
        return f"<SecretBytes {len(self._buffer)} bytes>"

    __str__ = __repr__


class KeySet(WipeOnExit):
    """Secrets by key name (a crypt layer's ``key``); the one under None serves every other name.

    A format 1 bundle, one ``--key-file`` or one passphrase is a set with only that
    default; a format 2 bundle names a secret per layer, and may add TrueCrypt/VeraCrypt
    keyfiles per name (``keyfiles``), which cryptsetup takes besides the passphrase.
    """

    __slots__ = ("_keyfiles", "_secrets")

    def __init__(self, secrets: Mapping[str | None, SecretBytes],
                 keyfiles: Mapping[str | None, list[SecretBytes]] | None = None) -> None:
        self._secrets = dict(secrets)
        self._keyfiles = {name: list(files) for name, files in (keyfiles or {}).items()}

    @classmethod
    def single(cls, secret: SecretBytes) -> KeySet:
        """One secret for every key name."""
        return cls({None: secret})

    def get(self, name: str) -> SecretBytes | None:
        """The secret for key name ``name``: its own, else the default, else None."""
        return self._secrets.get(name, self._secrets.get(None))

    def keyfiles_for(self, name: str) -> list[SecretBytes]:
        """The keyfiles for key name ``name``: its own, else the default ones."""
        return self._keyfiles.get(name, self._keyfiles.get(None, []))

    @property
    def names(self) -> frozenset[str]:
        """The key names given a secret or keyfiles of their own."""
        return frozenset(name for name in (*self._secrets, *self._keyfiles) if name is not None)

    def items(self) -> list[tuple[str | None, SecretBytes]]:
        """(name, secret) pairs, the default (None) first, then by name."""
        return sorted(self._secrets.items(), key=lambda item: (item[0] is not None, item[0] or ""))

    def keyfile_items(self) -> list[tuple[str | None, list[SecretBytes]]]:
        """(name, keyfiles) pairs, in the order of :meth:`items`."""
        return sorted(self._keyfiles.items(),
                      key=lambda item: (item[0] is not None, item[0] or ""))

    def copy(self) -> KeySet:
        """Separate buffers with the same bytes (wiping one set leaves the other)."""
        return KeySet({name: SecretBytes(secret.buffer) for name, secret in self._secrets.items()},
                      {name: [SecretBytes(f.buffer) for f in files]
                       for name, files in self._keyfiles.items()})

    def wipe(self) -> None:
        """Zero every secret and keyfile."""
        for secret in self._secrets.values():
            secret.wipe()
        for files in self._keyfiles.values():
            for keyfile in files:
                keyfile.wipe()

    def __repr__(self) -> str:
        names = ", ".join(sorted(self.names)) or "-"
        default = " + default" if None in self._secrets else ""
        return f"<KeySet names {names}{default}>"

    __str__ = __repr__
