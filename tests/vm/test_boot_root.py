"""Seed 003 as its author used it: the root file system is an ext3 image on NTFS on TrueCrypt.

A lab guest builds the stack on a disk (tcplay, mkntfs, mkfs.ext3, as in the seed) and
puts a tiny root system in the image: busybox and an init that reports what the boot
left (the root mount, the NTFS mount, the dm mapping, the FUSE driver, keyd's boot audit
record) and powers off. keyd is installed with keyd.toml marking the volume boot =
"root", and the guest's ``mkinitramfs`` (initramfs-tools, with keyd's hook) makes an
initramfs for the lab kernel. Then that kernel boots that initramfs with the disk three
times: with the signed key stick plugged in; with the stick again, the image as the root
of a systemd system (the lab's root laid over its other directories) whose keyd.service
adopts the stack, then powered off; and without the stick, the passphrase typed on the
console, finding the image mounted without journal recovery.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from keyd.audit.ids import EVENT_BY_ID
from keyd_lab.build import Artifacts, new_run_dir
from keyd_lab.daemon_setup import (
    Signer,
    config_toml,
    install_keyd,
    installed_root,
    journal_text,
    make_stick,
    stop_keyd,
    wait_state,
    wait_until,
)
from keyd_lab.kernel import Kernel
from keyd_lab.media import StickSpec
from keyd_lab.vm import Lab, LabOptions, boot_until_power_off, direct_boot_argv
from tests.configs import seed_003

from .conftest import GuestLab
from .fixtures.seed_003 import PASSPHRASE, build_seed_003

DISK, OUT, STICK = "BOOTTC03", "BOOTINITRD", "BOOTKEY03"
DEVICE = f"/dev/disk/by-id/virtio-{DISK}"
# The root's init (init=/keyd-init). Booted by the lab (keydlab.* on the kernel command line):
# "/" stays the image, and the lab's root (the host's over 9p under a tmpfs overlay, as
# keyd_lab/init.sh makes it) is bound over every other top-level directory, then systemd
# starts. Otherwise: report what the boot left on the console, then power off.
ROOT_INIT = r"""#!/keyd-bin/busybox sh
export PATH=/keyd-bin
say() { echo "KEYD-ROOT: $*"; }
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        keydlab.modules=*) MODULES="${arg#keydlab.modules=}" ;;
        keydlab.overlay=*) OVERLAY="${arg#keydlab.overlay=}" ;;
    esac
done
if [ -n "$OVERLAY" ]; then
    L=/keyd-lab
    mount -t tmpfs -o mode=0755 tmpfs $L
    mkdir -p $L/lower $L/rw/upper $L/rw/work $L/new
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $L/lower
    mount -t overlay -o lowerdir=$L/lower,upperdir=$L/rw/upper,workdir=$L/rw/work overlay $L/new
    rm -f $L/new/.dockerenv $L/new/usr/sbin/policy-rc.d
    mkdir -p $L/new/lib/modules
    mount -o bind "$L/lower$MODULES" $L/new/lib/modules
    cp -a "$L/lower$OVERLAY/." $L/new/
    for dir in $L/new/*; do
        name=${dir##*/}
        case "$name" in dev|proc|sys|run|media|lost+found) continue ;; esac
        [ -d "$dir" ] && [ ! -L "$dir" ] && [ -d "/$name" ] && mount -o rbind "$dir" "/$name"
    done
    exec /lib/systemd/systemd
fi
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
# The image gets busybox, the init, and a mount point (or symlink) for each top-level
# directory of the lab's root.
POPULATE = f"""
cryptsetup open --type tcrypt {DEVICE} tcpop
mkdir -p /mnt/t/pop-ntfs /mnt/t/pop-root
mount -t ntfs-3g /dev/mapper/tcpop /mnt/t/pop-ntfs
mount -o loop /mnt/t/pop-ntfs/rootfs /mnt/t/pop-root
cd /mnt/t/pop-root
mkdir -p keyd-bin keyd-lab dev proc sys run media/winroot
for entry in /*; do
    name=${{entry##*/}}
    case "$name" in dev|proc|sys|run|media|lost+found) continue ;; esac
    if [ -L "$entry" ]; then cp -P "$entry" "$name"; elif [ -d "$entry" ]; then mkdir -p "$name"; fi
done
cp /bin/busybox keyd-bin/busybox
for applet in sh echo cat grep tr poweroff mount mkdir cp rm; do ln -s busybox keyd-bin/$applet; done
cat > keyd-init <<'INIT'
{ROOT_INIT}INIT
chmod 755 keyd-init
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
# 9p and overlay: a boot that lays the lab's root over the image's directories
printf 'virtio_pci\\nvirtio_blk\\n9p\\n9pnet_virtio\\noverlay\\n' > /run/t-initramfs/modules
mkinitramfs -d /run/t-initramfs -o /run/t-initrd.img
stat -c %s /run/t-initrd.img
"""


def build_initrd(guest: GuestLab, kernel: Kernel) -> int:
    """mkinitramfs with keyd's hook into /run/t-initrd.img; its size. (Without keyd configured
    the hook adds nothing: 8.9-9.3 MB against 20.1-20.4 MB with it, measured when this test
    built both; one build is what the boots need.)"""
    config = kernel.root / "boot" / f"config-{kernel.release}"
    return int(guest.sh(MKINITRAMFS.format(conf=CONF, kernel_config=config), timeout=600).split()[-1])


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
    append = ("console=ttyS0 panic=10 mitigations=off 8250.nr_uarts=1 usb-storage.delay_use=0 "
              "init=/keyd-init")
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


