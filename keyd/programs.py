"""Every external program keyd runs, declared once with the apt package that ships it.

Standard library only: the development tree's set-up imports it with the system
Python to list what ``make deps`` installs, and the Debian package's dependencies
are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    """An external program: its name on PATH and the Debian package that provides it."""

    name: str
    package: str
    version_argv: tuple[str, ...] = ("--version",)


PROGRAMS: dict[str, Program] = {p.name: p for p in (
    Program("cryptsetup", "cryptsetup-bin"),
    Program("mdadm", "mdadm"),
    Program("mount", "mount"),
    Program("umount", "mount"),
    Program("losetup", "mount"),
    Program("sync", "coreutils"),
    Program("blkid", "util-linux", ("-V",)),
    Program("wipefs", "util-linux"),
    Program("fuser", "psmisc", ("-V",)),
    Program("gpg", "gnupg"),
    Program("gpgconf", "gpgconf"),
    Program("udevadm", "udev"),
    Program("systemctl", "systemd"),
    Program("journalctl", "systemd"),
    Program("systemd-tmpfiles", "systemd"),
    Program("systemd-sysusers", "systemd"),
    Program("systemd-ask-password", "systemd"),
    Program("ntfs-3g", "ntfs-3g", ("--version",)),
    Program("modprobe", "kmod"),
    # zfs layers; zfsutils-linux is in Debian's contrib.
    Program("zpool", "zfsutils-linux", ("version",)),
    Program("zfs", "zfsutils-linux", ("version",)),
)}


def program(name: str) -> Program:
    """Return the declaration of ``name``; a program keyd does not declare is a bug."""
    return PROGRAMS[name]


def packages() -> list[str]:
    """The apt packages that ship the programs keyd runs, sorted and unique."""
    return sorted({p.package for p in PROGRAMS.values()})
