"""The one error tree of keyd.

Every failure that reaches a user is a :class:`KeydError`. Each carries the
data needed to explain it (which file, which volume, which program) and a
``fix`` hint. Boundaries (the CLI, the daemon's D-Bus methods) turn the chain
of causes into one readable message with :func:`user_message`.
"""

from __future__ import annotations


class KeydError(Exception):
    """Base of every error keyd raises on purpose.

    ``fix`` says what the admin can do about it; it is shown after the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class ConfigError(KeydError):
    """The configuration is invalid; names the file, the key and the fix."""

    exit_code = 3

    def __init__(self, file: str, key: str, problem: str, *, fix: str | None = None,
                 line: int | None = None) -> None:
        where = f"{file}:{line}" if line is not None else file
        at = f" [{key}]" if key else ""
        super().__init__(f"{where}{at}: {problem}", fix=fix)
        self.file = file
        self.key = key
        self.problem = problem
        self.line = line


class ProgramError(KeydError):
    """An external program failed, timed out or is missing.

    Carries argv (never key material: keys only ever travel on stdin), the exit
    code (``None`` for a timeout or a missing program) and stderr.
    """

    exit_code = 4

    def __init__(self, argv: list[str], returncode: int | None, stderr: str,
                 *, message: str | None = None, fix: str | None = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        if message is None:
            status = "timed out" if returncode is None else f"exited {returncode}"
            detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
            message = f"{argv[0]} {status}: {detail}"
        super().__init__(message, fix=fix)


class ProgramMissing(ProgramError):
    """An external program is not installed."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__([program], None, "",
                         message=f"{program} is not installed",
                         fix=f"apt-get install {package}")
        self.program = program
        self.package = package


class ProgramTimeout(ProgramError):
    """An external program ran past its deadline and was killed."""

    def __init__(self, argv: list[str], timeout: float, stderr: str) -> None:
        super().__init__(argv, None, stderr,
                         message=f"{argv[0]} did not finish within {timeout:g} s and was killed")
        self.timeout = timeout


def user_message(error: BaseException) -> str:
    """Walk an exception and its causes into one message for a person.

    The outermost message comes first; each distinct cause follows on its own
    line, so "wrong key for volume tank" is followed by what cryptsetup said.
    """
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip() or type(current).__name__
        lines.append(text if not lines else f"  caused by: {text}")
        current = current.__cause__
    return "\n".join(lines)
