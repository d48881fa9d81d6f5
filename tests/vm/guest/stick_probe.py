"""Runs in the lab guest: mount a stick the way the daemon does, and report what happened as JSON.

usage: stick_probe.py DEVICE RUN_DIR
The filesystem type comes from udev (ID_FS_TYPE), as it does for the daemon.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

from keyd.runner import SubprocessRunner
from keyd.trust.errors import TrustError
from keyd.trust.stick_mount import StickMounter


def fs_type(device: str) -> str:
    out = subprocess.run(["udevadm", "info", "-q", "property", "-n", device],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines()).get("ID_FS_TYPE", "")


def mounts_under(run_dir: str) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.strip() for line in mountinfo if f" {run_dir}/" in line]


def main(device: str, run_dir: str) -> dict[str, object]:
    mounter = StickMounter(SubprocessRunner(), run_dir=run_dir)
    fstype = fs_type(device)
    report: dict[str, object] = {"fstype": fstype}
    try:
        with mounter.mounted(device, fstype):
            report["while_mounted"] = mounts_under(run_dir)
        report["after_unmount"] = mounts_under(run_dir)
        read = mounter.read(device, fstype)
    except TrustError as exc:
        report["error"] = str(exc.reason)
    else:
        with read.bundle as bundle:
            report["mounted_seconds"] = read.mounted_seconds
            report["files"] = {name: base64.b64encode(bytes(data)).decode()
                               for name, data in bundle.files.items()}
    report["left_mounted"] = mounts_under(run_dir)
    report["left_entries"] = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
