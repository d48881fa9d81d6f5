"""The Debian package in the lab: apt-get install, the NAS story with Debian's python3, purge.

`make deb` builds build/deb/keyd_<version>_all.deb before the VM tier runs (`make test`, `make vm`).
The guest runs the host's root, where `make deps` installed the package's dependencies, so
apt-get installs the .deb without downloading anything. No venv is involved: keyd runs as
/usr/sbin/keyd under /usr/bin/python3 with Debian's python3-* libraries.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd import __version__
from keyd_lab.daemon_setup import debian_package, stop_keyd, write
from keyd_lab.demo import ended_well, tell_story
from keyd_lab.nas import NasSpec, missing_from_trail

from .conftest import GuestLab

ROOT = Path(__file__).resolve().parents[2]
DEB = ROOT / f"build/deb/keyd_{__version__}_all.deb"
GUEST_DEB = f"/var/tmp/keyd_{__version__}_all.deb"
SPEC = NasSpec(volume="debnas", disks=("DEBDISK1", "DEBDISK2", "DEBDISK3"), stick="DEBSTICK1",
               mountpoint="/mnt/t/debnas", grace=2)
# What the package installs that purge must take away again.
PACKAGE_FILES = ("/usr/sbin/keyd", "/usr/bin/keydctl", "/lib/systemd/system/keyd.service",
                 "/lib/systemd/system/keyd-wait@.service", "/lib/systemd/system/keyd-unlocked@.target",
                 "/lib/udev/rules.d/70-keyd.rules", "/usr/share/dbus-1/system.d/org.keyd.Keyd1.conf",
                 "/usr/lib/systemd/catalog/keyd.catalog", "/usr/lib/tmpfiles.d/keyd.conf",
                 "/usr/lib/sysusers.d/keyd.conf", "/usr/share/man/man8/keyd.8.gz")


@pytest.fixture
def deb_in_guest(guest: GuestLab) -> Iterator[str]:
    """The package in the guest, on a box where keyd was never configured; purged afterwards."""
    if not DEB.exists():
        pytest.fail(f"{DEB} is missing: run `make deb` (make test and make vm do)", pytrace=False)
    guest.sh("rm -rf /etc/keyd /var/lib/keyd")
    write(guest, GUEST_DEB, DEB.read_bytes())
    yield GUEST_DEB
    guest.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "keyd"],
              timeout=600)
    stop_keyd(guest)


def test_the_package_installs_runs_the_story_with_debians_python_and_purges(
        guest: GuestLab, tmp_path: Path, deb_in_guest: str) -> None:
    out = io.StringIO()

    result = tell_story(guest, tmp_path, out, SPEC, how=debian_package(deb_in_guest))

    told = out.getvalue()
    print(f"\n{told}")
    assert result.mounted == SPEC.file_text, told
    assert result.state_unlocked == "unlocked" and result.state_locked == "locked", told
    assert missing_from_trail(result.trail) == [] and ended_well(result), told
    assert "apt-get install" in told and "$ keydctl status" in told

    # keyd ran from the package: /usr/sbin/keyd under Debian's python3, no venv anywhere.
    pid = guest.check(["systemctl", "show", "-p", "MainPID", "--value", "keyd.service"]).stdout.strip()
    assert guest.check(["readlink", f"/proc/{pid}/exe"]).stdout.strip().startswith("/usr/bin/python3")
    cmdline = guest.check(["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")
    assert "/usr/sbin/keyd" in cmdline and not any(".venv" in arg for arg in cmdline), cmdline
    assert guest.check(["head", "-n1", "/usr/sbin/keyd"]).stdout.replace(" ", "") == "#!/usr/bin/python3\n"
    listing = guest.check(["dpkg", "-L", "keyd"]).stdout
    assert "keyd_lab" not in listing and "keyd-lab" not in listing
    assert guest.run(["getent", "group", "keyd"]).rc == 0  # systemd-sysusers ran
    assert guest.check(["systemctl", "is-enabled", "keyd.service"]).stdout.strip() == "enabled"

    purged = guest.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "keyd"],
                       timeout=600)
    assert purged.rc == 0, purged.stderr
    left = guest.sh("for f in " + " ".join(PACKAGE_FILES) + "; do [ -e $f ] && echo $f; done; true")
    assert left == "", left
    assert guest.run(["systemctl", "is-active", "keyd.service"]).stdout.strip() != "active"
    # keyd's state goes; the admin's configuration and GnuPG home (the host key) stay.
    assert guest.run(["test", "-e", "/var/lib/keyd"]).rc != 0
    assert guest.run(["test", "-f", "/etc/keyd/keyd.toml"]).rc == 0
    assert guest.run(["test", "-d", "/etc/keyd/gnupg"]).rc == 0
