"""What the lab and the development tree need on the host, beside the programs keyd runs.

Run as ``python3 -m keyd_lab.programs --apt`` (standard library only) to print
every apt package that the product, its build and its lab need; ``make deps``
installs what is missing from that list, so it lives in one place.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from keyd.programs import Program, packages

CONTROL = Path(__file__).resolve().parents[1] / "debian" / "control"

# The lab's tools: building the guest and its media on the host, and the stacks that tests
# and the demo make in the guest (which runs the host's root).
LAB_PROGRAMS: dict[str, Program] = {p.name: p for p in (
    Program("mkfs.xfs", "xfsprogs", ("-V",)),
    Program("mkfs.ext4", "e2fsprogs", ("-V",)),
    Program("mkfs.vfat", "dosfstools", ("--help",)),
    Program("mkfs.exfat", "exfatprogs", ("-V",)),
    Program("mkntfs", "ntfs-3g", ("--version",)),
    Program("tcplay", "tcplay", ("-v",)),
    Program("qemu-system-x86_64", "qemu-system-x86"),
    Program("apt-get", "apt"),
    Program("apt-cache", "apt"),
    Program("dpkg-deb", "dpkg"),
    Program("depmod", "kmod"),
    Program("mcopy", "mtools"),
    Program("mmd", "mtools"),
    Program("mksquashfs", "squashfs-tools", ("-version",)),
    # Builds the lab kernel's OpenZFS modules (keyd_lab/zfs.py), in its own trees.
    Program("dkms", "dkms"),
)}

# Needed to build the Python dependencies (PyGObject, systemd-python, pyfuse3) in a venv.
BUILD_PACKAGES = ("python3-venv", "python3-dev", "gcc", "pkg-config", "libgirepository1.0-dev",
                  "libcairo2-dev", "libsystemd-dev", "gir1.2-glib-2.0", "libfuse3-dev")

# Needed by `make deb` beside debian/control's Build-Depends (which `make deps` installs too).
DEB_PACKAGES = ("dpkg-dev", "fakeroot", "lintian")

# Needed by the QEMU lab: the guest runs the host's root read-only, so the
# guest's tools (systemd, udev, dbus, mkfs...) are installed on the host too.
LAB_PACKAGES = ("qemu-system-x86", "qemu-utils", "busybox-static", "kmod", "cpio", "udev", "dbus",
                "systemd", "mtools", "squashfs-tools", "lsof",
                # mkinitramfs in the guest: the root file system unlocked at boot (keyd(8), BOOT)
                "initramfs-tools")
# ZFS in the lab (from Debian's contrib, which `make apt` enables): the guest's zpool/zfs come from
# the host's zfsutils-linux; dkms, gcc-12, libc6-dev, make and file build the module
# (keyd_lab/zfs.py). zfs-dkms itself is only downloaded and extracted, so its postinst never
# builds for the host's own kernel.
ZFS_LAB_PACKAGES = ("zfsutils-linux", "dkms", "gcc-12", "libc6-dev", "make", "file")


def package_relations(control: str, fields: tuple[str, ...] = ("Depends", "Recommends")) -> list[str]:
    """The packages the binary package's ``fields`` name in debian/control's text (the first of
    each set of alternatives; substitution variables such as ``${misc:Depends}`` left out)."""
    stanza = control.split("\nPackage:", 1)[1]
    lines = [line for line in stanza.splitlines() if not line.startswith("#")]
    values: dict[str, str] = {}
    name = ""
    for line in lines:
        if line[:1].isspace() and name:
            values[name] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            values[name] = value.strip()
    names = []
    for field in fields:
        for relation in values.get(field, "").split(","):
            first = re.sub(r"\(.*?\)|\[.*?\]", "", relation.split("|")[0]).strip()
            if first and not first.startswith("${"):
                names.append(first)
    return names


def apt_packages() -> list[str]:
    """All apt packages keyd, its build and its lab need, sorted and unique.

    The Debian package's Depends and Recommends are among them: the lab's guest runs the host's
    root and has no network, so `apt-get install ./keyd_*.deb` there must find them installed.
    """
    names = set(packages()) | {p.package for p in LAB_PROGRAMS.values()}
    names |= set(BUILD_PACKAGES) | set(DEB_PACKAGES) | set(LAB_PACKAGES) | set(ZFS_LAB_PACKAGES)
    names |= set(package_relations(CONTROL.read_text()))
    return sorted(names)


if __name__ == "__main__":
    if sys.argv[1:] != ["--apt"]:
        sys.exit("usage: python3 -m keyd_lab.programs --apt")
    print(" ".join(apt_packages()))
