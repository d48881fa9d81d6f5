"""What keyd and `keydctl wait` load before they need it (issue 6's start-up and memory bars).

keyd must reach READY=1 without the stick-verification pipeline (python-gnupg, bundle
reading, manifests): it is imported on the first stick. `keydctl wait`, run by
keyd-wait@.service at every boot, must not load the daemon to learn its bus names.
One fresh interpreter takes the steps in order (each only adds modules) and lists
the modules it holds after each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SIGNER = "0123456789ABCDEF0123456789ABCDEF01234567"
STEPS = {
    "keydctl wait": "import keyd.cli.main, keyd.cli.daemon_commands",
    "daemon": "import keyd.daemon.main",
    # An ext2 stick is refused before anything is mounted: no program runs.
    "first stick": """
from tests.support.scripted_runner import ScriptedRunner
from keyd.daemon.adapters import TrustChecker
from keyd.daemon.uevents import StickInfo
from keyd.trust.settings import TrustSettings
settings = TrustSettings(signers=(SIGNER,), run_dir=TMP, state_dir=TMP)
report = TrustChecker(ScriptedRunner(), settings).check(StickInfo("/dev/sdc1", "ext2"))
assert report.reason is not None, report
""",
}
PIPELINE = {"gnupg", "keyd.trust.gpg", "keyd.trust.verify", "keyd.trust.stick_mount",
            "keyd.trust.safe_read", "keyd.trust.manifest"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Each step's name -> the modules loaded once it ran."""
    lines = [f"import json, sys\nSIGNER, TMP = {SIGNER!r}, "
             f"{str(tmp_path_factory.mktemp('run'))!r}\nseen = {{}}"]
    for name, code in STEPS.items():
        lines += [code, f"seen[{name!r}] = list(sys.modules)"]
    lines.append("print(json.dumps(seen))")
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return {name: set(modules) for name, modules in json.loads(done.stdout).items()}


def test_keydctl_wait_does_not_load_the_daemon(loaded: dict[str, set[str]]) -> None:
    assert "keyd.daemon.client" in loaded["keydctl wait"]
    assert loaded["keydctl wait"] & {"keyd.daemon.core", "keyd.daemon.dbus_api",
                                     "keyd.engine.service", *PIPELINE} == set()


def test_the_daemon_starts_without_the_stick_verification_pipeline(
        loaded: dict[str, set[str]]) -> None:
    assert "keyd.daemon.core" in loaded["daemon"]
    assert loaded["daemon"] & PIPELINE == set()


def test_the_first_stick_loads_the_pipeline(loaded: dict[str, set[str]]) -> None:
    assert {"gnupg", "keyd.trust.verify", "keyd.trust.stick_mount"} <= loaded["first stick"]
