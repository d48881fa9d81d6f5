"""The small Protocols the daemon core drives; production adapters and test doubles implement them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from keyd.config.model import Volume
from keyd.daemon.uevents import StickInfo
from keyd.engine.executor import KeySource
from keyd.engine.service import Outcome
from keyd.engine.status import VolumeReport
from keyd.trust.report import StickReport
from keyd.trust.secret import KeySet


class Scheduler(Protocol):
    """The event loop: everything the core does runs in it, one callback at a time."""

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Any:
        """Run ``callback`` in the loop after ``seconds``; return a handle for :meth:`cancel`."""
        ...

    def cancel(self, handle: Any) -> None:
        """Stop a pending :meth:`call_later`."""
        ...

    def run_in_worker(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run ``work`` off the loop; then ``done(result)`` in the loop (never raises into it)."""
        ...

    def run_in_background(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """As :meth:`run_in_worker`, for long waits (a passphrase prompt) that neither use up
        the workers nor delay shutdown."""
        ...

    def now(self) -> float:
        """Monotonic seconds (for backoff)."""
        ...


class VolumeEngine(Protocol):
    """What the daemon needs of keyd.engine.service.Engine (which implements it)."""

    def unlock(self, volume: Volume, keys: KeySource, *, start_services: bool = False) -> Outcome:
        """Open the stack."""
        ...

    def lock(self, volume: Volume, *, force: bool = False, quiesce: bool = False) -> Outcome:
        """Close the stack (``quiesce``: flush it if it is busy, at shutdown)."""
        ...

    def mend(self, volume: Volume, keys: KeySource) -> Outcome:
        """Bring back the missing sides of an open, degraded stack."""
        ...

    def status(self, volumes: Sequence[Volume]) -> list[VolumeReport]:
        """Each volume's state from the kernel."""
        ...


class UnitManager(Protocol):
    """Starts and stops systemd units (systemd's D-Bus API in production)."""

    def start(self, unit: str) -> None:
        """Queue a start job for ``unit`` (raise KeydError on refusal)."""
        ...

    def stop(self, unit: str) -> None:
        """Queue a stop job for ``unit`` (raise KeydError on refusal)."""
        ...

    def wait_stopped(self, unit: str, timeout: float) -> bool:
        """Wait until ``unit`` is no longer active or stopping (runs in a worker); False on timeout."""
        ...


class StickChecker(Protocol):
    """Mounts a stick safely, reads and verifies its bundle (runs in a worker)."""

    def check(self, stick: StickInfo) -> StickReport:
        """The verification report; stick-wide failures come back as a refusal report."""
        ...

    def commit(self, report: StickReport) -> str | None:
        """Remember what an accepted, used bundle teaches (generations, revocations); a
        warning when the learned revocations near their cap."""
        ...


class PassphraseAsker(Protocol):
    """Asks for a volume's passphrases (systemd-ask-password in production; runs in a worker)."""

    def ask(self, volume: str, names: Sequence[str], timeout: float) -> KeySet | None:
        """One passphrase per key name (one for all when ``names`` has at most one), or None
        when a question went unanswered in ``timeout`` seconds in all."""
        ...


class Announcer(Protocol):
    """Publishes state changes (the D-Bus StateChanged signal)."""

    def state_changed(self, volume: str, state: str, detail: str) -> None:
        """Announce that ``volume`` is now in ``state``."""
        ...
