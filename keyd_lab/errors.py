"""Lab failures, each saying what to do about it."""

from __future__ import annotations

from keyd.errors import KeydError


class LabError(KeydError):
    """Something in the lab failed: building it, booting it or talking to it."""


class QmpError(LabError):
    """QEMU refused a QMP command; carries the command and QMP's own error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class BootTimeout(LabError):
    """The guest did not become ready in time; the message holds the console's tail."""

    def __init__(self, seconds: float, console_tail: str) -> None:
        super().__init__(
            f"the lab guest was not ready after {seconds:g} s; last console lines:\n{console_tail}",
            fix="read the console log above; a slow machine may need --boot-timeout")
        self.console_tail = console_tail


class GuestCommandTimeout(LabError):
    """A command in the guest did not answer within its deadline."""
