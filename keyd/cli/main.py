"""keydctl entry point: builds the argument parser from command modules and is the one error boundary.

Each command module exposes ``register(subparsers)`` and sets ``func`` (taking
the parsed arguments, returning an exit code) on every parser it adds. Errors
are :class:`~keyd.errors.KeydError`s; here, and only here, they become a
message on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from keyd import __version__
from keyd.errors import KeydError, user_message

# Command modules, in the order their verbs appear in --help.
COMMAND_MODULES = ("keyd.cli.volume_commands", "keyd.cli.trust_commands", "keyd.cli.audit_commands",
                   "keyd.cli.daemon_commands")

EXIT_CODES = """exit status:
  0  success
  1  the operation failed (the message says why)
  2  usage error
  3  configuration error
  4  an external program failed (its exit code and output are shown)
  5  the volume is busy (the processes holding it are listed)
  6  key rejected (wrong key, or a bundle that failed verification)
"""


def build_parser() -> argparse.ArgumentParser:
    """The full keydctl parser, with every registered command."""
    parser = argparse.ArgumentParser(
        prog="keydctl",
        description="Unlock, lock and inspect the encrypted storage stacks keyd manages.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"keydctl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each program run")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import failure inside the module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run keydctl; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="keydctl: %(message)s")
    try:
        code: int = args.func(args)
    except KeydError as exc:
        print(f"keydctl: {user_message(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("keydctl: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
