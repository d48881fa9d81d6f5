"""Test-only helpers of the daemon lab tests (tests/vm/test_daemon_*.py).

Signers, signed sticks, installing and starting keyd in the guest and reading
its audit trail are shared with ``keyd-lab demo``: keyd_lab.daemon_setup.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keyd_lab.daemon_setup import GUEST_BIN

DBUS_CALL = Path(__file__).with_name("daemon_dbus_call.py")


def volume_toml(name: str, device: str, services: list[str] | None = None,
                policy: str = "") -> str:
    """A LUKS2 + ext4 volume mounted under /mnt/t/NAME; ``policy``: its daemon keys (TOML lines)."""
    units = ", ".join(f'"{u}"' for u in services or [])
    return f"""
[volume.{name}]
services = [{units}]
{policy}

[volume.{name}.layer.crypt]
kind = "crypt"
type = "luks"
device = "{device}"

[volume.{name}.layer.data]
kind = "mount"
below = ["crypt"]
fstype = "ext4"
mountpoint = "/mnt/t/{name}"
"""


def format_volume(guest: Any, device: str, key: bytes, *, iterations: int = 1000) -> None:
    """LUKS2 (fast pbkdf2) + ext4 with a marker file, formatted in the guest and closed again."""
    luks = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", str(iterations)]
    guest.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *luks,
                 "--key-file=-", device], input=key, timeout=180)
    guest.check(["cryptsetup", "open", "--key-file=-", device, "labfmt"], input=key, timeout=180)
    guest.check(["mkfs.ext4", "-q", "/dev/mapper/labfmt"], timeout=180)
    guest.sh("mkdir -p /mnt/t/labfmt && mount /dev/mapper/labfmt /mnt/t/labfmt && "
             "echo hello > /mnt/t/labfmt/hello && umount /mnt/t/labfmt && rmdir /mnt/t/labfmt")
    guest.check(["cryptsetup", "close", "labfmt"], timeout=60)


def dummy_unit(volume: str, *, boot: bool = False) -> str:
    """A dependent service that only succeeds if the volume's filesystem is mounted."""
    order = (f"Requires=keyd-unlocked@{volume}.target\nAfter=keyd-unlocked@{volume}.target\n"
             f"PartOf=keyd-unlocked@{volume}.target\n") if boot else ""
    install = "[Install]\nWantedBy=keyd-lab.target\n" if boot else ""
    return (f"[Unit]\nDescription=keyd lab dependent of {volume}\n{order}\n"
            f"[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart=/bin/sh -c 'cat /mnt/t/{volume}/hello > /run/dummy-{volume}.out'\n"
            f"ExecStop=/bin/rm -f /run/dummy-{volume}.out\n{install}")


def dbus_call(guest: Any, verb: str, volume: str, *, as_nobody: bool = False,
              key: bytes | None = None) -> dict[str, Any]:
    """One D-Bus call through keyd's client in the guest (as root, or as nobody)."""
    argv = [str(GUEST_BIN / "python"), str(DBUS_CALL), verb, volume]
    if as_nobody:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    result = guest.check(argv, input=key, timeout=240)
    return dict(json.loads(result.stdout))


def answer_question(guest: Any, question_id: str, passphrase: bytes) -> None:
    """Answer keyd's systemd-ask-password question ``question_id`` as an agent does
    (systemd-tty-ask-password-agent, Plymouth): find it by its Id= in
    /run/systemd/ask-password/ask.*, reply on the Socket= it names."""
    script = (f"f=$(grep -lx 'Id={question_id}' /run/systemd/ask-password/ask.* | head -n1)\n"
              "sock=$(sed -n 's/^Socket=//p' \"$f\")\n"
              "/lib/systemd/systemd-reply-password 1 \"$sock\"\n")
    guest.check(["sh", "-ec", script], input=passphrase, timeout=60)


def asked(question_id: str) -> str:
    """A shell test: keyd's question ``question_id`` is pending."""
    return f"grep -qx 'Id={question_id}' /run/systemd/ask-password/ask.*"


def mappings(guest: Any) -> list[str]:
    """Names of the device-mapper devices in the guest."""
    out = guest.run(["dmsetup", "ls", "--noheadings"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] != "No"]
