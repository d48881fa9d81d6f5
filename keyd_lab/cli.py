"""keyd-lab: build, boot and drive the real-kernel lab from the command line."""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import termios
import tty
from collections.abc import Sequence
from pathlib import Path

from keyd.errors import KeydError, user_message
from keyd.runner import SubprocessRunner
from keyd_lab.build import new_run_dir, prepare
from keyd_lab.demo import run_demo
from keyd_lab.kernel import cache_dir
from keyd_lab.media import StickSpec
from keyd_lab.vm import Lab, LabOptions

CURRENT = "current"  # symlink in the cache to the persistent lab's run directory
ESCAPE = b"\x1d"  # Ctrl-]


def _current() -> Path:
    return cache_dir() / CURRENT


def _boot(args: argparse.Namespace, *, persistent: bool = False, login: bool = False) -> Lab:
    artifacts = prepare(SubprocessRunner())
    sticks = [StickSpec(Path(image), serial) for image, serial in args.stick or []]
    options = LabOptions(memory_mb=args.memory, boot_timeout=args.boot_timeout,
                         sticks_at_boot=sticks, persistent=persistent, shell=login)
    print("keyd-lab: booting the guest (TCG: about 30 s) ...", file=sys.stderr, flush=True)
    lab = Lab.boot(artifacts.kernel, artifacts.initramfs, new_run_dir("cli"), options)
    print(f"keyd-lab: guest ready in {lab.boot_seconds:.1f} s ({lab.run_dir})", file=sys.stderr)
    return lab


def _running_or_none() -> Lab | None:
    link = _current()
    if not link.exists():
        return None
    try:
        return Lab.attach(link.resolve())
    except KeydError:
        return None


def cmd_build(args: argparse.Namespace) -> int:
    """Download and prepare the kernel and initramfs (cached)."""
    artifacts = prepare(SubprocessRunner())
    print(f"kernel    {artifacts.kernel.package} {artifacts.kernel.version} ({artifacts.kernel.vmlinuz})")
    print(f"initramfs {artifacts.initramfs}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Boot a persistent lab that later commands (run, plug, shell) attach to."""
    if _running_or_none() is not None:
        print(f"keyd-lab: a lab is already running ({_current().resolve()})", file=sys.stderr)
        return 0
    lab = _boot(args, persistent=True, login=True)
    _current().unlink(missing_ok=True)
    _current().symlink_to(lab.run_dir)
    print(f"keyd-lab: up, pid {lab.pid}; stop it with 'keyd-lab down'")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the persistent lab, keeping its journal and console log."""
    lab = _running_or_none()
    if lab is None:
        print("keyd-lab: no lab is running", file=sys.stderr)
        return 0
    print(f"keyd-lab: journal and console kept in {lab.collect()}", file=sys.stderr)
    lab.close()
    _current().unlink(missing_ok=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a command in the running lab, or in a fresh one booted just for it."""
    lab = _running_or_none()
    transient = lab is None
    if lab is None:
        lab = _boot(args)
    try:
        stdin = sys.stdin.buffer.read() if args.stdin else None
        result = lab.run(args.argv, input=stdin, timeout=args.timeout)
    finally:
        if transient:
            lab.close()
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.rc


def cmd_plug(args: argparse.Namespace) -> int:
    """Hot-plug a stick image into the running lab."""
    lab = _require_running()
    device = lab.plug(StickSpec(Path(args.image), args.serial, args.vendor, args.product))
    print(device)
    properties = lab.check(["udevadm", "info", "-q", "property", "-n", device]).stdout
    for line in properties.splitlines():
        if line.startswith(("ID_", "DEVNAME")):
            print(line)
    return 0


def cmd_unplug(args: argparse.Namespace) -> int:
    """Pull a stick from the running lab."""
    _require_running().unplug(args.serial)
    return 0


def _require_running() -> Lab:
    lab = _running_or_none()
    if lab is None:
        raise KeydError("no lab is running", fix="start one with 'keyd-lab up'")
    return lab


def cmd_shell(args: argparse.Namespace) -> int:
    """An interactive root console in the running lab (Ctrl-] leaves)."""
    lab = _require_running()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(lab.run_dir / "console.sock"))
    print("keyd-lab: connected to the guest console; press Enter for a prompt, Ctrl-] to leave",
          file=sys.stderr)
    _relay(sock)
    return 0


def _relay(sock: socket.socket) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd)
    try:
        while True:
            ready, _, _ = select.select([fd, sock], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or ESCAPE in data:
                    return
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot a lab NAS (RAID5+LUKS2+XFS), run keyd, plug and pull a signed stick, show the audit."""
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    """The keyd-lab argument parser."""
    parser = argparse.ArgumentParser(prog="keyd-lab", description=__doc__)
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--boot-timeout", type=float, default=180.0, help="seconds to wait for boot")
    parser.add_argument("--stick", nargs=2, action="append", metavar=("IMAGE", "SERIAL"),
                        help="a stick present at boot (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("build", help=cmd_build.__doc__).set_defaults(func=cmd_build)
    sub.add_parser("up", help=cmd_up.__doc__).set_defaults(func=cmd_up)
    sub.add_parser("down", help=cmd_down.__doc__).set_defaults(func=cmd_down)
    sub.add_parser("shell", help=cmd_shell.__doc__).set_defaults(func=cmd_shell)
    run = sub.add_parser("run", help=cmd_run.__doc__)
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("--stdin", action="store_true", help="pass this command's stdin to the guest")
    run.add_argument("argv", nargs="+", metavar="-- CMD")
    run.set_defaults(func=cmd_run)
    plug = sub.add_parser("plug", help=cmd_plug.__doc__)
    plug.add_argument("image")
    plug.add_argument("--serial", required=True)
    plug.add_argument("--vendor", default="keyd")
    plug.add_argument("--product", default="Lab Stick")
    plug.set_defaults(func=cmd_plug)
    unplug = sub.add_parser("unplug", help=cmd_unplug.__doc__)
    unplug.add_argument("serial")
    unplug.set_defaults(func=cmd_unplug)
    sub.add_parser("demo", help=cmd_demo.__doc__).set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of keyd-lab."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeydError as exc:
        print(f"keyd-lab: {user_message(exc)}", file=sys.stderr)
        return exc.exit_code
    return code


if __name__ == "__main__":
    sys.exit(main())
