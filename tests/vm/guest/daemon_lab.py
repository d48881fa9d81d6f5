"""Host-side helpers of the daemon lab tests (tests/vm/test_daemon_*.py): signed sticks, keyd in the guest.

The daemon runs as the real keyd.service (installed with ``keydctl install``)
under the guest's systemd, with udev, the system bus and journald. Configs,
keys and the signer's public key travel over the agent channel, never via
files written on the host after boot (9p cache=loose).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyd.audit.ids import EVENT_BY_ID
from keyd.lab.media import StickSpec, build_stick
from keyd.runner import SubprocessRunner
from keyd.trust import scratch

REPO = Path(__file__).resolve().parents[3]
GUEST_BIN = REPO / ".venv" / "bin"
KEYDCTL_HOST = [sys.executable, "-m", "keyd.cli.main"]
FAST_LUKS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
GNUPGHOME = "/etc/keyd/gnupg"
DBUS_CALL = Path(__file__).with_name("daemon_dbus_call.py")


@dataclass(frozen=True)
class Signer:
    """A throwaway signing key on the host and its exported public key."""

    home: Path
    fingerprint: str
    public: bytes


def make_signer(base: Path, uid: str = "NAS admin <admin@keyd.test>") -> Iterator[Signer]:
    """A scratch GnuPG home with one fast signing key (generator: stops its agent after)."""
    runner = SubprocessRunner()
    home = scratch.make_home(base / "gnupg")
    fpr = scratch.new_key(runner, home, uid)
    public = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export", "--armor", fpr],
                            check=True, capture_output=True).stdout
    yield Signer(home, fpr, public)
    scratch.stop_agent(runner, home)


def volume_key(name: str) -> bytes:
    """A fixed, printable key per volume (no newline: keyd drops one trailing newline)."""
    return (f"keyd-lab-key-for-{name}-" + "0123456789abcdef" * 3).encode()


def make_stick(base: Path, signer: Signer, serial: str, volumes: Mapping[str, bytes], *,
               bind_serial: str | None = None) -> StickSpec:
    """A vfat stick image with signed bundles for ``volumes`` (bound to ``bind_serial``)."""
    stick_dir = base / f"stick-{serial}"
    for volume, key in volumes.items():
        key_file = base / f"{serial}-{volume}.key"
        key_file.write_bytes(key)
        subprocess.run([*KEYDCTL_HOST, "enroll", "--volume", volume,
                        "--signing-key", signer.fingerprint, "--signer", signer.fingerprint,
                        "--gnupghome", str(signer.home), "--state-dir", str(base / f"state-{serial}"),
                        "--output", str(stick_dir), "--key-file", str(key_file),
                        "--bind-serial", bind_serial or serial],
                       check=True, capture_output=True)
    files = {str(p.relative_to(stick_dir)): p.read_bytes() for p in stick_dir.rglob("*") if p.is_file()}
    image = build_stick(SubprocessRunner(), base / f"{serial}.img", label="KEYS", files=files)
    return StickSpec(image, serial)


def volume_toml(name: str, device: str, services: list[str] | None = None) -> str:
    """A LUKS2 + ext4 volume mounted under /mnt/t/NAME."""
    units = ", ".join(f'"{u}"' for u in services or [])
    return f"""
[volume.{name}]
services = [{units}]

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


def config_toml(signer: Signer, volumes: str) -> str:
    """keyd.toml: the pinned signer and the volumes."""
    return f'[trust]\nsigners = ["{signer.fingerprint}"]\ngnupghome = "{GNUPGHOME}"\n{volumes}'


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


