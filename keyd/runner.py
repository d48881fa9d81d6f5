"""The one way keyd runs external programs.

argv lists only (never a shell), ``LC_ALL=C`` so output can be parsed, a
timeout on every call, and key material passed on stdin only. The logger
records argv and the outcome, never stdin. Failures raise typed
:class:`~keyd.errors.ProgramError`s carrying argv, exit code and stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from keyd.errors import ProgramError, ProgramMissing, ProgramTimeout
from keyd.programs import PROGRAMS

log = logging.getLogger("keyd.runner")

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Completed:
    """The result of a program that exited 0 (or whose exit code was accepted)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Timing:
    """Wall time spent inside external programs, summed; benchmarks compare against it."""

    seconds: float = 0.0
    calls: list[tuple[str, float]] = field(default_factory=list)

    def add(self, argv: Sequence[str], seconds: float) -> None:
        """Record one finished program run."""
        self.seconds += seconds
        self.calls.append((" ".join(argv[:2]), seconds))


class Runner(Protocol):
    """What adapters need to run a program; test doubles in unit tests implement this."""

    def run(self, argv: Sequence[str], *, secret: bytes | bytearray | None = None,
            timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
            cwd: str | os.PathLike[str] | None = None, argv0: str | None = None) -> Completed:
        """Run argv; raise ProgramError unless its exit code is in ok_codes.

        ``argv0`` replaces the program's argv[0] (argv[0] still names what runs).
        """
        ...


def _environment() -> dict[str, str]:
    # A fixed, minimal environment: parseable output, no inherited secrets.
    return {"LC_ALL": "C", "LANG": "C",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}


class SubprocessRunner:
    """Runs programs with :mod:`subprocess`; the production :class:`Runner`."""

    def __init__(self, timing: Timing | None = None) -> None:
        self.timing = timing if timing is not None else Timing()

    def run(self, argv: Sequence[str], *, secret: bytes | bytearray | None = None,
            timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
            cwd: str | os.PathLike[str] | None = None, argv0: str | None = None) -> Completed:
        """Run argv, feeding ``secret`` (if any) on stdin; see :class:`Runner`."""
        argv = list(argv)
        self._require(argv[0])
        executable = shutil.which(argv[0]) if argv0 is not None else None
        log.debug("run %s%s", argv, " (secret on stdin)" if secret is not None else "")
        started = time.monotonic()
        try:
            # The secret goes straight from the caller's buffer to the pipe: no copy to scrub.
            proc = subprocess.run([argv0, *argv[1:]] if argv0 else argv, input=secret,
                                  executable=executable,
                                  stdin=None if secret is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout, env=_environment(),
                                  cwd=cwd, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ProgramTimeout(argv, timeout, _text(exc.stderr)) from None
        seconds = time.monotonic() - started
        self.timing.add(argv, seconds)
        out, err = _text(proc.stdout), _text(proc.stderr)
        log.debug("%s exited %d in %.3f s", argv[0], proc.returncode, seconds)
        if proc.returncode not in ok_codes:
            raise ProgramError(argv, proc.returncode, err)
        return Completed(tuple(argv), proc.returncode, out, err, seconds)

    @staticmethod
    def _require(name: str) -> None:
        if os.sep in name or shutil.which(name) is not None:
            return
        declared = PROGRAMS.get(name)
        raise ProgramMissing(name, declared.package if declared else "the package providing it")


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")
