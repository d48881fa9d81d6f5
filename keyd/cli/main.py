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
import os
import sys
from collections.abc import Sequence

from keyd import __version__
from keyd.errors import KeydError, user_message

VOLUME_COMMANDS = "keyd.cli.volume_commands"
TRUST_COMMANDS = "keyd.cli.trust_commands"
AUDIT_COMMANDS = "keyd.cli.audit_commands"
DAEMON_COMMANDS = "keyd.cli.daemon_commands"
BOOT_COMMANDS = "keyd.cli.boot_commands"
# Each verb and the module that registers it. Only the module of the verb given is
# imported (the daemon's D-Bus stack costs more than `status` itself); --help loads all.
COMMANDS = {
    "unlock": VOLUME_COMMANDS, "lock": VOLUME_COMMANDS, "shutdown": VOLUME_COMMANDS,
    "status": VOLUME_COMMANDS,
    "doctor": VOLUME_COMMANDS, "check-config": VOLUME_COMMANDS,
    "enroll": TRUST_COMMANDS, "verify": TRUST_COMMANDS, "revoke": TRUST_COMMANDS,
    "audit": AUDIT_COMMANDS, "install": DAEMON_COMMANDS, "wait": DAEMON_COMMANDS,
    "initramfs-hook": BOOT_COMMANDS,
}
# In the order their verbs appear in --help.
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))

EXIT_CODES = """exit status:
  0  success
  1  the operation failed (the message says why)
  2  usage error
  3  configuration error
  4  an external program failed (its exit code and output are shown)
  5  the volume is busy (the processes holding it are listed)
  6  key rejected (wrong key, or a bundle that failed verification)
  7  not allowed: keyd refused the caller (root and keyd's admin group may unlock/lock)
"""


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The keydctl parser: with ``verb``, only that verb's module is loaded; else all of them."""
    parser = argparse.ArgumentParser(
        prog="keydctl",
        description="Unlock, lock and inspect the encrypted storage stacks keyd manages.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"keydctl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each program run")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (COMMANDS[verb],) if verb in COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _verb(argv: Sequence[str]) -> str | None:
    # The first word that is not an option; options before the verb take no value.
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run keydctl; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_verb(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="keydctl: %(message)s")
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
    except KeydError as exc:
        print(f"keydctl: {user_message(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("keydctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `keydctl status --json | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
