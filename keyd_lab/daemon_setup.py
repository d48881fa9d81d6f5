"""keyd as a service in the lab guest: a signer, signed key sticks, install/start, the audit trail.

Used by ``keyd-lab demo`` and the daemon VM tests. The daemon runs as the real
keyd.service (installed with ``keydctl install``) under the guest's systemd,
with udev, the system bus and journald. Configs, keys and the signer's public
key travel over the agent channel, never via files written on the host after
boot (the guest sees the host's root through 9p with cache=loose).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from keyd.audit.ids import EVENT_BY_ID
from keyd.runner import Runner, SubprocessRunner
from keyd_lab import gpg_scratch
from keyd_lab.channel import GuestResult
from keyd_lab.errors import LabError
from keyd_lab.media import StickSpec, build_stick
from keyd_lab.nas import missing_from_trail

# The guest sees the host's root: the venv running this is at the same path there.
GUEST_BIN = Path(sys.prefix) / "bin"
KEYDCTL_HOST = [sys.executable, "-m", "keyd.cli.main"]
GNUPGHOME = "/etc/keyd/gnupg"


class Guest(Protocol):
    """What these helpers need of a lab guest (keyd_lab.vm.Lab, the VM tests' GuestLab)."""

    def run(self, argv: Sequence[str], input: bytes | str | None = None,
            timeout: float = 60.0) -> GuestResult:
        """Run argv in the guest."""
        ...

    def check(self, argv: Sequence[str], input: bytes | str | None = None,
              timeout: float = 60.0) -> GuestResult:
        """Run argv in the guest; raise unless it exits 0."""
        ...

    def sh(self, script: str, timeout: float = 60.0) -> str:
        """Run a shell script in the guest; return its stdout."""
        ...


@dataclass(frozen=True)
class Signer:
    """A throwaway signing key on the host and its exported public key."""

    home: Path
    fingerprint: str
    public: bytes


def make_signer(base: Path, uid: str = "NAS admin <admin@keyd.test>") -> Generator[Signer, None, None]:
    """A scratch GnuPG home with one fast signing key (generator: stops its agent when closed)."""
    runner = SubprocessRunner()
    home = gpg_scratch.make_home(base / "gnupg")
    fpr = gpg_scratch.new_key(runner, home, uid)
    public = runner.run(["gpg", "--homedir", str(home), "--batch", "--export", "--armor", fpr]).stdout
    try:
        yield Signer(home, fpr, public.encode())
    finally:
        gpg_scratch.stop_agent(runner, home)


def volume_key(name: str) -> bytes:
    """A fixed, printable key per volume (no newline: keyd drops one trailing newline)."""
    return (f"keyd-lab-key-for-{name}-" + "0123456789abcdef" * 3).encode()


def make_stick(base: Path, signer: Signer, serial: str,
               volumes: Mapping[str, bytes | Mapping[str, bytes]], *,
               bind_serial: str | None = None, runner: Runner | None = None,
               extra: Sequence[str] = ()) -> StickSpec:
    """A vfat stick image with bundles for ``volumes`` signed by ``signer`` (``keydctl enroll``).

    A volume's key is bytes (one key for every layer) or key name -> bytes (format 2).
    Calling it again for the same serial re-keys: the bundles get the next generation.
    ``extra``: more enroll options (e.g. ``--volume-uuid``).
    """
    runner = runner or SubprocessRunner()
    for volume, keys in volumes.items():
        named = {"": keys} if isinstance(keys, bytes) else dict(keys)
        sources = []
        for name, key in named.items():
            key_file = base / f"{serial}-{volume}-{name or 'all'}.key"
            key_file.write_bytes(key)
            sources += ["--key-file", f"{name}={key_file}" if name else str(key_file)]
        _enroll(runner, base, signer, serial, volume, *sources,
                "--bind-serial", bind_serial or serial, *extra)
    return _image(runner, base, serial)


def make_backup_stick(base: Path, signer: Signer, primary: str, serial: str, volume: str, *,
                      runner: Runner | None = None) -> StickSpec:
    """A backup stick for ``volume`` of the stick ``primary`` made by :func:`make_stick`
    (``keydctl enroll --backup-of``): the same keys and generation, bound to ``serial``."""
    runner = runner or SubprocessRunner()
    _enroll(runner, base, signer, serial, volume, "--backup-of", str(base / f"stick-{primary}"),
            "--bind-serial", serial)
    return _image(runner, base, serial)


def make_share_sticks(base: Path, signer: Signer, serials: Sequence[str], volume: str, key: bytes,
                      *, threshold: int, runner: Runner | None = None,
                      extra: Sequence[str] = ()) -> list[StickSpec]:
    """One stick per serial, each with a share of a k-of-n enrollment for ``volume``
    (``keydctl enroll --shares``): any ``threshold`` of them together open it with ``key``."""
    runner = runner or SubprocessRunner()
    base.mkdir(parents=True, exist_ok=True)
    key_file = base / f"{volume}-shared.key"
    key_file.write_bytes(key)
    sticks = [arg for serial in serials
              for arg in ("--output", str(base / f"stick-{serial}"), "--bind-serial", serial)]
    runner.run([*KEYDCTL_HOST, "enroll", "--volume", volume, "--signing-key", signer.fingerprint,
                "--signer", signer.fingerprint, "--gnupghome", str(signer.home),
                "--state-dir", str(base / f"state-{serials[0]}"), "--key-file", str(key_file),
                "--shares", str(len(serials)), "--threshold", str(threshold), *sticks, *extra],
               timeout=120)
    return [_image(runner, base, serial) for serial in serials]


def _enroll(runner: Runner, base: Path, signer: Signer, serial: str, volume: str,
            *options: str) -> None:
    runner.run([*KEYDCTL_HOST, "enroll", "--volume", volume,
                "--signing-key", signer.fingerprint, "--signer", signer.fingerprint,
                "--gnupghome", str(signer.home), "--state-dir", str(base / f"state-{serial}"),
                "--output", str(base / f"stick-{serial}"), *options], timeout=120)


def _image(runner: Runner, base: Path, serial: str) -> StickSpec:
    stick_dir = base / f"stick-{serial}"
    files = {str(p.relative_to(stick_dir)): p.read_bytes() for p in stick_dir.rglob("*") if p.is_file()}
    image = build_stick(runner, base / f"{serial}.img", label="KEYS", files=files)
    return StickSpec(image, serial)


def config_toml(signer: Signer, volumes: str) -> str:
    """keyd.toml: the pinned signer and the volumes."""
    return f'[trust]\nsigners = ["{signer.fingerprint}"]\ngnupghome = "{GNUPGHOME}"\n{volumes}'


def write(guest: Guest, path: str, text: str | bytes, mode: str = "0644") -> None:
    """Create a file in the guest from data sent over the channel."""
    guest.check(["sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}'],
                input=text)


@dataclass(frozen=True)
class Installation:
    """How keyd gets into the guest, and where its keydctl then is."""

    what: str                          # as the story tells it
    keydctl: str
    argv: tuple[str, ...]              # run in the guest; installs keyd


# From this checkout, with the venv's Python and libraries.
CHECKOUT = Installation("keydctl install (unit, udev rule, D-Bus policy)", str(GUEST_BIN / "keydctl"),
                        (str(GUEST_BIN / "keydctl"), "install"))


def debian_package(deb: str) -> Installation:
    """The Debian package at ``deb`` in the guest, with Debian's python3 and libraries.

    Its dependencies and recommendations are installed on the host by ``make deps``
    (keyd_lab.programs reads them from debian/control) and the guest runs the host's root,
    which has no network: apt-get fails rather than download anything that is missing.
    (apt-get's --no-download would fail at once, but refuses a local .deb.)
    """
    return Installation(f"apt-get install {deb} (Debian's python3 and python3-* libraries)",
                        "/usr/bin/keydctl",
                        ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                         deb))


def install_keyd(guest: Guest, signer: Signer, config: str,
                 units: Mapping[str, str] | None = None, how: Installation = CHECKOUT) -> None:
    """Install keyd in the guest (``how``), then keyd.toml, the signer's key and dependent units."""
    guest.run(["systemctl", "unmask", "--runtime", "keyd.service"], timeout=60)
    guest.check(list(how.argv), timeout=600)
    write(guest, "/etc/keyd/keyd.toml", config)
    guest.sh(f"rm -rf {GNUPGHOME} /var/lib/keyd/* && mkdir -m 700 -p {GNUPGHOME}")
    guest.check(["gpg", "--homedir", GNUPGHOME, "--batch", "--import"], input=signer.public,
                timeout=120)
    for name, text in (units or {}).items():
        write(guest, f"/etc/systemd/system/{name}", text)
    guest.check(["systemctl", "daemon-reload"], timeout=120)


def installed_root(base: Path, signer: Signer, config: str, units: Mapping[str, str] | None = None,
                   target: str = "keyd-lab.target") -> Path:
    """A tree to lay over a guest root at boot (``LabOptions.extra_root``): keyd installed
    with ``keydctl install --root``, ``config`` as keyd.toml, the signer's key, and keyd.service
    plus ``units`` (name -> text) enabled for ``target``."""
    root = base / "root"
    runner = SubprocessRunner()
    runner.run([*KEYDCTL_HOST, "install", "--root", str(root)], timeout=120)
    etc = root / "etc"
    (etc / "keyd" / "keyd.toml").write_text(config)
    home = etc / "keyd" / "gnupg"
    home.mkdir(mode=0o700)
    # No agent for a public key: its socket would not fit a deep pytest-xdist tmp path.
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-autostart", "--import"],
                   input=signer.public, check=True, capture_output=True)
    gpg_scratch.stop_agent(runner, home)
    for socket in home.glob("S.*"):
        socket.unlink()
    wants = etc / "systemd" / "system" / f"{target}.wants"
    wants.mkdir(parents=True)
    (wants / "keyd.service").symlink_to("/usr/lib/systemd/system/keyd.service")
    for name, text in (units or {}).items():
        (etc / "systemd" / "system" / name).write_text(text)
        (wants / name).symlink_to(f"/etc/systemd/system/{name}")
    return root


