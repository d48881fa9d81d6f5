"""``keyd-lab demo``: issue 6's story in the lab, as a NAS admin would watch it.

A NAS with RAID5 + LUKS2 + XFS on three disks; keyd running as a systemd
service; a signed key stick plugged in (keyd unlocks and mounts), ``keydctl
status``; the stick pulled (keyd locks after the grace); ``keydctl audit``.
:func:`tell_story` does it on any running lab (the VM test calls it on the
session's lab); :func:`run_demo` boots a lab of its own for it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from keyd.runner import SubprocessRunner
from keyd_lab.build import new_run_dir, prepare
from keyd_lab.channel import GuestCommandFailed, GuestResult
from keyd_lab.daemon_setup import (
    CHECKOUT,
    GNUPGHOME,
    Guest,
    Installation,
    Signer,
    audit_records,
    cursor,
    install_keyd,
    make_signer,
    make_stick,
    start_keyd,
    volume_key,
    volume_state,
    wait_until,
    write,
)
from keyd_lab.errors import LabError
from keyd_lab.media import StickSpec, create_disk
from keyd_lab.nas import (
    LOCK_EVENTS,
    UNLOCK_EVENTS,
    NasSpec,
    Step,
    keyd_toml,
    missing_from_trail,
    render_body,
    render_summary,
    render_title,
    timeline,
    trail_from_table,
)
from keyd_lab.vm import Lab, LabOptions

FAST_LUKS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


class StoryLab(Guest, Protocol):
    """A running lab the story can add disks and sticks to (the VM tests' GuestLab is one)."""

    def disk(self, serial: str, size_mb: int = 64) -> str:
        """Attach a new empty disk; return its guest path."""
        ...

    def plug(self, stick: StickSpec) -> str:
        """Hot-plug a stick; return its guest block device."""
        ...

    def unplug(self, serial: str) -> None:
        """Pull a stick."""
        ...


@dataclass
class StoryResult:
    """What the story showed, for the VM test to check."""

    steps: list[Step] = field(default_factory=list)
    mounted: str = ""              # the file read from the unlocked volume
    state_unlocked: str = ""       # keyd's state of the volume after the plug
    state_locked: str = ""         # ... and after the pull and the grace
    locked: bool = False           # no mount, mapping or array left after the pull
    trail: list[str] = field(default_factory=list)  # the EVENT column of keydctl audit


class Teller:
    """Runs the steps, printing each one as soon as it is done, numbered from ``first``."""

    def __init__(self, out: TextIO, first: int = 1) -> None:
        self.out = out
        self.number = first
        self.steps: list[Step] = []

    def step(self, title: str, action: Callable[[], tuple[str, str]]) -> None:
        """Print the numbered ``title``, run ``action`` (outcome, output), print what happened."""
        print(render_title(self.number, title), file=self.out, flush=True)
        started = time.monotonic()
        outcome, output = action()
        step = Step(title, outcome, time.monotonic() - started, output)
        self.steps.append(step)
        print(render_body(step), file=self.out, flush=True)
        self.number += 1


def tell_story(lab: StoryLab, workdir: Path, out: TextIO, spec: NasSpec | None = None,
               teller: Teller | None = None, *, how: Installation = CHECKOUT) -> StoryResult:
    """Build the NAS in ``lab``, install keyd (``how``), plug and pull the key stick; print each step."""
    spec = spec or NasSpec()
    teller = teller or Teller(out)
    result = StoryResult()
    since = lab.sh("date -u +%Y-%m-%dT%H:%M:%S").strip()
    md_uuid = ""

    def storage() -> tuple[str, str]:
        nonlocal md_uuid
        md_uuid, shown = build_storage(lab, spec)
        return (f"md RAID5 {md_uuid} -> LUKS2 -> XFS with {spec.file}; closed again, "
                "as after a reboot: the data waits for its key", shown)

    teller.step(f"Build the NAS's storage: disks {', '.join(spec.disks)} -> RAID5 -> LUKS2 -> XFS",
                storage)
    with closing(make_signer(workdir)) as signers:
        signer = next(signers)
        stick: list[StickSpec] = []
        teller.step("Make the key stick: the admin signs the volume's key, bound to the stick",
                    lambda: _make_stick(workdir, signer, spec, stick))
        teller.step("Install keyd as a systemd service, configured for the NAS volume",
                    lambda: _install(lab, signer, spec, md_uuid, how))
    teller.step(f"Plug in the key stick {spec.stick}: keyd unlocks and mounts the volume",
                lambda: _plug(lab, stick[0], spec, result))
    teller.step("keydctl status", lambda: (f"keyd reports volume {spec.volume} layer by layer",
                                           _keydctl(lab, how, "status")))
    teller.step(f"Pull the stick: keyd locks the volume after its {spec.grace:g} s grace",
                lambda: _pull(lab, spec, result))
    teller.step("keydctl audit: the trail of what happened, from the journal",
                lambda: _audit(lab, how, since, result))
    result.steps = teller.steps
    print(render_summary(teller.steps), file=out, flush=True)
    return result


class Transcript:
    """Commands run in the guest and their output, as the admin would have typed them."""

    def __init__(self, lab: StoryLab) -> None:
        self.lab = lab
        self.lines: list[str] = []

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60.0,
            check: bool = True) -> GuestResult:
        """Run ``argv`` (``check``: require exit 0) and add it, its time and output."""
        shown = shlex.join(argv) + ("   # the key on stdin" if input else "")
        return self._record(shown, argv, input, timeout, check)

    def sh(self, script: str, timeout: float = 60.0) -> GuestResult:
        """Run a shell line, shown as typed."""
        return self._record(script, ["sh", "-c", script], None, timeout, False)

    def _record(self, shown: str, argv: Sequence[str], input: bytes | None, timeout: float,
                check: bool) -> GuestResult:
        started = time.monotonic()
        result = self.lab.run(argv, input=input, timeout=timeout)
        if check and result.rc != 0:
            raise GuestCommandFailed(list(argv), result)
        self.lines.append(f"$ {shown}   [{time.monotonic() - started:.1f} s]")
        self.lines += (result.stdout + result.stderr).rstrip("\n").splitlines()
        return result

    def text(self) -> str:
        """The transcript so far."""
        return "\n".join(self.lines)


