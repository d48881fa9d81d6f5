"""keydctl enroll / verify / revoke: key bundles on sticks and what keyd trusts.

enroll lives in keyd.cli.enroll_command; the settings all three share in
keyd.cli.trust_args.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from keyd.cli import enroll_command
from keyd.cli.trust_args import settings_from_args
from keyd.config.model import DEFAULT_CONFIG, DEFAULT_GNUPGHOME, DEFAULT_REVOCATIONS
from keyd.errors import ConfigError, KeydError
from keyd.fingerprint import normalize_fingerprint
from keyd.trust.gpg import GnuPG
from keyd.trust.report import StickReport
from keyd.trust.revocation import (
    Revocations,
    load_revocations,
    near_cap,
    save_revocations,
    valid_token,
)
from keyd.trust.settings import DEFAULT_STATE_DIR
from keyd.trust.verify import (
    StickIdentity,
    Verifier,
    commit,
    load_state,
    verify_directory,
)

EXIT_REJECTED = 6


def register(subparsers: Any) -> None:
    """Add the enroll, verify and revoke verbs to keydctl."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help=f"keyd config (default {DEFAULT_CONFIG})")
    common.add_argument("--state-dir", metavar="DIR", help=f"default {DEFAULT_STATE_DIR}")
    common.add_argument("--gnupghome", metavar="DIR", help="keyd's GnuPG home "
                        f"(default [trust] gnupghome, else {DEFAULT_GNUPGHOME})")
    common.add_argument("--revocations", metavar="FILE",
                        help=f"revocation list (default {DEFAULT_REVOCATIONS})")
    common.set_defaults(signer=[])
    pinning = argparse.ArgumentParser(add_help=False, parents=[common])
    pinning.add_argument("--signer", metavar="FPR", action="append", default=[],
                         help="pinned signer fingerprint (repeatable; adds to [trust] signers)")
    enroll_command.add_parser(subparsers, pinning)
    _add_verify(subparsers, pinning)
    _add_revoke(subparsers, common)


def _add_verify(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("verify", parents=[common],
                                   help="verify the key bundle in DIR/keyd/ (exit 0 if any key "
                                        "is accepted)")
    parser.add_argument("directory", metavar="DIR", type=Path, help="stick root")
    parser.add_argument("--serial", help="USB serial the stick has (for bound bundles)")
    parser.add_argument("--fs-uuid", help="filesystem UUID the stick has")
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    parser.add_argument("--record", action="store_true",
                        help="remember accepted generations and carried revocations")
    parser.set_defaults(func=lambda args: verify_main(args, sys.stdout))


def _add_revoke(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("revoke", parents=[common],
                                   help="add a bundle id, stick serial or signer to the "
                                        "revocation list")
    parser.add_argument("bundle_id", nargs="?", metavar="BUNDLE_ID")
    parser.add_argument("--serial", action="append", default=[], help="revoke a stick serial")
    parser.add_argument("--signer", dest="revoke_signer", action="append", default=[],
                        metavar="FPR", help="revoke a signer fingerprint")
    parser.set_defaults(func=lambda args: revoke_main(args, sys.stdout))


def verify_main(args: argparse.Namespace, out: TextIO) -> int:
    """keydctl verify: full verification of DIR/keyd/, printed per volume."""
    settings = settings_from_args(args)
    if not settings.signers:
        raise ConfigError(settings.source, "trust.signers", "no signer is pinned",
                          fix="add signers = [\"FPR\"] under [trust], or pass --signer FPR")
    gpg = GnuPG(settings.gnupghome)
    verifier = Verifier(gpg, settings.signers, decryptor=gpg)
    stick = StickIdentity(args.serial, args.fs_uuid)
    with verify_directory(args.directory, verifier, stick, load_state(settings),
                          settings.limits) as report:
        out.write(render_json(report) if args.json else render_text(report))
        if args.record:
            _warn(commit(report, settings))
        return 0 if report.accepted else EXIT_REJECTED


def render_text(report: StickReport) -> str:
    """One line per volume (or one for a refused stick), for people."""
    if report.reason is not None:
        return f"stick refused: {report.message}\n"
    lines = [f"signed by {report.signer}: {report.message}"]
    for verdict in report.verdicts:
        status = "ACCEPTED" if verdict.accepted else "REJECTED"
        lines.append(f"  {verdict.entry.volume}: {status} {verdict.message}")
    return "\n".join(lines) + "\n"


def render_json(report: StickReport) -> str:
    """The verdicts as JSON (reason codes, never key bytes)."""
    volumes = [{"volume": v.entry.volume, "bundle_id": v.entry.bundle_id,
                "generation": v.entry.generation, "accepted": v.accepted,
                "key_names": v.entry.key_names,
                "keyfiles": sum(k.kind == "keyfile" for k in v.entry.secrets),
                "reason": v.reason.value if v.reason else None, "message": v.message}
               for v in report.verdicts]
    document = {"accepted": bool(report.accepted), "signer": report.signer,
                "reason": report.reason.value if report.reason else None,
                "message": report.message, "volumes": volumes}
    return json.dumps(document, indent=2) + "\n"


def revoke_main(args: argparse.Namespace, out: TextIO) -> int:
    """keydctl revoke: add to the revocation list (atomically)."""
    settings = settings_from_args(args)
    signers = [_fingerprint(text, "--signer") for text in args.revoke_signer]
    for token in [*args.serial, *([args.bundle_id] if args.bundle_id else [])]:
        if not valid_token(token):
            raise KeydError(f"{token!r} is not a valid bundle id or serial")
    added = Revocations(frozenset([args.bundle_id] if args.bundle_id else []),
                        frozenset(args.serial), frozenset(signers))
    if not added:
        raise KeydError("nothing to revoke", fix="give a BUNDLE_ID, --serial S or --signer FPR")
    path = Path(settings.revocations_file)
    revoked = load_revocations(path).union(added)
    save_revocations(path, revoked)
    _warn(near_cap(path, revoked))
    out.write(f"revoked in {path}: " + ", ".join(sorted(
        [*added.bundle_ids, *(f"serial {s}" for s in added.serials),
         *(f"signer {s}" for s in added.signers)])) + "\n")
    return 0


def _warn(warning: str | None) -> None:
    if warning is not None:
        print(f"keydctl: warning: {warning}", file=sys.stderr)


def _fingerprint(text: str, option: str) -> str:
    fpr = normalize_fingerprint(text)
    if fpr is None:
        raise KeydError(f"{option} {text!r} is not a full key fingerprint",
                        fix="use the 40-hex-digit primary fingerprint")
    return fpr
