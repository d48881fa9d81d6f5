"""keydctl's boot verb: ``initramfs-hook``, what keyd's initramfs-tools hook runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from keyd.config.model import DEFAULT_CONFIG


def _hook(args: argparse.Namespace) -> int:
    from keyd.boot.hook import build  # noqa: PLC0415 (only update-initramfs needs it)

    for line in build(args.config, Path(args.destdir)):
        print(line, file=sys.stdout)
    return 0


def register(subparsers: Any) -> None:
    """Add ``initramfs-hook`` to keydctl."""
    hook = subparsers.add_parser(
        "initramfs-hook", help="copy what the initramfs needs (keyd's initramfs-tools hook)",
        description="Write into DESTDIR what unlocking the boot = \"root\" volume needs "
                    "(Python modules, keyd.toml, keyd's trust) and print the programs and "
                    "kernel modules for the hook to add (keyd(8), BOOT). Nothing without such "
                    "a volume.")
    hook.add_argument("destdir", metavar="DESTDIR")
    hook.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE")
    hook.set_defaults(func=_hook)
