"""Both ends of the guest command channel, and the QMP client, against local socket peers."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyd_lab import guest_agent
from keyd_lab.channel import Channel
from keyd_lab.errors import GuestCommandTimeout, LabError, QmpError
from keyd_lab.qmp import Qmp


def serve_once(path: Path, handler: Callable[[socket.socket], None]) -> threading.Thread:
    """Listen on ``path`` and hand the first connection to ``handler`` in a thread."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def accept() -> None:
        conn, _ = server.accept()
        with conn:
            handler(conn)
        server.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def agent_peer(conn: socket.socket) -> None:
    """The guest agent's loop, minus the virtio port: ready, then answer each request."""
    conn.sendall(json.dumps({"ready": True, "uptime": 12.5}).encode() + b"\n")
    with conn.makefile("rb") as requests:
        for line in requests:
            conn.sendall(json.dumps(guest_agent.execute(json.loads(line))).encode() + b"\n")


@pytest.fixture
def channel(tmp_path: Path) -> Iterator[Channel]:
    serve_once(tmp_path / "agent.sock", agent_peer)
    ch = Channel(tmp_path / "agent.sock")
    assert ch.wait_ready(time.monotonic() + 5)["uptime"] == 12.5
    yield ch
    ch.close()


def test_commands_run_with_stdin_and_report_exit_code_and_output(channel: Channel) -> None:
    rc, out, err = channel.run(["sh", "-c", "cat; echo oops >&2; exit 3"], input=b"key bytes\n")
    assert (rc, out, err) == (3, "key bytes\n", "oops\n")


def test_a_missing_program_is_exit_127_with_its_name(channel: Channel) -> None:
    result = channel.run(["/nonexistent/tool"])
    assert result.rc == 127 and "/nonexistent/tool" in result.stderr


def test_a_command_past_its_timeout_is_killed_with_its_children(channel: Channel, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with pytest.raises(GuestCommandTimeout, match=r"ran past 0\.5 s"):
        channel.run(["sh", "-c", f"sleep 30 & echo $! > {pids}; exec sleep 30"], timeout=0.5)
    background = int(pids.read_text())
    with pytest.raises(ProcessLookupError):  # the whole process group went, not just the shell
        for _ in range(100):
            os.kill(background, 0)
            time.sleep(0.05)


def test_channel_closed_by_the_guest_is_a_lab_error(tmp_path: Path) -> None:
    serve_once(tmp_path / "agent.sock", lambda conn: None)
    ch = Channel(tmp_path / "agent.sock")
    with pytest.raises(LabError, match="closed"):
        ch.wait_ready(time.monotonic() + 5)


def qmp_peer(script: list[list[dict[str, object]]]) -> Callable[[socket.socket], None]:
    """A QMP server: greeting, then for each command the next scripted replies."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        replies = iter(script)
        with conn.makefile("rb") as commands:
            for _line in commands:
                for reply in next(replies):
                    conn.sendall(json.dumps(reply).encode() + b"\n")
    return handler


def test_qmp_returns_results_raises_typed_errors_and_keeps_events(tmp_path: Path) -> None:
    script: list[list[dict[str, object]]] = [
        [{"return": {}}],  # qmp_capabilities
        [{"event": "DEVICE_DELETED", "data": {"device": "stick-A"}}, {"return": {}}],
        [{"error": {"class": "GenericError", "desc": "Duplicate device ID 'stick-A'"}}],
    ]
    serve_once(tmp_path / "qmp.sock", qmp_peer(script))
    qmp = Qmp(tmp_path / "qmp.sock", timeout=5)

    assert qmp.execute("device_del", id="stick-A") == {}
    with pytest.raises(QmpError) as error:
        qmp.execute("device_add", driver="usb-bot", id="stick-A")
    assert error.value.error_class == "GenericError" and "Duplicate" in str(error.value)
    assert qmp.wait_event("DEVICE_DELETED", 1, device="stick-A")["data"] == {"device": "stick-A"}
    qmp.close()


def test_qmp_that_never_answers_times_out_with_a_lab_error(tmp_path: Path) -> None:
    serve_once(tmp_path / "qmp.sock", lambda conn: time.sleep(2))
    with pytest.raises(LabError, match="did not answer"):
        Qmp(tmp_path / "qmp.sock", timeout=0.5)
