"""The lab VM: QEMU (TCG) booting the cached Debian kernel over the host's root, driven over QMP.

A :class:`Lab` owns one QEMU process. It boots to ``keyd-lab.target``, runs
commands through the guest agent, hot-plugs virtio disks and USB sticks, and
collects the guest's journal and console when it is closed.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyd.errors import KeydError
from keyd_lab import guest_root
from keyd_lab.channel import Channel, GuestCommandFailed, GuestResult
from keyd_lab.errors import BootTimeout, LabError
from keyd_lab.kernel import Kernel
from keyd_lab.media import StickSpec
from keyd_lab.profile import LEDGER, kind_of
from keyd_lab.qmp import Qmp

QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1


def guest_cpus() -> int:
    """vCPUs for a guest: ``KEYD_LAB_CPUS`` if set; else one when pytest-xdist runs guests side
    by side, two for a guest alone. Two guests with two vCPUs each outnumber two cores: a guest
    whose vCPU is preempted holding a lock makes its other vCPU spin, and two such guests took
    1.71 times as long as one after the other, with one vCPU each 0.76
    (benchmarks/bench_lab_parallel.py)."""
    if os.environ.get("KEYD_LAB_CPUS"):
        return int(os.environ["KEYD_LAB_CPUS"])
    return 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2


@dataclass
class LabOptions:
    """How to boot: size, deadline, sticks present at boot, and whether a console login is wanted."""

    memory_mb: int = 2048
    cpus: int = field(default_factory=guest_cpus)
    # Under TCG the plain baseline CPU boots ~3 s faster than "max" (no AVX to emulate).
    cpu_model: str = "qemu64"
    boot_timeout: float = 180.0
    sticks_at_boot: Sequence[StickSpec] = ()
    # Virtio disks present from power-on, (image, serial): /dev/disk/by-id/virtio-SERIAL.
    disks_at_boot: Sequence[tuple[Path, str]] = ()
    shell: bool = False
    # A persistent lab (keyd-lab up) outlives the command that started it.
    persistent: bool = False
    extra_append: str = ""
    # A tree copied over the guest root before systemd starts (units, configs).
    extra_root: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _die_with_parent() -> None:
    # No QEMU may outlive the test session that started it, even if that session is killed.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def node_id(prefix: str, serial: str) -> str:
    """A QMP id/node-name for a device identified by ``serial``."""
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_-]', '_', serial)}"[:31]


class Lab:
    """One lab VM. Use :meth:`boot`, or :meth:`attach` to a persistent one."""

    def __init__(self, run_dir: Path, pid: int | None = None) -> None:
        self.run_dir = run_dir
        self.pid = pid
        self.boot_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._channel: Channel | None = None

    # ----- starting and stopping -----------------------------------------------------------

    @classmethod
    def boot(cls, kernel: Kernel, initramfs: Path, run_dir: Path, options: LabOptions) -> Lab:
        """Start QEMU and wait until the guest has reached ``keyd-lab.target``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        guest_root.write_guest_root(run_dir / "overlay", shell=options.shell,
                                    boot_sticks=[s.serial for s in options.sticks_at_boot],
                                    extra_root=options.extra_root)
        lab = cls(run_dir)
        started = time.monotonic()
        lab._spawn(qemu_argv(kernel, initramfs, run_dir, options), options.persistent)
        try:
            lab._wait_ready(started + options.boot_timeout, options.boot_timeout)
        except BaseException:
            lab.close()
            raise
        finally:
            LEDGER.add("boot", time.monotonic() - started)
        lab.boot_seconds = time.monotonic() - started
        options.timings["boot"] = lab.boot_seconds
        return lab

    @classmethod
    def attach(cls, run_dir: Path) -> Lab:
        """Connect to a persistent lab started earlier in ``run_dir``."""
        pid_file = run_dir / "qemu.pid"
        if not pid_file.exists() or not _alive(int(pid_file.read_text())):
            raise LabError(f"no lab is running in {run_dir}", fix="start one with 'keyd-lab up'")
        return cls(run_dir, int(pid_file.read_text()))

    def _spawn(self, argv: list[str], persistent: bool) -> None:
        log = (self.run_dir / "qemu.log").open("wb")
        try:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only prctl runs in the child; keyd-lab starts no threads before booting.
                preexec_fn=None if persistent else _die_with_parent)  # noqa: PLW1509
        except FileNotFoundError:
            raise LabError(f"{QEMU} is not installed", fix="apt-get install qemu-system-x86") from None
        finally:
            log.close()
        self.pid = self._process.pid
        (self.run_dir / "qemu.pid").write_text(f"{self.pid}\n")

    def _wait_ready(self, deadline: float, budget: float) -> None:
        try:
            self.channel.wait_ready(deadline)
            remaining = max(deadline - time.monotonic(), 1.0)
            # The channel itself: the profile counts this wait as part of the boot.
            state = self.channel.run(["systemctl", "is-system-running", "--wait"], timeout=remaining)
        except KeydError as exc:
            if self._process is not None and self._process.poll() is not None:
                qemu_log = (self.run_dir / "qemu.log").read_text(errors="replace").strip()
                raise LabError(f"QEMU exited with status {self._process.returncode} while "
                               f"booting: {qemu_log or '(no output)'}") from exc
            raise BootTimeout(budget, self.console_tail()) from exc
        if state.stdout.strip() not in ("running", "degraded"):
            raise BootTimeout(budget, self.console_tail())

    def close(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after 5 s) and drop the connections."""
        for closer in (self._channel, self._qmp):
            if closer is not None:
                closer.close()
        self._channel = self._qmp = None
        if self.pid is None or not _alive(self.pid):
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait(timeout=5)

    def power_off(self, timeout: float = 300.0) -> None:
        """``systemctl poweroff`` and wait for QEMU to exit (the lab runs it with -no-reboot)."""
        self.run(["systemctl", "poweroff", "--no-block"])
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.running:
            raise LabError(f"the guest did not power off within {timeout:.0f} s:\n"
                           + self.console_tail(60))

    @property
    def running(self) -> bool:
        """Whether the QEMU process is still alive."""
        return self.pid is not None and _alive(self.pid)

    # ----- connections ---------------------------------------------------------------------

    @property
    def qmp(self) -> Qmp:
        """The QMP session, opened on first use."""
        if self._qmp is None:
            self._qmp = Qmp(self.run_dir / "qmp.sock")
        return self._qmp

    @property
    def channel(self) -> Channel:
        """The guest agent's channel, opened on first use."""
        if self._channel is None:
            self._channel = Channel(self.run_dir / "agent.sock")
        return self._channel

    # ----- commands ------------------------------------------------------------------------

    def run(self, argv: Sequence[str], input: bytes | str | None = None,
            timeout: float = 60.0) -> GuestResult:
        """Run argv in the guest: ``(rc, stdout, stderr)``."""
        started = time.monotonic()
        try:
            return self.channel.run(list(argv), input=input, timeout=timeout)
        finally:
            LEDGER.add(kind_of(argv), time.monotonic() - started)

    def check(self, argv: Sequence[str], input: bytes | str | None = None,
              timeout: float = 60.0) -> GuestResult:
        """Like :meth:`run`, but a non-zero exit raises :class:`GuestCommandFailed`."""
        result = self.run(argv, input=input, timeout=timeout)
        if result.rc != 0:
            raise GuestCommandFailed(list(argv), result)
        return result

    def sh(self, script: str, timeout: float = 60.0) -> str:
        """Run a shell script in the guest, require success, return stdout."""
        return self.check(["/bin/sh", "-ec", script], timeout=timeout).stdout

    # ----- disks and sticks ----------------------------------------------------------------

    def attach_disk(self, image: Path, serial: str, *, sector_size: int = 512,
                    timeout: float = 30.0) -> str:
        """Hot-plug ``image`` as a virtio disk; return its stable guest path."""
        node = node_id("disk", serial)
        self.qmp.execute("blockdev-add", **_file_node(node, image))
        self.qmp.execute("device_add", driver="virtio-blk-pci", id=node, drive=node, serial=serial,
                         logical_block_size=sector_size, physical_block_size=sector_size)
        path = f"/dev/disk/by-id/virtio-{serial}"
        self.check(["udevadm", "wait", f"--timeout={timeout:g}", path], timeout=timeout + 5)
        return path

    def detach_disk(self, serial: str, timeout: float = 30.0) -> None:
        """Hot-unplug the virtio disk with ``serial`` and release its image."""
        self._unplug(node_id("disk", serial), node_id("disk", serial), timeout)

    def plug(self, stick: StickSpec, timeout: float = 30.0) -> str:
        """Hot-plug a USB stick on the xHCI bus; return its guest block device once udev has it."""
        bot, node = node_id("stick", stick.serial), node_id("stnode", stick.serial)
        self.qmp.execute("blockdev-add", **_file_node(node, stick.image))
        self.qmp.execute("device_add", driver="usb-bot", id=bot, bus="xhci.0", serial=stick.serial)
        self.qmp.execute("device_add", driver="scsi-hd", id=f"{bot}-lun", bus=f"{bot}.0",
                         drive=node, vendor=stick.vendor[:8], product=stick.product[:16],
                         removable=True)
        # Hot-plugged usb-bot devices wait to be attached until their LUN exists.
        self.qmp.execute("qom-set", path=bot, property="attached", value=True)
        return self.wait_for_serial(stick.serial, timeout)

    def unplug(self, serial: str, timeout: float = 30.0) -> None:
        """Pull the stick with ``serial``: device_del, wait for DEVICE_DELETED, blockdev-del."""
        self._unplug(node_id("stick", serial), node_id("stnode", serial), timeout)

    def _unplug(self, device: str, node: str, timeout: float) -> None:
        self.qmp.execute("device_del", id=device)
        self.qmp.wait_event("DEVICE_DELETED", timeout, device=device)
        self.qmp.execute("blockdev-del", **{"node-name": node})

    def wait_for_serial(self, serial: str, timeout: float = 30.0) -> str:
        """The guest block device whose udev ID_SERIAL_SHORT is ``serial``, waiting for it."""
        script = (f"end=$(($(date +%s)+{int(timeout)})); while [ $(date +%s) -lt $end ]; do "
                  "udevadm settle -t 5; for d in /sys/class/block/*; do "
                  f"udevadm info -q property -p $d | grep -qx 'ID_SERIAL_SHORT={serial}' "
                  "&& { echo /dev/${d##*/}; exit 0; }; done; sleep 0.2; done; exit 1")
        result = self.run(["/bin/sh", "-c", script], timeout=timeout + 10)
        if result.rc != 0:
            raise LabError(f"no block device with serial {serial} appeared in the guest "
                           f"within {timeout:g} s")
        return result.stdout.split()[0]

    # ----- evidence ------------------------------------------------------------------------

    def console_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the guest console."""
        log = self.run_dir / "console.log"
        text = log.read_text(errors="replace") if log.exists() else "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    def collect(self) -> Path:
        """Save the guest journal as JSON next to the console log; return the run directory."""
        if self.running:
            try:
                journal = self.run(["journalctl", "-o", "json", "--no-pager"], timeout=60)
                (self.run_dir / "journal.json").write_text(journal.stdout)
            except KeydError as exc:
                (self.run_dir / "journal.json").write_text(f"# journal not collected: {exc}\n")
        return self.run_dir


def _file_node(node: str, image: Path) -> dict[str, Any]:
    return {"driver": "raw", "node-name": node,
            "file": {"driver": "file", "filename": str(image.resolve())}}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); reap it to know.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def qemu_argv(kernel: Kernel, initramfs: Path, run_dir: Path, options: LabOptions) -> list[str]:
    """The full QEMU command line for one boot."""
    # mitigations=off and one UART save seconds under TCG; delay_use=0 makes sticks appear at once.
    append = " ".join(["console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off 8250.nr_uarts=1",
                       "usb-storage.delay_use=0 systemd.show_status=auto",
                       f"keydlab.modules={kernel.modules} keydlab.overlay={run_dir / 'overlay'}",
                       options.extra_append]).strip()
    argv = [QEMU, "-machine", "pc,accel=tcg", "-cpu", options.cpu_model, "-smp", str(options.cpus),
            "-m", str(options.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(kernel.vmlinux), "-initrd", str(initramfs), "-append", append,
            "-chardev", f"socket,id=con,path={run_dir}/console.sock,server=on,wait=off,"
                        f"logfile={run_dir}/console.log",
            "-serial", "chardev:con",
            "-qmp", f"unix:{run_dir}/qmp.sock,server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=agent,path={run_dir}/agent.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vser.0,chardev=agent,name=keyd.agent",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-device", "qemu-xhci,id=xhci"]
    for image, serial in options.disks_at_boot:
        argv += _disk_at_boot(image, serial)
    for stick in options.sticks_at_boot:
        argv += _stick_at_boot(stick)
    return argv


def _disk_at_boot(image: Path, serial: str) -> list[str]:
    node = node_id("disk", serial)
    return ["-blockdev", f"driver=raw,node-name={node},file.driver=file,"
                         f"file.filename={image.resolve()}",
            "-device", f"virtio-blk-pci,drive={node},serial={serial}"]


def _stick_at_boot(stick: StickSpec) -> list[str]:
    bot, node = node_id("stick", stick.serial), node_id("stnode", stick.serial)
    return ["-blockdev", f"driver=raw,node-name={node},file.driver=file,"
                         f"file.filename={stick.image.resolve()}",
            "-device", f"usb-bot,id={bot},bus=xhci.0,serial={stick.serial}",
            "-device", f"scsi-hd,id={bot}-lun,bus={bot}.0,drive={node},"
                       f"vendor={stick.vendor[:8]},product={stick.product[:16]},removable=on"]


def direct_boot_argv(kernel: Kernel, initrd: Path, run_dir: Path, append: str, *,
                     disks: Sequence[tuple[Path, str]], sticks: Sequence[StickSpec]) -> list[str]:
    """QEMU for a boot of ``initrd`` itself (no lab init, no agent): one serial console,
    virtio disks (image, serial) and USB sticks present from power-on."""
    argv = [QEMU, "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-smp", "1", "-m", "1024",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel.vmlinux), "-initrd", str(initrd), "-append", append,
            "-chardev", f"socket,id=con,path={run_dir}/console.sock,server=on,wait=off,"
                        f"logfile={run_dir}/console.log",
            "-serial", "chardev:con", "-device", "qemu-xhci,id=xhci"]
    for image, serial in disks:
        argv += _disk_at_boot(image, serial)
    for stick in sticks:
        argv += _stick_at_boot(stick)
    return argv


def boot_until_power_off(argv: Sequence[str], run_dir: Path, *, timeout: float,
                         answer: tuple[str, str] | None = None) -> str:
    """Run QEMU until the guest powers off (or ``timeout``); the console's text. ``answer``:
    (prompt, line) typed on the console once the prompt appeared."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (run_dir / "qemu.log").open("wb") as log:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # noqa: PLW1509
    try:
        if answer is not None:
            _type_on_console(run_dir / "console.sock", *answer, deadline=time.monotonic() + timeout)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabError(f"the guest did not power off within {timeout:g} s:\n"
                       + _tail(run_dir / "console.log")) from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        LEDGER.add("boot", time.monotonic() - started)
    return (run_dir / "console.log").read_text(errors="replace")


def _type_on_console(sock_path: Path, prompt: str, line: str, *, deadline: float) -> None:
    while not sock_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
        console.connect(str(sock_path))
        console.settimeout(1.0)
        seen = b""
        while prompt.encode() not in seen:
            if time.monotonic() >= deadline:
                raise LabError(f"the console never asked {prompt!r}")
            try:
                chunk = console.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise LabError(f"the console closed before asking {prompt!r}")
            seen = seen[-4096:] + chunk
        # As a person types: the emulated UART's 16-byte FIFO drops what a burst overruns.
        for byte in line.encode() + b"\n":
            console.sendall(bytes([byte]))
            time.sleep(0.05)


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no console output)"
    return "\n".join(text.splitlines()[-lines:])
