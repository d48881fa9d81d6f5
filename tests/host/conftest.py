"""The host tier runs as root on this machine: FUSE mounts, loop devices, mkfs, no VM.

A machine that cannot run it (not root, no /dev/fuse, a missing program or pyfuse3) fails
every test with what to fix, never skips: `make test` must not pass by testing nothing.
"""

from __future__ import annotations

import pytest

from tests.host.support import host_problems


@pytest.fixture(scope="session", autouse=True)
def host_ready() -> None:
    """Fail at once, saying why, where the host tier cannot run."""
    problems = host_problems()
    if problems:
        pytest.fail("the host tier cannot run here:\n  " + "\n  ".join(problems), pytrace=False)