def keyd_events(lab: Lab) -> list[dict[str, str]]:
    out = lab.check(["journalctl", "-b", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=keyd"],
                    timeout=120).stdout
    return [e for e in map(json.loads, out.splitlines())
            if e.get("MESSAGE_ID") in EVENT_BY_ID and e.get("KEYD_VOLUME") == "work"]


def assert_adopted(lab: Lab) -> None:
    """keyd.service found the stack the initramfs opened and opened nothing itself."""
    assert wait_state(lab, "work", "unlocked"), journal_text(lab, "keyd.service")
    source, fstype = lab.check(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "/"]).stdout.split()
    assert re.fullmatch(r"/dev/loop\d+", source) and fstype == "ext3", (source, fstype)
    assert lab.check(["dmsetup", "ls"]).stdout.split()[0::2] == ["keyd-work-tc"]
    drivers = lab.check(["pgrep", "-a", "ntfs-3g"]).stdout.splitlines()
    assert len(drivers) == 1 and drivers[0].split()[1] == "@ntfs-3g", drivers
    loops = lab.check(["losetup", "-n", "-l", "-O", "BACK-FILE"]).stdout.split()
    assert loops == ["/media/winroot/rootfs"], loops
    # keyd journals its start-up reconcile a moment after it publishes the state.
    assert wait_until(lab, "journalctl -b -q SYSLOG_IDENTIFIER=keyd KEYD_EVENT=reconciled "
                           "KEYD_VOLUME=work | grep -q .", 60), journal_text(lab, "keyd.service")
    records = keyd_events(lab)
    trail = [(str(EVENT_BY_ID[r["MESSAGE_ID"]]), r.get("KEYD_RESULT", ""), r.get("KEYD_REASON", ""))
             for r in records]
    print("keyd's records about work:", trail)
    assert ("unlock-finished", "unlocked", "initramfs") in trail, trail
    assert ("reconciled", "unlocked", "") in trail, trail
    assert not any(event in ("unlock-started", "lock-started") for event, _, _ in trail), trail
    [boot] = [r for r in records if r.get("KEYD_REASON") == "initramfs"]
    assert boot.get("KEYD_STICK_SERIAL") == STICK and boot.get("KEYD_SIGNER"), boot
    assert lab.check(["systemctl", "is-active", "keyd-shutdown.service"]).stdout.strip() == "active"


def boot_systemd_and_power_off(lab_artifacts: Artifacts, guest: GuestLab, initrd: Path,
                               stick: StickSpec, root_tree: Path) -> None:
    """Boot the image as the root of a systemd system with keyd.service; check; power off."""
    options = LabOptions(boot_timeout=600, extra_append="init=/keyd-init rw",
                         disks_at_boot=[(guest.images / f"{DISK}.img", DISK)],
                         sticks_at_boot=[stick], extra_root=root_tree)
    lab = Lab.boot(lab_artifacts.kernel, initrd, new_run_dir("boot-root-systemd"), options)
    try:
        print(f"\nboot into systemd on the image: {lab.boot_seconds:.1f} s")
        assert_adopted(lab)
        lab.power_off()
    finally:
        lab.close()


def assert_mounted_clean(console: str) -> None:
    """The image was mounted without journal recovery: the last power-off left it clean."""
    assert re.search(r"EXT4-fs \(loop\d+\): mounted filesystem", console), console[-3000:]
    assert not re.search(r"EXT4-fs \(loop\d+\): .*recover", console), console[-3000:]


def test_the_root_file_system_is_unlocked_in_the_initramfs_from_a_stick_or_a_passphrase(
        lab_artifacts: Artifacts, guest: GuestLab, signer: Signer, tmp_path: Path) -> None:
    build_seed_003(guest, guest.disk(DISK, 96))
    guest.check(["sh", "-ec", POPULATE], input=PASSPHRASE + "\n", timeout=300)
    volumes = seed_003(DEVICE, root="/", policy={"key_timeout": 20})
    try:
        install_keyd(guest, signer, config_toml(signer, volumes))
        size = build_initrd(guest, lab_artifacts.kernel)
        initrd = export_initrd(guest, size)
    finally:
        stop_keyd(guest)
    guest.detach(DISK)  # the boots below use its image
    print(f"\ninitramfs with keyd's part: {size} bytes")
    stick = make_stick(tmp_path, signer, STICK, {"work": PASSPHRASE.encode()})

    console = boot(lab_artifacts, guest, initrd, "boot-root-stick", [stick])
    seconds = assert_booted_into_the_image(console)
    [audit] = reported(console, "audit")
    assert '"unlocked in the initramfs with a key from stick"' in audit, audit
    assert f'"serial": "{STICK}"' in audit, audit
    print(f"kernel start -> the root's init: {seconds:.1f} s (stick)")

    # The image as the root of a systemd system: keyd.service adopts the stack, power-off.
    root_tree = installed_root(tmp_path, signer, config_toml(signer, volumes))
    boot_systemd_and_power_off(lab_artifacts, guest, initrd, stick, root_tree)

    console = boot(lab_artifacts, guest, initrd, "boot-root-passphrase", [],
                   answer=("Passphrase for work: ", PASSPHRASE))
    seconds = assert_booted_into_the_image(console)
    assert_mounted_clean(console)
    assert "with a key from passphrase" in reported(console, "audit")[0]
    print(f"kernel start -> the root's init: {seconds:.1f} s (passphrase after 20 s)")