def write(guest: Any, path: str, text: str | bytes, mode: str = "0644") -> None:
    """Create a file in the guest from data sent over the channel."""
    guest.check(["sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}'],
                input=text)


def install_keyd(guest: Any, signer: Signer, config: str, policy: str,
                 units: Mapping[str, str] = {}) -> None:
    """keydctl install in the guest, then config, policy, signer key and dependent units."""
    guest.run(["systemctl", "unmask", "--runtime", "keyd.service"], timeout=60)
    guest.check([str(GUEST_BIN / "keydctl"), "install"], timeout=180)
    write(guest, "/etc/keyd/keyd.toml", config)
    write(guest, "/etc/keyd/daemon.toml", policy)
    guest.sh(f"rm -rf {GNUPGHOME} /var/lib/keyd/* && mkdir -m 700 -p {GNUPGHOME}")
    guest.check(["gpg", "--homedir", GNUPGHOME, "--batch", "--import"], input=signer.public,
                timeout=120)
    for name, text in units.items():
        write(guest, f"/etc/systemd/system/{name}", text)
    guest.check(["systemctl", "daemon-reload"], timeout=120)


def start_keyd(guest: Any) -> None:
    """Start keyd.service (Type=notify: returns once keyd sent READY=1)."""
    result = guest.run(["systemctl", "start", "keyd.service"], timeout=240)
    assert result.rc == 0, (result, journal_text(guest, "keyd.service"))


def stop_keyd(guest: Any) -> None:
    """Stop keyd and forget its failures (between tests).

    keyd stays masked until the next install: its udev rule would otherwise start it for
    the sticks that later, non-daemon tests in the same lab plug in.
    """
    guest.run(["systemctl", "stop", "keyd.service"], timeout=180)
    guest.run(["systemctl", "reset-failed", "keyd.service"], timeout=60)
    guest.run(["systemctl", "mask", "--runtime", "keyd.service"], timeout=60)


def journal_text(guest: Any, unit: str) -> str:
    """The unit's journal, for failure messages."""
    return str(guest.run(["journalctl", "-b", "-u", unit, "--no-pager", "-n", "200"],
                         timeout=60).stdout)


def cursor(guest: Any) -> str:
    """The journal's current cursor (records after it belong to this test)."""
    out = guest.check(["journalctl", "-n", "1", "-o", "json", "--no-pager"]).stdout
    return str(json.loads(out.strip().splitlines()[-1])["__CURSOR"])


def audit_records(guest: Any, after: str) -> list[dict[str, str]]:
    """keyd's audit records (those with a keyd MESSAGE_ID) after ``after``, in journal order."""
    # No match on the command line: with one, journalctl --after-cursor skips the first
    # matching entry when the cursor's own entry does not match (seen with systemd 252).
    out = guest.check(["journalctl", "-o", "json", "--no-pager", f"--after-cursor={after}"],
                      timeout=120).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries
            if e.get("SYSLOG_IDENTIFIER") == "keyd" and e.get("MESSAGE_ID") in EVENT_BY_ID]


def events(records: list[dict[str, str]], volume: str | None = None) -> list[str]:
    """The KEYD_EVENT of each record (only those about ``volume`` if given)."""
    return [str(EVENT_BY_ID[r["MESSAGE_ID"]]) for r in records
            if volume is None or r.get("KEYD_VOLUME") == volume]


def wait_until(guest: Any, condition: str, timeout: float = 120.0) -> bool:
    """Poll a shell condition in the guest (one round trip); True once it held."""
    tries = int(timeout * 2)
    result = guest.run(["sh", "-c", f"for i in $(seq {tries}); do ( {condition} ) >/dev/null 2>&1 "
                        "&& exit 0; sleep 0.5; done; exit 1"], timeout=timeout + 60)
    return bool(result.rc == 0)


def volume_state(guest: Any, volume: str) -> str:
    """The daemon's state of ``volume`` over D-Bus (busctl, as root)."""
    out = guest.check(["busctl", "--json=short", "call", "org.keyd.Keyd1", "/org/keyd/Keyd1",
                       "org.keyd.Keyd1.Manager", "GetVolume", "s", volume], timeout=60).stdout
    return str(json.loads(out)["data"][0]["state"])


def dbus_call(guest: Any, verb: str, volume: str, *, as_nobody: bool = False,
              key: bytes | None = None) -> dict[str, Any]:
    """One D-Bus call through keyd's client in the guest (as root, or as nobody)."""
    argv = [str(GUEST_BIN / "python"), str(DBUS_CALL), verb, volume]
    if as_nobody:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    result = guest.check(argv, input=key, timeout=240)
    return dict(json.loads(result.stdout))


def mappings(guest: Any) -> list[str]:
    """Names of the device-mapper devices in the guest."""
    out = guest.run(["dmsetup", "ls", "--noheadings"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] != "No"]