def build_storage(lab: StoryLab, spec: NasSpec) -> tuple[str, str]:
    """Three disks -> RAID5 -> LUKS2 (fast pbkdf2) -> XFS with a file, closed again.

    Returns the array's UUID and the transcript of the commands.
    """
    members = [lab.disk(serial, spec.disk_mb) for serial in spec.disks]
    shown, key, md, where = Transcript(lab), volume_key(spec.volume), "/dev/md/nasfmt", \
        f"{spec.mountpoint}-fmt"
    shown.run(["mdadm", "--create", md, "--run", "--level=5", "--raid-devices=3",
               "--assume-clean", "--metadata=1.2", *members], timeout=120)
    detail = lab.check(["mdadm", "--detail", "--export", md]).stdout
    md_uuid = dict(line.split("=", 1) for line in detail.splitlines() if "=" in line)["MD_UUID"]
    shown.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST_LUKS,
               "--key-file=-", md], input=key, timeout=180)
    shown.run(["cryptsetup", "open", "--key-file=-", md, "nasfmt"], input=key, timeout=180)
    shown.run(["mkfs.xfs", "-q", "-K", "/dev/mapper/nasfmt"], timeout=240)
    lab.sh(f"mkdir -p {where} && mount /dev/mapper/nasfmt {where} && "
           f"mkdir -p {where}/$(dirname {spec.file})")
    write(lab, f"{where}/{spec.file}", spec.file_text)
    shown.run(["lsblk", "-o", "NAME,SIZE,TYPE,FSTYPE,MOUNTPOINT", members[0]])
    lab.sh(f"umount {where} && rmdir {where}")
    shown.run(["cryptsetup", "close", "nasfmt"])
    shown.run(["mdadm", "--stop", md], timeout=120)
    lab.sh("udevadm settle", timeout=120)
    return md_uuid, shown.text()


def _make_stick(workdir: Path, signer: Signer, spec: NasSpec,
                made: list[StickSpec]) -> tuple[str, str]:
    made.append(make_stick(workdir, signer, spec.stick, {spec.volume: volume_key(spec.volume)}))
    bundle = workdir / f"stick-{spec.stick}"
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    return (f"keydctl enroll wrote a bundle for volume {spec.volume}, signed by "
            f"{signer.fingerprint[-16:]}, bound to serial {spec.stick}; files on the stick:",
            "\n".join(files))


def _install(lab: StoryLab, signer: Signer, spec: NasSpec, md_uuid: str,
             how: Installation) -> tuple[str, str]:
    config = keyd_toml(spec, signer.fingerprint, GNUPGHOME, md_uuid)
    installing = _seconds(lambda: install_keyd(lab, signer, config, how=how))
    starting = _seconds(lambda: start_keyd(lab))
    status = lab.run(["systemctl", "status", "keyd.service", "--no-pager", "--lines=0"]).stdout
    return (f"{how.what}, this /etc/keyd/keyd.toml and the signer's key: {installing:.1f} s; "
            f"systemctl start keyd.service until READY=1: {starting:.1f} s",
            f"{config}\n$ systemctl status keyd.service\n{status}")


