"""The lab's guest agent: runs commands sent by the host over a virtio-serial port.

It runs inside the guest with the system Python and the standard library
only. One JSON object per line each way:

  host -> guest  {"id": 1, "argv": [...], "stdin": BASE64|null, "timeout": SECONDS}
  guest -> host  {"id": 1, "rc": 0, "stdout": BASE64, "stderr": BASE64, "timed_out": false}

On start it sends {"ready": true, "uptime": SECONDS}. Commands run one at a
time, each in its own session so a timeout kills its whole process group.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PORT_NAME = "keyd.agent"


def find_port(name: str = PORT_NAME) -> Path:
    """The /dev node of the virtio-serial port called ``name``."""
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        if (entry / "name").read_text().strip() == name:
            return Path("/dev") / entry.name
    raise SystemExit(f"keyd-lab-agent: no virtio-serial port named {name}")


def execute(request: dict[str, object]) -> dict[str, object]:
    """Run one request and describe its outcome."""
    stdin = request.get("stdin")
    data = base64.b64decode(str(stdin)) if stdin is not None else b""
    timeout = float(str(request.get("timeout", 60)))
    argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
    reply: dict[str, object] = {"id": request.get("id"), "timed_out": False}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        return reply | {"rc": 127, "stdout": "", "stderr": _b64(f"{argv[0]}: {exc}\n".encode())}
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        reply["timed_out"] = True
    return reply | {"rc": proc.returncode, "stdout": _b64(out), "stderr": _b64(err)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def serve(port: Path) -> None:
    """Answer requests on ``port`` forever, surviving host disconnects."""
    fd = os.open(port, os.O_RDWR | os.O_NONBLOCK)
    _send(fd, {"ready": True, "uptime": float(Path("/proc/uptime").read_text().split()[0])})
    buffer = b""
    while True:
        chunk = _read(fd)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                _send(fd, execute(json.loads(line)))


def _read(fd: int) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        events = poller.poll()
        if any(mask & select.POLLIN for _, mask in events):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                return data
        # POLLHUP: no host is connected; wait for one without spinning.
        time.sleep(0.2)


def _send(fd: int, message: dict[str, object]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return  # the host went away; it will ask again
        data = data[written:]


if __name__ == "__main__":
    serve(Path(sys.argv[1]) if len(sys.argv) > 1 else find_port())
