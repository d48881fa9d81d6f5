"""The real-kernel tier: one lab VM per test session, a clean guest for every test.

Under pytest-xdist (``make vm`` runs two workers on two cores) each worker is a test session
with a lab of its own: its own run directory, sockets, images and temporary files. Files are
handed out whole (``--dist loadfile``), so one lab boot serves every test of a file. At the end
the controller prints the tier's wall time and where the slowest files spent it
(keyd_lab.profile).

A missing qemu or kernel is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyd.errors import KeydError
from keyd.runner import SubprocessRunner
from keyd_lab.build import Artifacts, new_run_dir, prepare
from keyd_lab.daemon_setup import Signer, make_signer, stop_keyd
from keyd_lab.kernel import cache_dir
from keyd_lab.media import StickSpec, build_stick, create_disk
from keyd_lab.profile import (
    LEDGER,
    file_costs,
    load_walls,
    longest_first,
    profile_table,
    save_walls,
    summary_lines,
)
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

_state: dict[str, Any] = {"walls": {}, "boots": [], "artifacts": [], "workers": 0}


def _walls_kept() -> Path:
    return cache_dir() / "vm-file-seconds.json"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/vm carries the vm marker; the files run longest first (by the last
    run's times, ``make vm`` keeping that order with --no-loadscope-reorder), so that no worker
    starts a long file when the other is nearly done."""
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)
    files = list(dict.fromkeys(_file_of(item.nodeid) for item in items))
    rank = {name: i for i, name in enumerate(longest_first(files, load_walls(_walls_kept())))}
    items.sort(key=lambda item: rank[_file_of(item.nodeid)])


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
    run_dir = new_run_dir(f"pytest-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    _state["run_dir"] = run_dir
    options = LabOptions(sticks_at_boot=[boot_stick])
    try:
        vm = Lab.boot(lab_artifacts.kernel, lab_artifacts.initramfs, run_dir, options)
    except KeydError as exc:
        pytest.fail(f"the lab VM did not boot (artifacts in {run_dir}): {exc}", pytrace=False)
    _state["boots"].append(vm.boot_seconds)
    yield vm
    vm.collect()
    vm.close()
    if request.session.testsfailed:
        _state["artifacts"].append(str(run_dir))
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


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_sessionstart(session: pytest.Session) -> None:
    """The tier's wall time is counted from here (in the xdist controller: before any worker)."""
    _state["started"] = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """Guest boots and commands count against the file being run."""
    with LEDGER.scoped(_file_of(item.nodeid)):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, Any, None]:
    """A failed test's report names the run directory that keeps its guest's journal and console."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "run_dir" in _state:
        report.sections.append(("keyd-lab", f"guest journal (journal.json, written when the lab shuts "
                                            f"down) and console.log: {_state['run_dir']}"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Sum each file's setup, call and teardown times (in the xdist controller: every worker's)."""
    walls = _state["walls"]
    walls[_file_of(report.nodeid)] = walls.get(_file_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its profile, boot time and kept run directories to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["keyd_lab"] = {"ledger": {k: dict(v) for k, v in LEDGER.seconds.items()},
                              "boots": _state["boots"], "artifacts": _state["artifacts"]}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controller gathers what a worker handed over (pytest-xdist's hook)."""
    _state["workers"] += 1
    handed = getattr(node, "workeroutput", {}).get("keyd_lab")
    if handed:
        LEDGER.merge(handed["ledger"])
        _state["boots"] += handed["boots"]
        _state["artifacts"] += handed["artifacts"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The tier's wall time, the slowest files and their kinds of cost, the boot times, and where
    a failing run's evidence was kept."""
    write = terminalreporter.write_line
    if _state["walls"]:
        save_walls(_walls_kept(), _state["walls"])
        tier_wall = time.monotonic() - _state.get("started", time.monotonic())
        costs = file_costs(_state["walls"], LEDGER)
        for line in summary_lines(costs, tier_wall, max(_state["workers"], 1)):
            write(line)
        table = cache_dir() / "vm-profile.md"
        table.write_text(profile_table(costs))
        write(f"keyd-lab: seconds by kind for every file: {table}")
    if _state["boots"]:
        write("keyd-lab: guest boot to ready took " + ", ".join(f"{s:.1f} s" for s in _state["boots"]))
    for run_dir in _state["artifacts"]:
        write(f"keyd-lab: journal and console of the failed run: {run_dir}")
