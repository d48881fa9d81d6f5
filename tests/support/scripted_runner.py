"""A scripted :class:`~keyd.runner.Runner` for unit tests: canned replies, every call recorded.

Replies are matched by argv prefix; the first matching rule wins. A rule's reply
is either a :class:`Reply` or a callable building one from argv (to model
programs whose effect later observations must see).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from keyd.errors import ProgramError
from keyd.runner import DEFAULT_TIMEOUT, Completed


@dataclass(frozen=True)
class Reply:
    """What a scripted program prints and how it exits."""

    stdout: str = ""
    stderr: str = ""
    returncode: int = 0


@dataclass(frozen=True)
class Call:
    """One recorded run: argv and whether (not what) a secret was passed."""

    argv: tuple[str, ...]
    secret: bytes | None
    timeout: float
    argv0: str | None = None  # the program's argv[0], when the caller replaced it


Rule = Reply | Callable[[Sequence[str]], Reply]


@dataclass
class ScriptedRunner:
    """Answers runs from ``rules`` (argv prefix -> reply); unmatched argv exit 0 silently."""

    rules: list[tuple[tuple[str, ...], Rule]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def on(self, *prefix: str, reply: Rule) -> ScriptedRunner:
        """Add a rule; returns self so rules chain."""
        self.rules.append((prefix, reply))
        return self

    def run(self, argv: Sequence[str], *, secret: bytes | bytearray | None = None,
            timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
            cwd: str | os.PathLike[str] | None = None, argv0: str | None = None) -> Completed:
        """Record the call and answer it from the first matching rule."""
        argv = tuple(argv)
        self.calls.append(Call(argv, None if secret is None else bytes(secret), timeout, argv0))
        reply = Reply()
        for prefix, rule in self.rules:
            if argv[:len(prefix)] == prefix:
                reply = rule if isinstance(rule, Reply) else rule(argv)
                break
        if reply.returncode not in ok_codes:
            raise ProgramError(list(argv), reply.returncode, reply.stderr)
        return Completed(argv, reply.returncode, reply.stdout, reply.stderr, 0.0)

    def argvs(self, program: str | None = None) -> list[tuple[str, ...]]:
        """The argv of every recorded call (of ``program`` only, if given)."""
        return [c.argv for c in self.calls if program is None or c.argv[0] == program]
