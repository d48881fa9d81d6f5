"""What the lab and the development tree need on the host, beside the programs keyd runs.

Run as ``python3 -m keyd_lab.programs --apt`` (standard library only) to print
every apt package that the product, its build and its lab need; ``make deps``
installs what is missing from that list, so it lives in one place.
"""

from __future__ import annotations

import sys

from keyd.programs import Program, packages

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


def apt_packages() -> list[str]:
    """All apt packages keyd, its build and its lab need, sorted and unique."""
    names = set(packages()) | {p.package for p in LAB_PROGRAMS.values()}
    names |= set(BUILD_PACKAGES) | set(DEB_PACKAGES) | set(LAB_PACKAGES) | set(ZFS_LAB_PACKAGES)
    return sorted(names)


if __name__ == "__main__":
    if sys.argv[1:] != ["--apt"]:
        sys.exit("usage: python3 -m keyd_lab.programs --apt")
    print(" ".join(apt_packages()))