def start_keyd(guest: Guest) -> None:
    """Start keyd.service (Type=notify: returns once keyd sent READY=1)."""
    result = guest.run(["systemctl", "start", "keyd.service"], timeout=240)
    if result.rc != 0:
        raise LabError(f"keyd.service did not start: {result.stderr.strip()}\n"
                       f"{journal_text(guest, 'keyd.service')}")


def stop_keyd(guest: Guest) -> None:
    """Stop keyd and forget its failures.

    keyd stays masked until the next install: its udev rule would otherwise start it for
    the sticks that later, non-daemon tests in the same lab plug in.
    """
    guest.run(["systemctl", "stop", "keyd.service"], timeout=180)
    guest.run(["systemctl", "reset-failed", "keyd.service"], timeout=60)
    guest.run(["systemctl", "mask", "--runtime", "keyd.service"], timeout=60)


def journal_text(guest: Guest, unit: str) -> str:
    """The unit's journal, for failure messages."""
    return str(guest.run(["journalctl", "-b", "-u", unit, "--no-pager", "-n", "200"],
                         timeout=60).stdout)


def cursor(guest: Guest) -> str:
    """The journal's current cursor (records after it belong to what follows)."""
    out = guest.check(["journalctl", "-n", "1", "-o", "json", "--no-pager"]).stdout
    return str(json.loads(out.strip().splitlines()[-1])["__CURSOR"])


