"""``keyd-lab demo``: boot the lab NAS, plug a key stick, and show what keyd matches on."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from keyd.lab.build import new_run_dir, prepare
from keyd.lab.media import StickSpec, build_stick
from keyd.lab.progress import phase
from keyd.lab.vm import Lab, LabOptions
from keyd.runner import SubprocessRunner

# The udev properties keyd's stick matching reads (see docs/keyd.8.md).
MATCHED = ("DEVNAME", "ID_BUS", "ID_SERIAL_SHORT", "ID_VENDOR", "ID_MODEL", "ID_FS_TYPE",
           "ID_FS_UUID", "ID_FS_LABEL", "ID_USB_DRIVER")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo story and print each phase's timing; returns an exit code."""
    timings: dict[str, float] = {}
    runner = SubprocessRunner()
    with phase("prepare kernel and initramfs (cached after the first run)", timings):
        artifacts = prepare(runner, timings)
    with tempfile.TemporaryDirectory(prefix="keyd-demo-") as tmp:
        image = Path(tmp) / "stick.img"
        with phase("build a vfat key stick image", timings):
            build_stick(runner, image, label="KEYD", files={"keyd/README": b"keyd demo stick\n"})
        with phase("boot the lab NAS", timings):
            lab = Lab.boot(artifacts.kernel, artifacts.initramfs, new_run_dir("demo"),
                           LabOptions(memory_mb=args.memory, boot_timeout=args.boot_timeout))
        try:
            _story(lab, image, timings)
        finally:
            lab.close()
    _print_timings(timings)
    return 0


def _story(lab: Lab, image: Path, timings: dict[str, float]) -> None:
    print(f"\nguest: {lab.check(['uname', '-sr']).stdout.strip()}, "
          f"{lab.check(['cryptsetup', '--version']).stdout.strip()}")
    with phase("hot-plug the stick (serial KEYD0001) and wait for udev", timings):
        device = lab.plug(StickSpec(image, "KEYD0001", vendor="Acme", product="Key Stick"))
    properties = lab.check(["udevadm", "info", "-q", "property", "-n", device]).stdout
    print(f"\nudev properties keyd matches on for {device}:")
    for line in properties.splitlines():
        key, _, value = line.partition("=")
        if key in MATCHED:
            print(f"  {key:<16} {value}")
    with phase("pull the stick", timings):
        lab.unplug("KEYD0001")


def _print_timings(timings: dict[str, float]) -> None:
    print("\nphase timings:")
    for name, seconds in timings.items():
        print(f"  {seconds:7.2f} s  {name}")