def _seconds(action: Callable[[], None]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def _plug(lab: StoryLab, stick: StickSpec, spec: NasSpec, result: StoryResult) -> tuple[str, str]:
    start, since = cursor(lab), int(lab.sh("date +%s%6N"))
    device = lab.plug(stick)
    if not wait_until(lab, f"findmnt {spec.mountpoint} && test -e {spec.mountpoint}/{spec.file}",
                      180):
        raise LabError(f"keyd did not mount {spec.volume} at {spec.mountpoint} within 180 s",
                       fix="see 'journalctl -u keyd.service' in the lab's kept journal")
    result.mounted = lab.check(["cat", f"{spec.mountpoint}/{spec.file}"]).stdout
    result.state_unlocked = volume_state(lab, spec.volume)
    shown = [_shell(lab, f"findmnt {spec.mountpoint}"),
             _shell(lab, f"cat {spec.mountpoint}/{spec.file}")]
    when = timeline(audit_records(lab, start), since, UNLOCK_EVENTS)
    return (f"stick at {device}; keyd verified the bundle, assembled the array, opened LUKS and "
            f"mounted XFS: state {result.state_unlocked}; after the plug: {when}", "\n".join(shown))


def _pull(lab: StoryLab, spec: NasSpec, result: StoryResult) -> tuple[str, str]:
    start, since = cursor(lab), int(lab.sh("date +%s%6N"))
    lab.unplug(spec.stick)
    gone = (f"! findmnt {spec.mountpoint} && ! test -e /dev/mapper/{spec.mapper} && "
            f"! test -e {spec.array} && journalctl -q --since=@{since // 1_000_000} "
            f"SYSLOG_IDENTIFIER=keyd KEYD_EVENT=lock-finished KEYD_VOLUME={spec.volume} | grep -q .")
    result.locked = wait_until(lab, gone, 120 + spec.grace)
    result.state_locked = volume_state(lab, spec.volume)
    members = " ".join(f"/dev/disk/by-id/virtio-{serial}" for serial in spec.disks)
    shown = [_shell(lab, f"findmnt {spec.mountpoint} || echo 'not mounted'"),
             _shell(lab, f"lsblk -o NAME,SIZE,TYPE,FSTYPE {members}")]
    verdict = "locked: unmounted, LUKS closed, array stopped" if result.locked else "NOT locked"
    when = timeline(audit_records(lab, start), since, LOCK_EVENTS)
    return f"{verdict}; state {result.state_locked}; after the pull: {when}", "\n".join(shown)


def _audit(lab: StoryLab, how: Installation, since: str, result: StoryResult) -> tuple[str, str]:
    table = _keydctl(lab, how, "audit", "--since", since)
    result.trail = trail_from_table(table.partition("\n")[2])
    missing = missing_from_trail(result.trail)
    outcome = ("every decision is there, in order" if not missing
               else f"MISSING from the trail: {', '.join(missing)}")
    return outcome, table


def _keydctl(lab: StoryLab, how: Installation, *argv: str) -> str:
    """``$ keydctl ARGV`` and its output, as typed at the NAS's shell."""
    shown = Transcript(lab)
    shown.run([how.keydctl, *argv], timeout=180, check=False)
    return shown.text().replace(how.keydctl, "keydctl", 1)


def _shell(lab: StoryLab, script: str) -> str:
    shown = Transcript(lab)
    shown.sh(script)
    return shown.text()


class BootedLab:
    """A lab booted by ``keyd-lab demo`` seen as a :class:`StoryLab` (disk images in ``images``)."""

    def __init__(self, lab: Lab, images: Path) -> None:
        self.lab = lab
        self.images = images
        self.run, self.check, self.sh = lab.run, lab.check, lab.sh
        self.plug, self.unplug = lab.plug, lab.unplug

    def disk(self, serial: str, size_mb: int = 64) -> str:
        """A sparse disk image attached as virtio-blk."""
        return self.lab.attach_disk(create_disk(self.images / f"{serial}.img", size_mb), serial)


def run_demo(args: argparse.Namespace) -> int:
    """Boot a lab NAS and tell the story in it; returns an exit code (1 if it did not end well)."""
    print("keyd demo: a NAS with RAID5 + LUKS2 + XFS, unlocked by a signed USB key stick\n",
          flush=True)
    teller = Teller(sys.stdout)
    with _booted(args, teller) as lab, tempfile.TemporaryDirectory(prefix="keyd-demo-") as tmp:
        result = tell_story(BootedLab(lab, Path(tmp)), Path(tmp), sys.stdout, teller=teller)
    return 0 if ended_well(result) else 1


def ended_well(result: StoryResult) -> bool:
    """Whether the story was told in full: mounted, unlocked, locked again, a complete trail."""
    return (bool(result.mounted) and result.state_unlocked == "unlocked" and result.locked
            and not missing_from_trail(result.trail))


@contextmanager
def _booted(args: argparse.Namespace, teller: Teller) -> Iterator[Lab]:
    """Boot the lab as the story's first step; close it after (keeping its evidence on failure)."""
    booted: list[Lab] = []

    def boot() -> tuple[str, str]:
        artifacts = prepare(SubprocessRunner())
        options = LabOptions(memory_mb=args.memory, boot_timeout=args.boot_timeout)
        booted.append(Lab.boot(artifacts.kernel, artifacts.initramfs, new_run_dir("demo"), options))
        versions = booted[0].check(["sh", "-c", "uname -sr; cryptsetup --version; "
                                    "mdadm --version 2>&1; systemctl --version | head -n1"])
        return f"guest up in {booted[0].boot_seconds:.1f} s", versions.stdout

    teller.step("Boot the lab NAS (QEMU, Debian's kernel, the host's root read-only)", boot)
    try:
        yield booted[0]
    except BaseException:
        print(f"keyd demo: the guest's journal and console are kept in {booted[0].collect()}",
              file=sys.stderr)
        raise
    finally:
        booted[0].close()
