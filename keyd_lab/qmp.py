"""A small QMP client: commands with typed errors, and events kept for waiting on."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from keyd_lab.errors import LabError, QmpError


def connect_unix(path: Path, deadline: float) -> socket.socket:
    """Connect to a unix socket QEMU is about to create, retrying until ``deadline``."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise LabError(f"QEMU did not open {path} in time") from None
            time.sleep(0.05)


class Qmp:
    """One QMP session on QEMU's monitor socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = connect_unix(path, time.monotonic() + timeout)
        self._file = self._sock.makefile("rwb")
        self._timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._receive(time.monotonic() + timeout)  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command and return its result; QMP errors raise :class:`QmpError`."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._file.write(json.dumps(message).encode() + b"\n")
        self._file.flush()
        deadline = time.monotonic() + self._timeout
        while True:
            reply = self._receive(deadline)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(command, reply["error"].get("class", "?"), reply["error"].get("desc", ""))

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        """Wait for event ``name`` whose data contains ``match``; consume and return it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                data = event.get("data", {})
                if event["event"] == name and all(data.get(k) == v for k, v in match.items()):
                    self.events.remove(event)
                    return event
            self._receive(deadline)

    def _receive(self, deadline: float) -> dict[str, Any]:
        """Read one message; events are stored, and anything else is returned."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError("QEMU's monitor did not answer in time")
            self._sock.settimeout(remaining)
            try:
                line = self._file.readline()
            except TimeoutError:
                raise LabError("QEMU's monitor did not answer in time") from None
            if not line:
                raise LabError("QEMU closed its monitor (did it exit? see the console log)")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message
            self.events.append(message)
            if message["event"] in WAITABLE:
                return message

    def close(self) -> None:
        """Close the monitor connection."""
        self._file.close()
        self._sock.close()


# Events that wake a waiter; others are only recorded.
WAITABLE = frozenset({"DEVICE_DELETED", "SHUTDOWN", "BLOCK_JOB_COMPLETED"})
