"""Seed 003 as its author used it: the root file system is an ext3 image on NTFS on TrueCrypt.

A lab guest builds the stack on a disk (tcplay, mkntfs, mkfs.ext3, as in the seed) and
puts a tiny root system in the image: busybox and an init that reports what the boot
left (the root mount, the NTFS mount, the dm mapping, the FUSE driver, keyd's boot audit
record) and powers off. keyd is installed with keyd.toml marking the volume boot =
"root", and the guest's ``mkinitramfs`` (initramfs-tools, with keyd's hook) makes an
initramfs for the lab kernel. Then that kernel boots that initramfs with the disk, twice:
with the signed key stick plugged in, and without it, the passphrase typed on the console.
"""

from __future__ import annotations

import re
from pathlib import Path

from keyd_lab.build import Artifacts, new_run_dir
from keyd_lab.daemon_setup import Signer, config_toml, install_keyd, make_stick, stop_keyd
from keyd_lab.kernel import Kernel
from keyd_lab.vm import boot_until_power_off, direct_boot_argv
from tests.configs import seed_003

from .conftest import GuestLab
from .fixtures.seed_003 import PASSPHRASE, build_seed_003

DISK, OUT, STICK = "BOOTTC03", "BOOTINITRD", "BOOTKEY03"
DEVICE = f"/dev/disk/by-id/virtio-{DISK}"
# The root's init: what the boot left, on the console, then power off.
ROOT_INIT = r"""#!/bin/busybox sh
export PATH=/bin
say() { echo "KEYD-ROOT: $*"; }
say "uptime $(cat /proc/uptime)"
grep -E ' / / | /media/winroot ' /proc/self/mountinfo | while read -r line; do say "mount $line"; done
for d in /sys/block/dm-*/dm/name; do say "dm $(cat "$d")"; done
for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
    case "$cmd" in @*) say "process $cmd" ;; esac
done
say "origin $(cat /origin)"
say "audit $(cat /run/keyd/boot-audit.json)"
poweroff -f
"""
POPULATE = f"""
cryptsetup open --type tcrypt {DEVICE} tcpop
mkdir -p /mnt/t/pop-ntfs /mnt/t/pop-root
mount -t ntfs-3g /dev/mapper/tcpop /mnt/t/pop-ntfs
mount -o loop /mnt/t/pop-ntfs/rootfs /mnt/t/pop-root
cd /mnt/t/pop-root
mkdir -p bin sbin dev proc sys run media/winroot
cp /bin/busybox bin/busybox
for applet in sh echo cat grep tr poweroff; do ln -s busybox bin/$applet; done
cat > sbin/init <<'INIT'
{ROOT_INIT}INIT
chmod 755 sbin/init
cd /
umount /mnt/t/pop-root
umount /mnt/t/pop-ntfs
udevadm settle
for i in $(seq 20); do cryptsetup close tcpop && exit 0; sleep 0.5; done
exit 1
"""
CONF = "MODULES=list\nBUSYBOX=y\nCOMPRESS=gzip\nCOMPRESSLEVEL=1\n"
MKINITRAMFS = """
cp {kernel_config} /boot/  # mkinitramfs checks the kernel's compression support there
rm -rf /run/t-initramfs && mkdir -p /run/t-initramfs/conf.d /run/t-initramfs/scripts
cat > /run/t-initramfs/initramfs.conf <<'EOF2'
{conf}EOF2
printf 'virtio_pci\\nvirtio_blk\\n' > /run/t-initramfs/modules
mkinitramfs -d /run/t-initramfs -o /run/t-initrd.img
stat -c %s /run/t-initrd.img
"""


def build_initrd(guest: GuestLab, kernel: Kernel) -> tuple[int, int]:
    """mkinitramfs without keyd's part (keyd not configured), then with it; their sizes.
    The one with keyd's part is left in /run/t-initrd.img."""
    config = kernel.root / "boot" / f"config-{kernel.release}"
    script = MKINITRAMFS.format(conf=CONF, kernel_config=config)
    guest.sh("mv /etc/keyd/keyd.toml /etc/keyd/keyd.toml.off")
    without = int(guest.sh(script, timeout=600).split()[-1])
    guest.sh("mv /etc/keyd/keyd.toml.off /etc/keyd/keyd.toml")
    with_keyd = int(guest.sh(script, timeout=600).split()[-1])
    return without, with_keyd


