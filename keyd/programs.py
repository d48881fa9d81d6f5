"""Every external program keyd runs, declared once with the apt package that ships it.

Run as ``python3 -m keyd.programs --apt`` (standard library only) to print the
apt packages that the product, its build and its lab need; the Makefile's
install step uses that, so the list lives in one place.
"""

from __future__ import annotations

import sys
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
    Program("mkfs.xfs", "xfsprogs", ("-V",)),
    Program("mkfs.ext4", "e2fsprogs", ("-V",)),
    Program("mkfs.vfat", "dosfstools", ("--help",)),
    Program("mkfs.exfat", "exfatprogs", ("-V",)),
    Program("ntfs-3g", "ntfs-3g", ("--version",)),
    Program("mkntfs", "ntfs-3g", ("--version",)),
    Program("tcplay", "tcplay", ("-v",)),
    Program("modprobe", "kmod"),
    # zfs layers (issue 7); zfsutils-linux is in Debian's contrib.
    Program("zpool", "zfsutils-linux", ("version",)),
    Program("zfs", "zfsutils-linux", ("version",)),
    # The lab's host-side tools (keyd/lab): building the guest and its media.
    Program("qemu-system-x86_64", "qemu-system-x86"),
    Program("apt-get", "apt"),
    Program("apt-cache", "apt"),
    Program("dpkg-deb", "dpkg"),
    Program("depmod", "kmod"),
    Program("mcopy", "mtools"),
    Program("mmd", "mtools"),
    Program("mksquashfs", "squashfs-tools", ("-version",)),
    # Builds the lab kernel's OpenZFS modules (keyd/lab/zfs.py), in its own trees.
    Program("dkms", "dkms"),
)}

# Needed to build the Python dependencies (PyGObject, systemd-python) in a venv.
BUILD_PACKAGES = ("python3-venv", "python3-dev", "gcc", "pkg-config", "libgirepository1.0-dev",
                  "libcairo2-dev", "libsystemd-dev", "gir1.2-glib-2.0")

# Needed by the QEMU lab: the guest runs the host's root read-only, so the
# guest's tools (systemd, udev, dbus, mkfs...) are installed on the host too.
LAB_PACKAGES = ("qemu-system-x86", "qemu-utils", "busybox-static", "kmod", "cpio", "udev", "dbus",
                "systemd", "mtools", "squashfs-tools", "lsof")
# ZFS in the lab (from Debian's contrib, which `make apt` enables): the guest's zpool/zfs come from
# the host's zfsutils-linux; dkms, gcc-12, libc6-dev, make and file build the module
# (keyd/lab/zfs.py). zfs-dkms itself is only downloaded and extracted, so its postinst never
# builds for the host's own kernel.
ZFS_LAB_PACKAGES = ("zfsutils-linux", "dkms", "gcc-12", "libc6-dev", "make", "file")


def program(name: str) -> Program:
    """Return the declaration of ``name``; a program keyd does not declare is a bug."""
    return PROGRAMS[name]


def apt_packages() -> list[str]:
    """All apt packages keyd, its build and its lab need, sorted and unique."""
    names = {p.package for p in PROGRAMS.values()} | set(BUILD_PACKAGES) | set(LAB_PACKAGES)
    names |= set(ZFS_LAB_PACKAGES)
    return sorted(names)


if __name__ == "__main__":
    if sys.argv[1:] != ["--apt"]:
        sys.exit("usage: python3 -m keyd.programs --apt")
    print(" ".join(apt_packages()))
