"""Production implementations of the daemon's ports: trust pipeline, passphrase prompt, systemd units."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from keyd.daemon.uevents import StickInfo
from keyd.errors import KeydError, ProgramError
from keyd.runner import Runner
from keyd.trust.errors import TrustError
from keyd.trust.report import StickReport
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.settings import TrustSettings

log = logging.getLogger("keyd.daemon")


class TrustChecker:
    """Mount the stick read-only and privately, read its bundle, unmount, verify it.

    The verification pipeline (stick mounting, bundle reading, manifests, python-gnupg,
    hashing) is imported by :meth:`check` and :meth:`commit`, on the first stick, and not
    at start-up: keyd sends READY=1 sooner and an idle keyd never loads it (issue 6's
    start-up and memory bars; see benchmarks/bench_daemon_idle.py).
    """

    def __init__(self, runner: Runner, settings: TrustSettings) -> None:
        self.runner = runner
        self.settings = settings

    def check(self, stick: StickInfo) -> StickReport:
        """See StickChecker.check; every trust failure becomes a refusal report."""
        if not self.settings.signers:
            return StickReport(None, "no signer is pinned in [trust] signers: nothing is trusted")
        # The pipeline, on first use (see the class docstring).
        from keyd.trust.gpg import GnuPG  # noqa: PLC0415
        from keyd.trust.stick_mount import StickMounter  # noqa: PLC0415
        from keyd.trust.verify import (  # noqa: PLC0415
            StickIdentity,
            Verifier,
            load_state,
            recordable,
            refused,
        )
        mounter = StickMounter(self.runner, run_dir=self.settings.run_dir,
                               filesystems=self.settings.filesystems, limits=self.settings.limits)
        try:
            read = mounter.read(stick.devnode, stick.fstype)
            log.info("stick %s was mounted for %.3f s", stick.devnode, read.mounted_seconds)
            gpg = GnuPG(self.settings.gnupghome)
            with read.bundle:
                report = Verifier(gpg, self.settings.signers, decryptor=gpg).verify(
                    read.bundle, StickIdentity(stick.serial, stick.fs_uuid),
                    load_state(self.settings))
            return recordable(report, self.settings)
        except TrustError as exc:
            return refused(exc)

    def commit(self, report: StickReport) -> str | None:
        """See StickChecker.commit."""
        from keyd.trust.verify import commit  # noqa: PLC0415 (see the class docstring)
        return commit(report, self.settings)


class AskPassword:
    """Asks through ``systemd-ask-password`` (console, wall, or ``systemd-tty-ask-password-agent``)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def ask(self, volume: str, names: Sequence[str], timeout: float) -> KeySet | None:
        """See PassphraseAsker.ask; each reply is read from the program's stdout.

        A volume with several key names gets one question per name, each with its own
        ``--id=keyd:VOLUME:NAME`` so that an agent can tell them apart.
        """
        deadline = time.monotonic() + timeout
        if len(names) <= 1:
            secret = self._ask(f"keyd:{volume}", f"Passphrase for keyd volume {volume}:", deadline)
            return KeySet.single(secret) if secret is not None else None
        answers: dict[str | None, SecretBytes] = {}
        for name in names:
            secret = self._ask(f"keyd:{volume}:{name}",
                               f"Passphrase for keyd volume {volume}, key {name}:", deadline)
            if secret is None:
                KeySet(answers).wipe()
                return None
            answers[name] = secret
        return KeySet(answers)

    def _ask(self, question_id: str, message: str, deadline: float) -> SecretBytes | None:
        timeout = max(1, math.ceil(deadline - time.monotonic()))
        argv = ["systemd-ask-password", f"--id={question_id}", f"--timeout={timeout}",
                "--icon=drive-harddisk", "--no-tty", "-n", message]
        try:
            done = self.runner.run(argv, timeout=timeout + 10)
        except ProgramError as exc:
            log.warning("no passphrase for %s: %s", question_id, exc.message)
            return None
        # The runner hands stdout back as text; it is turned into a wipeable buffer at once.
        return SecretBytes(done.stdout.encode("utf-8"))


class SystemdUnits:
    """Starts and stops units through systemd's D-Bus API (org.freedesktop.systemd1.Manager)."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.manager: Any = None  # looked up on first use: systemd may start after us


    def start(self, unit: str) -> None:
        """Queue a start job (mode "replace"); see UnitManager."""
        self._call("StartUnit", unit)

    def stop(self, unit: str) -> None:
        """Queue a stop job (mode "replace"); see UnitManager."""
        self._call("StopUnit", unit)

    def wait_stopped(self, unit: str, timeout: float) -> bool:
        """Poll the unit's ActiveState until it is down (see UnitManager)."""
        return wait_until_down(lambda: self._active_state(unit), timeout)

    def _active_state(self, unit: str) -> str:
        try:
            path = self._systemd().GetUnit(unit)
            proxy = self.bus.get("org.freedesktop.systemd1", path)
            return str(proxy["org.freedesktop.systemd1.Unit"].ActiveState)
        except Exception:  # not loaded any more: it is down
            return "inactive"

    def _systemd(self) -> Any:
        if self.manager is None:
            self.manager = self.bus.get("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
        return self.manager

    def _call(self, method: str, unit: str) -> None:
        try:
            getattr(self._systemd(), method)(unit, "replace")
        except Exception as exc:  # GLib.Error from D-Bus: the unit is unknown, masked, ...
            raise KeydError(f"systemd refused {method} {unit}: {exc}",
                            fix=f"check `systemctl status {unit}`") from None


def wait_until_down(active_state: Callable[[], str], timeout: float,
                    sleep: Callable[[float], None] = time.sleep) -> bool:
    """Poll ``active_state`` every 0.2 s until it is neither active nor deactivating."""
    deadline = time.monotonic() + timeout
    while active_state() in ("active", "deactivating", "reloading", "activating"):
        if time.monotonic() >= deadline:
            return False
        sleep(0.2)
    return True


class SystemctlUnits:
    """Units through ``systemctl`` (when keyd runs without a system bus, e.g. --no-dbus)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def start(self, unit: str) -> None:
        """``systemctl start --no-block UNIT``."""
        self.runner.run(["systemctl", "start", "--no-block", "--", unit], timeout=60)

    def stop(self, unit: str) -> None:
        """``systemctl stop --no-block UNIT``."""
        self.runner.run(["systemctl", "stop", "--no-block", "--", unit], timeout=60)

    def wait_stopped(self, unit: str, timeout: float) -> bool:
        """Poll ``systemctl is-active UNIT`` (see UnitManager)."""
        def active_state() -> str:
            argv = ["systemctl", "is-active", "--", unit]
            return self.runner.run(argv, timeout=30, ok_codes=range(256)).stdout.strip()
        return wait_until_down(active_state, timeout)
