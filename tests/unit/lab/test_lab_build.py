"""The lab's host-side building blocks: initramfs archive, kernel cache, guest root, QEMU argv."""

from __future__ import annotations

import gzip
import lzma
import stat
from pathlib import Path

import pytest

from keyd_lab import guest_root, kernel
from keyd_lab.errors import LabError
from keyd_lab.initramfs import CpioWriter
from keyd_lab.kernel import Kernel, extract_vmlinux, resolve_package
from keyd_lab.media import StickSpec
from keyd_lab.vm import LabOptions, node_id, qemu_argv
from tests.support.scripted_runner import Reply, ScriptedRunner


def parse_newc(archive: bytes) -> dict[str, tuple[int, tuple[int, int], bytes]]:
    """name -> (mode, rdev, data), checking the format's 4-byte alignment as the kernel does."""
    entries: dict[str, tuple[int, tuple[int, int], bytes]] = {}
    offset = 0
    while True:
        assert archive[offset:offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = offset + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start:data_start + filesize]
        offset = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (fields[1], (fields[9], fields[10]), data)


def test_cpio_archive_round_trips_files_directories_and_device_nodes() -> None:
    cpio = CpioWriter()
    cpio.add("dev", stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    cpio.add("odd", stat.S_IFREG | 0o644, b"x" * 5)

    entries = parse_newc(cpio.archive())

    assert entries["dev/console"][:2] == (stat.S_IFCHR | 0o600, (5, 1))
    assert entries["init"] == (stat.S_IFREG | 0o755, (0, 0), b"#!/bin/sh\necho hi\n")
    assert entries["odd"][2] == b"xxxxx"
    assert stat.S_ISDIR(entries["dev"][0])


def fake_kernel(tmp_path: Path) -> Kernel:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    return Kernel("linux-image-6.1.0-9-amd64", "6.1.1-1", "6.1.0-9-amd64", root)


def test_vmlinux_is_the_decompressed_xz_payload_of_the_bzimage(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    elf = b"\x7fELF" + bytes(range(256)) * 64
    k.vmlinuz.write_bytes(b"MZ setup code " * 100 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\0" * 64)

    assert extract_vmlinux(k).read_bytes() == elf


def test_a_kernel_without_xz_payload_is_a_clear_error(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    k.vmlinuz.write_bytes(b"MZ" + gzip.compress(b"\x7fELF"))
    with pytest.raises(LabError, match="no XZ payload"):
        extract_vmlinux(k)


def test_kernel_package_is_what_linux_image_amd64_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYD_LAB_KERNEL", raising=False)
    depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    runner = (ScriptedRunner()
              .on("apt-cache", "depends", reply=Reply(depends))
              .on("apt-cache", "policy", reply=Reply("  Installed: (none)\n  Candidate: 6.1.192-2\n")))
    assert resolve_package(runner) == ("linux-image-6.1.0-56-amd64", "6.1.192-2")


def test_kernel_package_can_be_pinned_and_unknown_versions_say_to_update_apt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYD_LAB_KERNEL", "linux-image-6.1.0-9-amd64")
    runner = ScriptedRunner().on("apt-cache", "policy", reply=Reply("  Candidate: (none)\n"))
    with pytest.raises(LabError) as error:
        resolve_package(runner)
    assert error.value.fix is not None and "apt-get update" in error.value.fix
    assert runner.argvs("apt-cache") == [("apt-cache", "policy", "linux-image-6.1.0-9-amd64")]


def test_cached_kernel_is_used_when_apt_cannot_answer(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = tmp_path / "keyd-lab" / "kernel" / "linux-image-6.1.0-9-amd64_6.1.1-1"
    entry.mkdir(parents=True)
    (entry / kernel.COMPLETE).write_text("6.1.0-9-amd64\n")
    runner = ScriptedRunner().on("apt-cache", reply=Reply(returncode=100, stderr="E: no lists"))

    found = kernel.ensure_kernel(runner)

    assert (found.package, found.version, found.release) == (
        "linux-image-6.1.0-9-amd64", "6.1.1-1", "6.1.0-9-amd64")
    assert not runner.argvs("apt-get")  # nothing downloaded


def test_guest_root_boots_the_lab_target_with_the_agent_and_without_host_generators(tmp_path: Path) -> None:
    root = guest_root.write_guest_root(tmp_path / "overlay", boot_sticks=["KEYDBOOT"])
    units = root / "etc" / "systemd" / "system"

    assert (units / "default.target").readlink() == Path("keyd-lab.target")
    assert str(guest_root.AGENT) in (units / "keyd-lab-agent.service").read_text()
    assert guest_root.AGENT.exists()
    assert (units / "systemd-timesyncd.service").readlink() == Path("/dev/null")
    generators = list((root / "etc" / "systemd" / "system-generators").iterdir())
    assert generators and all(g.readlink() == Path("/dev/null") for g in generators)
    assert (root / "etc" / "keyd-lab" / "boot-sticks").read_text() == "KEYDBOOT\n"
    assert "d /tmp " in (root / "etc" / "tmpfiles.d" / "tmp.conf").read_text()
    assert not (units / "serial-getty@ttyS0.service.d").exists()


def test_guest_root_lays_an_extra_tree_over_the_guest(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    (extra / "etc" / "keyd").mkdir(parents=True)
    (extra / "etc" / "keyd" / "keyd.toml").write_text("[trust]\n")
    (extra / "etc" / "systemd" / "system" / "multi-user.target.wants").mkdir(parents=True)
    (extra / "etc" / "systemd" / "system" / "multi-user.target.wants" / "keyd.service").symlink_to(
        "/usr/lib/systemd/system/keyd.service")

    root = guest_root.write_guest_root(tmp_path / "overlay", extra_root=extra)

    assert (root / "etc" / "keyd" / "keyd.toml").read_text() == "[trust]\n"
    link = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "keyd.service"
    assert link.readlink() == Path("/usr/lib/systemd/system/keyd.service")
    assert (root / "etc" / "systemd" / "system" / "keyd-lab.target").exists()


def test_guest_root_with_a_console_login_wants_an_autologin_getty(tmp_path: Path) -> None:
    root = guest_root.write_guest_root(tmp_path / "overlay", shell=True)
    units = root / "etc" / "systemd" / "system"
    assert "serial-getty@ttyS0.service" in (units / "keyd-lab.target").read_text()
    assert "--autologin root" in (units / "serial-getty@ttyS0.service.d" / "autologin.conf").read_text()


def test_qemu_argv_shares_the_host_root_read_only_and_adds_sticks_present_at_boot(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    stick = StickSpec(tmp_path / "s.img", "KEYD 0001", vendor="AcmeCorporation", product="Key")
    argv = qemu_argv(k, tmp_path / "initrd", tmp_path, LabOptions(sticks_at_boot=[stick]))
    joined = " ".join(argv)

    assert argv[argv.index("-kernel") + 1] == str(k.vmlinux)
    assert "readonly=on" in argv[argv.index("-virtfs") + 1]
    assert f"keydlab.modules={k.modules}" in argv[argv.index("-append") + 1]
    assert "usb-bot,id=stick-KEYD_0001,bus=xhci.0,serial=KEYD 0001" in argv
    assert "vendor=AcmeCorp," in joined  # SCSI vendor ids are 8 characters at most
    assert "accel=tcg" in joined


def test_qmp_ids_are_sanitised_and_short() -> None:
    assert node_id("disk", "A B/C") == "disk-A_B_C"
    assert len(node_id("stnode", "X" * 40)) == 31
