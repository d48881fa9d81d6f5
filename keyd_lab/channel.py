"""The host side of the guest command channel (see guest_agent.py for the protocol)."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyd_lab.errors import GuestCommandTimeout, LabError
from keyd_lab.qmp import connect_unix


@dataclass(frozen=True)
class GuestResult:
    """What one guest command did."""

    rc: int
    stdout: str
    stderr: str

    def __iter__(self) -> Any:
        # Lets callers unpack ``rc, out, err = lab.run(...)``.
        return iter((self.rc, self.stdout, self.stderr))


class GuestCommandFailed(LabError):
    """A guest command that was required to succeed exited non-zero."""

    def __init__(self, argv: list[str], result: GuestResult) -> None:
        super().__init__(f"guest command {argv} exited {result.rc}:\n{result.stderr.strip()}"
                         f"\n{result.stdout.strip()}".rstrip())
        self.argv = argv
        self.result = result


class Channel:
    """One connection to the guest agent over QEMU's virtio-serial socket."""

    def __init__(self, path: Path, connect_timeout: float = 10.0) -> None:
        self._sock = connect_unix(path, time.monotonic() + connect_timeout)
        self._buffer = b""
        self._next_id = 1

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        """Wait for the agent's ready message (sent once when it starts)."""
        while True:
            message = self._receive(deadline)
            if message.get("ready"):
                return message

    def run(self, argv: list[str], input: bytes | str | None = None,
            timeout: float = 60.0) -> GuestResult:
        """Run argv in the guest; the agent kills it after ``timeout`` seconds."""
        request_id, self._next_id = self._next_id, self._next_id + 1
        data = input.encode() if isinstance(input, str) else input
        request = {"id": request_id, "argv": argv, "timeout": timeout,
                   "stdin": base64.b64encode(data).decode() if data is not None else None}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout + 15.0
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == request_id:
                break
        if reply.get("timed_out"):
            raise GuestCommandTimeout(f"guest command {argv} ran past {timeout:g} s and was killed")
        return GuestResult(int(reply["rc"]), _decode(reply["stdout"]), _decode(reply["stderr"]))

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestCommandTimeout("the guest agent did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                raise LabError("the guest agent's channel closed (did QEMU exit?)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        """Close the connection; the agent waits for the next one."""
        self._sock.close()


def _decode(data: str) -> str:
    return base64.b64decode(data).decode("utf-8", "replace")
