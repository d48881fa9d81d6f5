"""keydctl enroll / verify / revoke: key bundles on sticks and what keyd trusts.

Trust settings come from ``--signer`` / ``--gnupghome`` flags or the
``[trust]`` table of ``--config`` (default /etc/keyd/keyd.toml; absent is
fine when flags say enough). ``--state-dir`` and ``--revocations`` let every
verb run without root against throwaway paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from keyd.cli.key_args import UsageError, parse_key_files
from keyd.config import load_config
from keyd.config.model import DEFAULT_CONFIG, DEFAULT_GNUPGHOME, DEFAULT_REVOCATIONS, TrustConfig
from keyd.errors import ConfigError, KeydError
from keyd.fingerprint import normalize_fingerprint
from keyd.runner import SubprocessRunner
from keyd.trust import luks
from keyd.trust.enroll import Enroller, EnrollRequest
from keyd.trust.generations import GenerationStore
from keyd.trust.gpg import GnuPG
from keyd.trust.manifest import KeyEntry
from keyd.trust.report import StickReport
from keyd.trust.revocation import Revocations, load_revocations, save_revocations, valid_token
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.settings import DEFAULT_STATE_DIR, Limits, TrustSettings
from keyd.trust.verify import (
    StickIdentity,
    Verifier,
    commit,
    load_state,
    verify_directory,
)

DEFAULT_KEY_BYTES = 64
EXIT_REJECTED = 6
LUKS_MAX_KEY_BYTES = 8 * 1024 * 1024  # cryptsetup's default --keyfile-size limit
ENROLL_EXAMPLES = """examples:
  one key for every layer of tank (a generated 64-byte key, added to a LUKS keyslot):
    keydctl enroll --volume tank --signing-key FPR --output /media/stick \\
        --bind-serial SERIAL --device /dev/md0 < current.key
  a key per layer: seed 002's two TrueCrypt volumes with passphrases of their own
  (the names are the layers' `key` in keyd.toml):
    keydctl enroll --volume secret --signing-key FPR --output /media/stick \\
        --bind-serial SERIAL --key-file k1=/root/tc1.pass --key-file k2=/root/tc2.pass
  a backup stick: the same keys at the same generation, bound to the second stick;
  using either never retires the other (a lost one: keydctl revoke --serial SERIAL):
    keydctl enroll --volume tank --signing-key FPR --output /media/backup \\
        --bind-serial SERIAL2 --backup-of /media/stick
"""


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
    _add_enroll(subparsers, pinning)
    _add_verify(subparsers, pinning)
    _add_revoke(subparsers, common)


def _add_enroll(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "enroll", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a signed key bundle for a volume into DIR/keyd/",
        description="Write (or replace) VOLUME's bundle in DIR/keyd/ and sign the manifest.",
        epilog=ENROLL_EXAMPLES)
    parser.add_argument("--volume", required=True, help="volume name, as in keyd.toml")
    parser.add_argument("--signing-key", required=True, metavar="FPR",
                        help="primary fingerprint of the signing key (secret key in --gnupghome)")
    parser.add_argument("--output", required=True, metavar="DIR", type=Path,
                        help="stick root (mounted stick or any directory)")
    parser.add_argument("--key-file", action="append", default=[], metavar="[NAME=]PATH",
                        help="use this existing key; NAME= makes it the key of the layers whose "
                             "`key` is NAME (repeatable)")
    parser.add_argument("--key-name", action="append", default=[], metavar="NAME",
                        help="generate a random key for key name NAME (repeatable)")
    parser.add_argument("--generate", metavar="BYTES", type=int,
                        help=f"size of generated keys (default {DEFAULT_KEY_BYTES} bytes)")
    parser.add_argument("--backup-of", metavar="DIR", type=Path,
                        help="copy the volume's bundle from the primary stick mounted at DIR "
                             "(same keys, same generation, its own bundle id and binding)")
    parser.add_argument("--encrypt-to", metavar="FPR", help="encrypt the key file to the host key")
    parser.add_argument("--not-before", metavar="DATE", type=parse_date,
                        help="valid from (default now)")
    parser.add_argument("--not-after", metavar="DATE", type=parse_date, help="valid until")
    parser.add_argument("--bind-serial", metavar="SERIAL", help="USB serial of the stick")
    parser.add_argument("--bind-fs-uuid", metavar="UUID", help="filesystem UUID of the stick")
    parser.add_argument("--generation", type=int, metavar="N",
                        help="key generation (default: one above the last known)")
    parser.add_argument("--volume-uuid", metavar="UUID", help="LUKS/md/fs UUID of the volume")
    parser.add_argument("--bundle-id", metavar="ID", help="default: a random UUID")
    parser.add_argument("--device", metavar="DEV",
                        help="also add the key to a LUKS keyslot of DEV (existing key on stdin)")
    parser.add_argument("--iter-time", type=int, metavar="MS",
                        help="PBKDF time for the new keyslot (cryptsetup --iter-time)")
    parser.set_defaults(func=lambda args: enroll_main(args, None, sys.stdout))


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


def parse_date(text: str) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC) or ISO 8601; a time without offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (use 2027-01-31 or 2027-01-31T12:00:00+01:00)") from None
    if len(text) == 10:
        moment = datetime.combine(moment.date(), time(), UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def settings_from_args(args: argparse.Namespace) -> TrustSettings:
    """TrustSettings from the config's [trust] table, overridden by flags.

    Without --config, a missing default config file means "no config": flags alone suffice.
    """
    path = args.config or DEFAULT_CONFIG
    trust = load_config(path).trust if args.config or os.path.exists(path) else TrustConfig()
    return TrustSettings(
        signers=trust.signers + tuple(args.signer), gnupghome=args.gnupghome or trust.gnupghome,
        revocations_file=args.revocations or trust.revocations,
        state_dir=args.state_dir or DEFAULT_STATE_DIR, source=path)


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
            commit(report, settings)
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
                "key_names": sorted(k.name for k in v.entry.secrets if k.name is not None),
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
    save_revocations(path, load_revocations(path).union(added))
    out.write(f"revoked in {path}: " + ", ".join(sorted(
        [*added.bundle_ids, *(f"serial {s}" for s in added.serials),
         *(f"signer {s}" for s in added.signers)])) + "\n")
    return 0


def _fingerprint(text: str, option: str) -> str:
    fpr = normalize_fingerprint(text)
    if fpr is None:
        raise KeydError(f"{option} {text!r} is not a full key fingerprint",
                        fix="use the 40-hex-digit primary fingerprint")
    return fpr


def enroll_main(args: argparse.Namespace, stdin: BinaryIO | None, out: TextIO) -> int:
    """keydctl enroll: write the bundle (and, with --device, add the LUKS keyslot first).

    ``stdin`` (default: the process's) is read only with --device, for the existing key.
    """
    settings = settings_from_args(args)
    now = datetime.now(UTC)
    if args.backup_of is not None:
        return _backup(args, settings, now, out)
    request = EnrollRequest(
        volume=args.volume, signing_key=args.signing_key, output=args.output,
        not_before=args.not_before or now, generation=args.generation,
        not_after=args.not_after, bind_serial=args.bind_serial, bind_fs_uuid=args.bind_fs_uuid,
        volume_uuid=args.volume_uuid, encrypt_to=args.encrypt_to, bundle_id=args.bundle_id)
    _check_request(request)
    with _new_keys(args, settings.limits) as keys:
        if args.device:
            request = _add_keyslot(args, request, _only_key(keys), stdin or sys.stdin.buffer)
        enroller = Enroller(GnuPG(settings.gnupghome), settings.signers)
        last = GenerationStore(settings.state_path).last(args.volume)
        entry = enroller.enroll(request, keys, now, last)
    _enrolled(out, "enrolled", entry, args.output)
    return 0


def _backup(args: argparse.Namespace, settings: TrustSettings, now: datetime, out: TextIO) -> int:
    given = [option for option, value in (("--key-file", args.key_file), ("--key-name",
             args.key_name), ("--generate", args.generate), ("--generation", args.generation),
             ("--device", args.device), ("--encrypt-to", args.encrypt_to)) if value]
    if given:
        raise UsageError(f"--backup-of copies the primary's keys and generation; {given[0]} "
                         "does not go with it", fix=f"leave out {', '.join(given)}")
    request = EnrollRequest(
        volume=args.volume, signing_key=args.signing_key, output=args.output, not_before=now,
        not_after=args.not_after, bind_serial=args.bind_serial, bind_fs_uuid=args.bind_fs_uuid,
        bundle_id=args.bundle_id)
    _check_request(request)
    entry = Enroller(GnuPG(settings.gnupghome), settings.signers).backup(
        request, args.backup_of, now)
    _enrolled(out, "backed up", entry, args.output)
    return 0


def _enrolled(out: TextIO, verb: str, entry: KeyEntry, output: Path) -> None:
    files = ", ".join(str(output / "keyd" / secret.file) + (f" (key {secret.name})"
                      if secret.name else "") for secret in entry.secrets)
    out.write(f"{verb} volume {entry.volume}: bundle {entry.bundle_id}, generation "
              f"{entry.generation}, key file {files}\n")


def _check_request(request: EnrollRequest) -> None:
    if request.bind_serial is None and request.bind_fs_uuid is None:
        raise KeydError("a bundle must be bound to its stick",
                        fix="pass --bind-serial SERIAL and/or --bind-fs-uuid UUID")
    if request.generation is not None and request.generation < 1:
        raise KeydError("--generation must be 1 or more")


def _new_keys(args: argparse.Namespace, limits: Limits) -> KeySet:
    """The keys to enroll: read from --key-file, generated for --key-name, else one generated."""
    files = parse_key_files(args.key_file, args.volume)
    named = [*files.by_name, *args.key_name]
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        raise UsageError(f"key name {twice[0]!r} is given twice", fix="give each key name once")
    if args.generate is not None and args.key_file and not args.key_name:
        raise UsageError("--generate sizes generated keys; --key-file reads existing ones",
                         fix="give either, or add --key-name NAME for a generated key")
    keys: dict[str | None, SecretBytes] = {}
    try:
        if files.default is not None:
            keys[None] = _read_key_file(Path(files.default), limits.key_bytes)
        for name, path in files.by_name.items():
            keys[name] = _read_key_file(Path(path), limits.key_bytes)
        for name in args.key_name or ([] if args.key_file else [None]):
            keys[name] = _generated(args.generate, limits)
    except BaseException:
        KeySet(keys).wipe()
        raise
    return KeySet(keys)


def _generated(size: int | None, limits: Limits) -> SecretBytes:
    size = DEFAULT_KEY_BYTES if size is None else size
    if not 1 <= size <= limits.key_bytes:
        raise KeydError(f"--generate {size}: the key size must be 1 to {limits.key_bytes} bytes")
    return SecretBytes.adopt(bytearray(os.urandom(size)))


def _only_key(keys: KeySet) -> SecretBytes:
    """The one key --device adds to a keyslot (a LUKS device takes one key name's key)."""
    pairs = keys.items()
    if len(pairs) != 1:
        raise UsageError("--device adds one key to a LUKS keyslot; this bundle has "
                         f"{len(pairs)}", fix="enroll per-layer keys without --device and add "
                         "each to its device with cryptsetup luksAddKey")
    return pairs[0][1]


def _read_key_file(path: Path, cap: int) -> SecretBytes:
    try:
        with path.open("rb", buffering=0) as stream:
            return read_capped_secret(stream, cap, f"key file {path}")
    except OSError as exc:
        raise KeydError(f"cannot read key file {path}: {exc.strerror}") from None


def read_capped_secret(stream: BinaryIO, cap: int, what: str) -> SecretBytes:
    """Read all of ``stream`` (1 to ``cap`` bytes) straight into a SecretBytes."""
    secret = SecretBytes.adopt(bytearray(cap + 1))
    view = memoryview(secret.buffer)
    count = 0
    while count <= cap:
        got = stream.readinto(view[count:]) or 0  # type: ignore[attr-defined]
        if got == 0:
            break
        count += got
    view.release()
    if count == 0 or count > cap:
        secret.wipe()
        raise KeydError(f"{what} must hold 1 to {cap} bytes")
    secret.buffer[count:] = b""
    return secret


def _add_keyslot(args: argparse.Namespace, request: EnrollRequest, key: SecretBytes,
                 stdin: BinaryIO) -> EnrollRequest:
    runner = SubprocessRunner()
    uuid = request.volume_uuid or luks.luks_uuid(runner, args.device)
    with read_existing_key(stdin) as existing:
        luks.add_keyslot(runner, args.device, key, existing, iter_time_ms=args.iter_time)
    return dataclasses.replace(request, volume_uuid=uuid)


def read_existing_key(stdin: BinaryIO) -> SecretBytes:
    """The device's current key: typed at a prompt, or piped in raw (binary key files)."""
    if stdin.isatty():
        typed = getpass.getpass("existing passphrase for the device: ")
        return SecretBytes(typed.encode())
    return read_capped_secret(stdin, LUKS_MAX_KEY_BYTES, "the device's existing key on stdin")
