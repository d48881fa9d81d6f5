"""Run tcplay in the guest on a pseudo-terminal, answering its prompts (used by seeds 000 and 003).

tcplay reads passphrases from the terminal only, so this helper gives it one.
Usage: ``python seed_000_tcplay.py TCPLAY-ARGS...`` with the passphrase as the
first line of stdin. Every "passphrase:" prompt gets the passphrase once tcplay
has turned echo off (it flushes pending input when it does, so typing earlier
loses the passphrase and tcplay waits forever), every "(y/n)" question gets "y".
tcplay's output goes to stdout with the passphrase blanked; the exit status is
tcplay's (tcplay is killed, and its transcript so far shown, past TIMEOUT).
"""

from __future__ import annotations

import os
import pty
import select
import sys
import termios
import time

TIMEOUT = 240.0  # below the tests' channel timeout, so a hang shows its transcript


def converse(fd: int, passphrase: bytes) -> bytes:
    """Answer prompts on ``fd`` until tcplay closes it; return the transcript."""
    transcript, pending = b"", b""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        transcript += chunk
        pending += chunk
        lowered = pending.lower()
        if lowered.rstrip().endswith(b"passphrase:"):
            _await_no_echo(fd)
            os.write(fd, passphrase + b"\n")
            pending = b""
        elif b"(y/n)" in lowered:
            os.write(fd, b"y\n")
            pending = b""
    return transcript.replace(passphrase, b"********")


def _await_no_echo(fd: int) -> None:
    """Wait until tcplay has switched echo off: doing so (TCSAFLUSH) discards earlier input."""
    deadline = time.monotonic() + 30.0
    while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
        time.sleep(0.05)


def _reap(pid: int) -> int:
    """Wait for tcplay; kill it if it outlives its terminal (or the timeout) by 10 s."""
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, 9)
    return os.waitpid(pid, 0)[1]


def main(args: list[str]) -> int:
    """Run tcplay ARGS with the passphrase from stdin."""
    passphrase = sys.stdin.buffer.readline().rstrip(b"\n")
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("tcplay", ["tcplay", *args])
    transcript = converse(fd, passphrase)
    status = _reap(pid)
    sys.stdout.write(transcript.decode("utf-8", "replace"))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