def audit_records(guest: Guest, after: str, awaiting: Sequence[str] = (), volume: str | None = None,
                  timeout: float = 60.0) -> list[dict[str, str]]:
    """keyd's audit records (those with a keyd MESSAGE_ID) after ``after``, in journal order.

    keyd writes a record a moment after the change it reports: a test that saw the change in
    the kernel names the events it will assert on in ``awaiting`` (in order; about ``volume``
    if given), and the trail is read again until they are all there or ``timeout`` has passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = _audit_records_now(guest, after)
        if not missing_from_trail(events(records, volume), awaiting) or time.monotonic() >= deadline:
            return records
        time.sleep(0.5)


def _audit_records_now(guest: Guest, after: str) -> list[dict[str, str]]:
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


def wait_until(guest: Guest, condition: str, timeout: float = 120.0) -> bool:
    """Poll a shell condition in the guest (one round trip); True once it held."""
    tries = int(timeout * 2)
    result = guest.run(["sh", "-c", f"for i in $(seq {tries}); do ( {condition} ) >/dev/null 2>&1 "
                        "&& exit 0; sleep 0.5; done; exit 1"], timeout=timeout + 60)
    return bool(result.rc == 0)


def wait_state(guest: Guest, volume: str, state: str, timeout: float = 120.0) -> bool:
    """Poll the daemon's state of ``volume`` until it is ``state`` (a mount can appear
    before keyd has finished its job: services, records)."""
    call = ("busctl --json=short call org.keyd.Keyd1 /org/keyd/Keyd1 org.keyd.Keyd1.Manager "
            f"GetVolume s {volume}")
    return wait_until(guest, f"{call} | grep -q '\"state\":\"{state}\"'", timeout)


def volume_state(guest: Guest, volume: str) -> str:
    """The daemon's state of ``volume`` over D-Bus (busctl, as root)."""
    out = guest.check(["busctl", "--json=short", "call", "org.keyd.Keyd1", "/org/keyd/Keyd1",
                       "org.keyd.Keyd1.Manager", "GetVolume", "s", volume], timeout=60).stdout
    return str(json.loads(out)["data"][0]["state"])
