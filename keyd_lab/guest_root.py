"""Files laid over the guest's root at boot: the lab target, the agent unit and a few fixes.

The guest runs the host's own root read-only, so everything guest-specific is
written here, into a per-boot directory that init.sh copies into the overlay.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

AGENT = Path(__file__).with_name("guest_agent.py").resolve()
UDEV_AT_BOOT = "/run/keyd-lab/udev-at-boot.txt"

TARGET = """\
[Unit]
Description=keyd lab guest ready
Requires=sysinit.target systemd-udevd.service systemd-journald.service dbus.service
Requires=keyd-lab-agent.service keyd-lab-udev-snapshot.service
After=sysinit.target systemd-udevd.service systemd-journald.service dbus.service
After=keyd-lab-agent.service keyd-lab-udev-snapshot.service
AllowIsolate=yes
"""

AGENT_UNIT = f"""\
[Unit]
Description=keyd lab guest agent (host command channel)
DefaultDependencies=no
After=systemd-journald.service
[Service]
ExecStart={sys.base_prefix}/bin/python3 {AGENT}
Restart=always
"""

# Records what udev knew before the target was reached: the proof that a stick
# present at boot is visible to a coldplugging service.
UDEV_SNAPSHOT_UNIT = f"""\
[Unit]
Description=keyd lab: snapshot udev's database after coldplug
DefaultDependencies=no
After=systemd-udev-trigger.service systemd-udevd.service
Wants=systemd-udev-trigger.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'udevadm settle --timeout=60; mkdir -p /run/keyd-lab; \
  for serial in $(cat /etc/keyd-lab/boot-sticks); do \
    for i in $(seq 1 300); do ls /dev/disk/by-id | grep -q "^usb-.*_$serial-" && break; sleep 0.1; done; \
  done; udevadm settle --timeout=60; udevadm info --export-db > {UDEV_AT_BOOT}'
"""

# Coldplug only what a NAS lab has: buses that load drivers (pci, usb, scsi,
# virtio) and the block and misc devices keyd works with. Under TCG, replaying
# every tty, cpu and memory block costs most of the boot.
UDEV_TRIGGER = """\
[Service]
ExecStart=
ExecStart=-udevadm trigger --type=subsystems --action=add
ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=pci \
 --subsystem-match=usb --subsystem-match=scsi --subsystem-match=scsi_disk --subsystem-match=block \
 --subsystem-match=virtio --subsystem-match=virtio-ports --subsystem-match=misc \
 --subsystem-match=bdi --subsystem-match=md
ExecStart=-udevadm trigger --type=devices --action=add --sysname-match=ttyS0
"""

# Units a lab guest has no use for; each costs seconds under TCG.
MASKED = ("systemd-timesyncd.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
          "systemd-update-utmp.service", "systemd-journal-flush.service", "e2scrub_reap.service",
          "systemd-pstore.service", "mdadm-shutdown.service", "tmp.mount",
          # The host's users and groups are already there: nothing for sysusers to create.
          "systemd-sysusers.service")
GENERATORS = Path("/usr/lib/systemd/system-generators")

AUTOLOGIN = """\
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
"""


def write_guest_root(directory: Path, *, shell: bool = False,
                     boot_sticks: Sequence[str] = (), extra_root: Path | None = None) -> Path:
    """Write the per-boot overlay tree into ``directory`` and return it.

    ``extra_root`` is a tree laid over the guest root as well (e.g. keyd's units
    installed with ``keydctl install --root``), so a boot can start with them.
    """
    units = directory / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    target = TARGET + ("Wants=serial-getty@ttyS0.service\n" if shell else "")
    _write(units / "keyd-lab.target", target)
    _write(units / "keyd-lab-agent.service", AGENT_UNIT)
    _write(units / "keyd-lab-udev-snapshot.service", UDEV_SNAPSHOT_UNIT)
    _link(units / "default.target", "keyd-lab.target")
    for unit in MASKED:  # tmp.mount among them: keep /tmp the host's, checkouts may live there
        _link(units / unit, "/dev/null")
    _write(units / "systemd-udev-trigger.service.d" / "lab.conf", UDEV_TRIGGER)
    # Generators would turn the host's fstab, crypttab and init scripts into guest units.
    generators = directory / "etc" / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for generator in GENERATORS.glob("*"):
        _link(generators / generator.name, "/dev/null")
    if shell:
        _write(units / "serial-getty@ttyS0.service.d" / "autologin.conf", AUTOLOGIN)
    # Debian's tmp.conf empties /tmp at boot ('D'); a plain 'd' keeps what the host has.
    _write(directory / "etc" / "tmpfiles.d" / "tmp.conf", "d /tmp 1777 root root -\n")
    _write(directory / "etc" / "machine-id", secrets.token_hex(16) + "\n")
    _write(directory / "etc" / "hostname", "keyd-lab\n")
    # The USB serials present at power-on: the snapshot waits for their block devices.
    _write(directory / "etc" / "keyd-lab" / "boot-sticks", "".join(f"{s}\n" for s in boot_sticks))
    if extra_root is not None:
        shutil.copytree(extra_root, directory, symlinks=True, dirs_exist_ok=True)
    return directory


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(path: Path, target: str) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)