def export_initrd(guest: GuestLab, size: int) -> Path:
    """Copy the guest's initramfs to the host through a disk of its own."""
    guest.disk(OUT, 128)
    guest.sh(f"dd if=/run/t-initrd.img of=/dev/disk/by-id/virtio-{OUT} bs=1M conv=fsync "
             "status=none", timeout=300)
    image = guest.images / f"{OUT}.img"
    initrd = guest.images / "initrd.img"
    with image.open("rb") as disk:
        initrd.write_bytes(disk.read(size))
    guest.detach(OUT)
    return initrd


def boot(lab_artifacts: Artifacts, guest: GuestLab, initrd: Path, name: str,
         sticks: list[object], answer: tuple[str, str] | None = None,
         timeout: float = 600) -> str:
    run_dir = new_run_dir(name)
    append = "console=ttyS0 panic=10 mitigations=off 8250.nr_uarts=1 usb-storage.delay_use=0"
    argv = direct_boot_argv(lab_artifacts.kernel, initrd, run_dir, append,
                            disks=[(guest.images / f"{DISK}.img", DISK)],
                            sticks=sticks)  # type: ignore[arg-type]
    console = boot_until_power_off(argv, run_dir, timeout=timeout, answer=answer)
    print(f"\n--- {name} ---\n" + "\n".join(
        line for line in console.splitlines() if "KEYD-ROOT" in line or "keyd" in line))
    return console


def reported(console: str, what: str) -> list[str]:
    return [line.split(f"KEYD-ROOT: {what} ", 1)[1].strip() for line in console.splitlines()
            if f"KEYD-ROOT: {what} " in line]


def assert_booted_into_the_image(console: str) -> float:
    [root] = [m for m in reported(console, "mount") if " / / " in m]
    assert re.search(r" - ext3 /dev/loop\d+ ", root), root
    [ntfs] = [m for m in reported(console, "mount") if " /media/winroot " in m]
    assert " - fuseblk /dev/mapper/keyd-work-tc " in ntfs, ntfs
    assert reported(console, "dm") == ["keyd-work-tc"]
    assert any(p.startswith("@ntfs-3g /dev/mapper/keyd-work-tc /media/winroot")
               for p in reported(console, "process")), reported(console, "process")
    assert reported(console, "origin") == ["installed-by-hand"]
    return float(reported(console, "uptime")[0].split()[0])


def test_the_root_file_system_is_unlocked_in_the_initramfs_from_a_stick_or_a_passphrase(
        lab_artifacts: Artifacts, guest: GuestLab, signer: Signer, tmp_path: Path) -> None:
    build_seed_003(guest, guest.disk(DISK, 96))
    guest.check(["sh", "-ec", POPULATE], input=PASSPHRASE + "\n", timeout=300)
    volumes = seed_003(DEVICE, root="/", policy={"key_timeout": 20})
    try:
        install_keyd(guest, signer, config_toml(signer, volumes))
        without, with_keyd = build_initrd(guest, lab_artifacts.kernel)
        initrd = export_initrd(guest, with_keyd)
    finally:
        stop_keyd(guest)
    guest.detach(DISK)  # the boots below use its image
    print(f"\ninitramfs: {without} bytes without keyd's part, {with_keyd} with it")
    stick = make_stick(tmp_path, signer, STICK, {"work": PASSPHRASE.encode()})

    console = boot(lab_artifacts, guest, initrd, "boot-root-stick", [stick])
    seconds = assert_booted_into_the_image(console)
    [audit] = reported(console, "audit")
    assert '"unlocked in the initramfs with a key from stick"' in audit, audit
    assert f'"serial": "{STICK}"' in audit, audit
    print(f"kernel start -> the root's init: {seconds:.1f} s (stick)")

    console = boot(lab_artifacts, guest, initrd, "boot-root-passphrase", [],
                   answer=("Passphrase for work: ", PASSPHRASE))
    seconds = assert_booted_into_the_image(console)
    assert "with a key from passphrase" in reported(console, "audit")[0]
    print(f"kernel start -> the root's init: {seconds:.1f} s (passphrase after 20 s)")
