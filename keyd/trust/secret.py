"""Key material held in memory only, in a buffer that is zeroed when done (best effort).

Python may still have copied the bytes elsewhere (e.g. python-gnupg's
``bytes`` result, pipe buffers); zeroing our buffer shortens the window, it is
not a guarantee. The bytes never appear in ``repr``, ``str`` or exceptions.
"""

from __future__ import annotations

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
