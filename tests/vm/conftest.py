"""The real-kernel tier: one lab VM per test session, a clean guest for every test.

A missing qemu or kernel is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.errors import KeydError
from keyd.runner import SubprocessRunner
from keyd_lab.build import Artifacts, new_run_dir, prepare
from keyd_lab.daemon_setup import Signer, make_signer, stop_keyd
from keyd_lab.media import StickSpec, build_stick, create_disk
from keyd_lab.vm import Lab, LabOptions

BOOT_STICK_SERIAL = "KEYDBOOT01"
# Undo whatever a test left in the guest's kernel: mounts, loops, dm and md devices.
GUEST_RESET = r"""
for m in $(awk '$2 ~ "^/mnt/t/" {print $2}' /proc/self/mounts | sort -r); do umount -l "$m"; done
# A pool left imported on a mapping removed below would be suspended, and hang later tests.
if [ -e /dev/zfs ]; then zpool export -a -f || true; fi
losetup -D
# keyd's userspace crypto (a FUSE file per open crypt layer): the server exits on unmount.
for m in $(awk '$3 == "fuse.keyd-crypt" {print $2}' /proc/self/mounts); do umount -l "$m"; done
rm -f /etc/modprobe.d/keyd-test-*.conf
for d in $(dmsetup ls --noheadings 2>/dev/null | awk '$1 != "No" {print $1}'); do dmsetup remove -f "$d"; done
for md in /dev/md/* /dev/md[0-9]*; do [ -e "$md" ] && mdadm --stop "$md"; done
rm -rf /mnt/t
udevadm settle -t 10
exit 0
"""

_state: dict[str, object] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/vm carries the vm marker."""
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def lab_artifacts() -> Artifacts:
    """The cached kernel and initramfs; failing (not skipping) with the fix if they cannot be had."""
    try:
        return prepare(SubprocessRunner())
    except KeydError as exc:
        pytest.fail(f"the VM lab cannot be built: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def boot_stick(tmp_path_factory: pytest.TempPathFactory) -> StickSpec:
    """A vfat stick present from power-on, as on a headless NAS that boots with its key in."""
    image = tmp_path_factory.mktemp("boot-stick") / "boot.img"
    build_stick(SubprocessRunner(), image, label="KEYDBOOT", files={"hello.txt": b"present at boot\n"})
    return StickSpec(image, BOOT_STICK_SERIAL, product="Boot Stick")


@pytest.fixture(scope="session")
def lab(lab_artifacts: Artifacts, boot_stick: StickSpec,
        request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session's lab VM; its journal and console are kept when a test failed."""
    run_dir = new_run_dir("pytest")
    options = LabOptions(sticks_at_boot=[boot_stick])
    try:
        vm = Lab.boot(lab_artifacts.kernel, lab_artifacts.initramfs, run_dir, options)
    except KeydError as exc:
        pytest.fail(f"the lab VM did not boot (artifacts in {run_dir}): {exc}", pytrace=False)
    _state["boot_seconds"] = vm.boot_seconds
    yield vm
    vm.collect()
    vm.close()
    if request.session.testsfailed:
        _state["artifacts"] = run_dir
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


class GuestLab:
    """The session lab seen by one test: what it attaches is detached and reset afterwards."""

    def __init__(self, lab: Lab, images: Path) -> None:
        self.lab = lab
        self.images = images
        self._disks: list[str] = []
        self._sticks: list[str] = []
        self.run, self.check, self.sh = lab.run, lab.check, lab.sh

    def disk(self, serial: str, size_mb: int = 64, *, sector_size: int = 512) -> str:
        """A new sparse disk attached as virtio-blk; returns its guest path."""
        image = create_disk(self.images / f"{serial}.img", size_mb)
        path = self.lab.attach_disk(image, serial, sector_size=sector_size)
        self._disks.append(serial)
        return path

    def reattach(self, serial: str, *, sector_size: int = 512) -> str:
        """Hot-plug again, data intact, a disk this test attached and then detached."""
        path = self.lab.attach_disk(self.images / f"{serial}.img", serial, sector_size=sector_size)
        self._disks.append(serial)
        return path

    def detach(self, serial: str) -> None:
        """Hot-unplug a disk this test attached."""
        self.lab.detach_disk(serial)
        self._disks.remove(serial)

    def plug(self, stick: StickSpec) -> str:
        """Hot-plug a stick; returns its guest block device."""
        device = self.lab.plug(stick)
        self._sticks.append(stick.serial)
        return device

    def unplug(self, serial: str) -> None:
        """Pull a stick this test plugged."""
        self.lab.unplug(serial)
        self._sticks.remove(serial)

    def reset(self) -> None:
        """Return the guest to a clean state for the next test."""
        self.lab.run(["/bin/sh", "-c", GUEST_RESET], timeout=120)
        for serial in list(self._sticks):
            self.unplug(serial)
        for serial in list(self._disks):
            self.detach(serial)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signer]:
    """The NAS admin's signing key, pinned in the daemon tests' keyd.toml (one per test file)."""
    yield from make_signer(tmp_path_factory.mktemp("signer"))


@pytest.fixture
def guest(lab: Lab, tmp_path: Path) -> Iterator[GuestLab]:
    """A clean guest for one test; mounts go under /mnt/t/."""
    view = GuestLab(lab, tmp_path)
    lab.check(["mkdir", "-p", "/mnt/t"])
    yield view
    view.reset()


@pytest.fixture
def keyd_stopped(guest: GuestLab) -> Iterator[None]:
    """Stop (and mask) keyd after a daemon test, before the guest is reset."""
    yield
    stop_keyd(guest)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the measured boot time, and where a failing run's evidence was kept."""
    if "boot_seconds" in _state:
        terminalreporter.write_line(f"keyd-lab: guest boot to ready took {_state['boot_seconds']:.1f} s")
    if "artifacts" in _state:
        terminalreporter.write_line(f"keyd-lab: journal and console of the failed run: {_state['artifacts']}")
