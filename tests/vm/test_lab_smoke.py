"""The lab itself works: systemd, device-mapper, md, USB hot-plug and 4K disks on a real kernel."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from keyd.runner import SubprocessRunner
from keyd_lab.build import Artifacts, new_run_dir
from keyd_lab.errors import BootTimeout, LabError, QmpError
from keyd_lab.guest_root import UDEV_AT_BOOT
from keyd_lab.media import StickSpec, build_stick
from keyd_lab.vm import Lab, LabOptions

from .conftest import BOOT_STICK_SERIAL, GuestLab

FAST_LUKS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def udev_properties(guest: GuestLab, device: str) -> dict[str, str]:
    out = guest.check(["udevadm", "info", "-q", "property", "-n", device]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_guest_reaches_its_target_with_udevd_journald_and_dbus(guest: GuestLab) -> None:
    units = ["keyd-lab.target", "systemd-udevd.service", "systemd-journald.service", "dbus.service"]
    result = guest.run(["systemctl", "is-active", *units])
    assert result.stdout.split() == ["active"] * 4, result
    assert guest.check(["uname", "-r"]).stdout.strip().endswith("-amd64")


def test_luks_xfs_round_trip_on_a_virtio_disk(guest: GuestLab) -> None:
    disk = guest.disk("SMOKELUKS", 320)
    key = b"correct horse battery staple"
    guest.check(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST_LUKS,
                 "--key-file=-", disk], input=key, timeout=120)
    guest.check(["cryptsetup", "open", "--key-file=-", disk, "smoke"], input=key, timeout=120)
    guest.check(["mkfs.xfs", "-q", "/dev/mapper/smoke"], timeout=120)
    guest.sh("mkdir -p /mnt/t/smoke && mount /dev/mapper/smoke /mnt/t/smoke && "
             "echo keyd > /mnt/t/smoke/file && sync && umount /mnt/t/smoke")
    guest.check(["cryptsetup", "close", "smoke"])
    wrong = guest.run(["cryptsetup", "open", "--key-file=-", disk, "smoke"], input=b"wrong", timeout=120)
    assert wrong.rc == 2, wrong  # cryptsetup's "no key available with this passphrase"
    guest.check(["cryptsetup", "open", "--key-file=-", disk, "smoke"], input=key, timeout=120)
    guest.sh("mount /dev/mapper/smoke /mnt/t/smoke")
    assert guest.check(["cat", "/mnt/t/smoke/file"]).stdout == "keyd\n"


def test_raid5_create_stop_assemble_and_degraded_assemble(guest: GuestLab) -> None:
    members = [guest.disk(f"SMOKEMD{i}", 64) for i in range(3)]
    guest.check(["mdadm", "--create", "/dev/md/smoke", "--run", "--level=5", "--raid-devices=3",
                 "--assume-clean", "--metadata=1.2", *members], timeout=120)
    uuid = guest.check(["mdadm", "--detail", "--export", "/dev/md/smoke"]).stdout
    array_uuid = dict(line.split("=", 1) for line in uuid.splitlines())["MD_UUID"]
    guest.check(["mdadm", "--stop", "/dev/md/smoke"])
    guest.check(["mdadm", "--assemble", "/dev/md/smoke", f"--uuid={array_uuid}", *members])
    assert "[3/3] [UUU]" in guest.check(["cat", "/proc/mdstat"]).stdout
    guest.check(["mdadm", "--stop", "/dev/md/smoke"])

    guest.detach("SMOKEMD2")
    guest.sh("udevadm settle")
    # Debian's udev rules gather hot-plugged members into an inactive array (mdadm
    # --incremental). Stop that, and pause udev's workers so the assembly below is ours alone.
    guest.sh("for md in $(awk '/inactive/ {print $1}' /proc/mdstat); do mdadm --stop /dev/$md; done;"
             " udevadm settle; udevadm control --stop-exec-queue")
    try:
        refused = guest.run(["mdadm", "--assemble", "/dev/md/smoke", f"--uuid={array_uuid}",
                             *members[:2]])
        assert refused.rc != 0 and "use --run to insist" in refused.stderr, refused
        assert "active" not in guest.sh("cat /proc/mdstat").replace("inactive", "")
        guest.sh("for md in $(awk '/inactive/ {print $1}' /proc/mdstat); do mdadm --stop /dev/$md; done")
        guest.check(["mdadm", "--assemble", "--run", "/dev/md/smoke", f"--uuid={array_uuid}",
                     *members[:2]])
    finally:
        guest.sh("udevadm control --start-exec-queue; udevadm settle")
    detail = guest.check(["mdadm", "--detail", "/dev/md/smoke"]).stdout
    assert "degraded" in detail and "[3/2] [UU_]" in guest.sh("cat /proc/mdstat"), detail


def test_usb_stick_hotplug_shows_serial_label_and_remove_event(guest: GuestLab, tmp_path: Path) -> None:
    image = build_stick(SubprocessRunner(), tmp_path / "stick.img", label="KEYSTICK",
                        files={"keyd/readme.txt": b"hello\n"})
    device = guest.plug(StickSpec(image, "KEYD0001", vendor="Acme", product="Key Stick"))
    props = udev_properties(guest, device)
    assert props["ID_BUS"] == "usb"
    assert props["ID_SERIAL_SHORT"] == "KEYD0001"
    assert props["ID_FS_LABEL"] == "KEYSTICK"
    assert props["ID_FS_TYPE"] == "vfat"
    assert props["ID_VENDOR"] == "Acme"

    guest.sh("udevadm monitor --udev --subsystem-match=block > /run/monitor.txt 2>&1 </dev/null &"
             " echo $! > /run/monitor.pid; sleep 1")
    guest.unplug("KEYD0001")
    guest.sh("udevadm settle; sleep 0.5")
    events = guest.sh("kill $(cat /run/monitor.pid); cat /run/monitor.txt")
    removed = [line.split() for line in events.splitlines() if line.endswith("(block)")]
    name = device.split("/")[-1]
    assert any(f[2] == "remove" and f[3].endswith(f"/{name}") for f in removed if len(f) > 3), events


def test_4k_sector_disk_reports_4096_byte_logical_blocks(guest: GuestLab) -> None:
    disk = guest.disk("SMOKE4K", 64, sector_size=4096)
    assert guest.check(["blockdev", "--getss", disk]).stdout.strip() == "4096"
    name = guest.check(["readlink", "-f", disk]).stdout.strip().split("/")[-1]
    sysfs = guest.check(["cat", f"/sys/block/{name}/queue/logical_block_size"]).stdout
    assert sysfs.strip() == "4096"


def test_stick_present_at_boot_was_in_udev_before_the_target(guest: GuestLab, lab: Lab) -> None:
    snapshot = guest.check(["cat", UDEV_AT_BOOT]).stdout
    assert f"E: ID_SERIAL_SHORT={BOOT_STICK_SERIAL}" in snapshot
    assert "E: ID_FS_LABEL=KEYDBOOT" in snapshot
    device = lab.wait_for_serial(BOOT_STICK_SERIAL, timeout=5)
    assert udev_properties(guest, device)["ID_BUS"] == "usb"


def test_guest_sees_this_checkout_unchanged(guest: GuestLab) -> None:
    here = Path(__file__).resolve()
    digest = guest.check(["sha256sum", str(here)]).stdout.split()[0]
    assert digest == hashlib.sha256(here.read_bytes()).hexdigest()


def test_a_refused_qmp_command_shows_qemus_own_error(lab: Lab) -> None:
    with pytest.raises(QmpError) as error:
        lab.qmp.execute("device_add", driver="no-such-device", id="bogus")
    assert "no-such-device" in str(error.value)


def test_a_guest_that_misses_its_boot_deadline_is_killed_and_its_console_shown(
        lab_artifacts: Artifacts) -> None:
    run_dir = new_run_dir("deadline")
    with pytest.raises(BootTimeout) as error:
        Lab.boot(lab_artifacts.kernel, lab_artifacts.initramfs, run_dir, LabOptions(boot_timeout=4))
    pid = int((run_dir / "qemu.pid").read_text())
    assert not Path(f"/proc/{pid}").exists()
    assert "last console lines" in str(error.value)
    shutil.rmtree(run_dir)


def test_a_qemu_that_refuses_its_command_line_says_why(lab_artifacts: Artifacts) -> None:
    run_dir = new_run_dir("bad-cpu")
    with pytest.raises(LabError, match="unable to find CPU model 'no-such-cpu'"):
        Lab.boot(lab_artifacts.kernel, lab_artifacts.initramfs, run_dir,
                 LabOptions(boot_timeout=30, cpu_model="no-such-cpu"))
    shutil.rmtree(run_dir)
