"""keydctl enroll: write signed key bundles onto sticks.

One key for every layer of a volume, a key per key name (bundle format 2), a
backup of another stick's bundle, or n share bundles of which any k open the
volume (k-of-n). See docs/bundle-format.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from keyd.cli.key_args import UsageError, parse_key_files, split_named
from keyd.cli.trust_args import parse_date, settings_from_args
from keyd.errors import KeydError
from keyd.runner import SubprocessRunner
from keyd.trust import luks
from keyd.trust.enroll import Enroller, EnrollRequest
from keyd.trust.generations import GenerationStore
from keyd.trust.gpg import GnuPG
from keyd.trust.manifest import KeyEntry
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.settings import Limits, TrustSettings
from keyd.trust.shares import MAX_SHARES

DEFAULT_KEY_BYTES = 64
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
  k-of-n: any 2 of these 3 sticks open vault (its existing key, wrapped, not replaced):
    keydctl enroll --volume vault --signing-key FPR --key-file /root/vault.key \\
        --shares 3 --threshold 2 --output /media/a --bind-serial SA \\
        --output /media/b --bind-serial SB --output /media/c --bind-serial SC
"""


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the enroll verb (``common``: the trust verbs' shared options)."""
    parser = subparsers.add_parser(
        "enroll", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a signed key bundle for a volume into DIR/keyd/",
        description="Write (or replace) VOLUME's bundle in DIR/keyd/ and sign the manifest.",
        epilog=ENROLL_EXAMPLES)
    parser.add_argument("--volume", required=True, help="volume name, as in keyd.toml")
    parser.add_argument("--signing-key", required=True, metavar="FPR",
                        help="primary fingerprint of the signing key (secret key in --gnupghome)")
    parser.add_argument("--output", required=True, action="append", metavar="DIR", type=Path,
                        help="stick root (mounted stick or any directory); with --shares once "
                             "per stick")
    parser.add_argument("--key-file", action="append", default=[], metavar="[NAME=]PATH",
                        help="use this existing key; NAME= makes it the key of the layers whose "
                             "`key` is NAME (repeatable)")
    parser.add_argument("--tcrypt-keyfile", action="append", default=[], metavar="[NAME=]PATH",
                        help="a TrueCrypt/VeraCrypt keyfile for key name NAME, used besides "
                             "its passphrase (repeatable; alone: a keyfile-only volume)")
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
    parser.add_argument("--bind-serial", action="append", default=[], metavar="SERIAL",
                        help="USB serial of the stick (with --shares: once per --output, in "
                             "the same order)")
    parser.add_argument("--bind-fs-uuid", action="append", default=[], metavar="UUID",
                        help="filesystem UUID of the stick (with --shares: as --bind-serial)")
    parser.add_argument("--shares", type=int, metavar="N",
                        help="write N share bundles, one per --output, of which any "
                             "--threshold open the volume")
    parser.add_argument("--threshold", type=int, metavar="K",
                        help="how many of the --shares sticks it takes (2 to N)")
    parser.add_argument("--generation", type=int, metavar="N",
                        help="key generation (default: one above the last known)")
    parser.add_argument("--volume-uuid", metavar="UUID", help="LUKS/md/fs UUID of the volume")
    parser.add_argument("--bundle-id", metavar="ID", help="default: a random UUID")
    parser.add_argument("--device", metavar="DEV",
                        help="also add the key to a LUKS keyslot of DEV (existing key on stdin)")
    parser.add_argument("--iter-time", type=int, metavar="MS",
                        help="PBKDF time for the new keyslot (cryptsetup --iter-time)")
    parser.set_defaults(func=lambda args: enroll_main(args, None, sys.stdout))


def enroll_main(args: argparse.Namespace, stdin: BinaryIO | None, out: TextIO) -> int:
    """keydctl enroll: write the bundle (and, with --device, add the LUKS keyslot first).

    ``stdin`` (default: the process's) is read only with --device, for the existing key.
    """
    settings = settings_from_args(args)
    now = datetime.now(UTC)
    requests = _requests(args, now)
    if args.backup_of is not None:
        return _backup(args, settings, requests[0], now, out)
    with _new_keys(args, settings.limits) as keys:
        if args.device:
            first = _add_keyslot(args, requests[0], _only_key(keys), stdin or sys.stdin.buffer)
            requests = [dataclasses.replace(r, volume_uuid=first.volume_uuid) for r in requests]
        enroller = Enroller(GnuPG(settings.gnupghome), settings.signers)
        last = GenerationStore(settings.state_path).last(args.volume)
        entries = (enroller.enroll_shares(requests, keys, args.threshold, now, last)
                   if args.shares else [enroller.enroll(requests[0], keys, now, last)])
    for entry, request in zip(entries, requests, strict=True):
        _enrolled(out, "enrolled", entry, request.output)
    return 0


def _requests(args: argparse.Namespace, now: datetime) -> list[EnrollRequest]:
    """One request per --output (one stick each), with its binding."""
    count = _stick_count(args)
    for option, values in (("--bind-serial", args.bind_serial),
                           ("--bind-fs-uuid", args.bind_fs_uuid)):
        if len(values) not in (0, count):
            raise UsageError(f"{option} is given {len(values)} times for {count} stick(s)",
                             fix=f"give {option} once per --output, in the same order")
    requests = [EnrollRequest(
        volume=args.volume, signing_key=args.signing_key, output=output,
        not_before=args.not_before or now, generation=args.generation,
        not_after=args.not_after,
        bind_serial=args.bind_serial[index] if args.bind_serial else None,
        bind_fs_uuid=args.bind_fs_uuid[index] if args.bind_fs_uuid else None,
        volume_uuid=args.volume_uuid, encrypt_to=args.encrypt_to, bundle_id=args.bundle_id)
        for index, output in enumerate(args.output)]
    for request in requests:
        _check_request(request)
    return requests


def _stick_count(args: argparse.Namespace) -> int:
    """How many sticks this enrollment writes; the --shares options checked."""
    if args.shares is None:
        if args.threshold is not None or len(args.output) != 1:
            raise UsageError("one --output per enrollment (several only with --shares)"
                             if args.threshold is None else "--threshold goes with --shares",
                             fix="give one --output, or --shares N --threshold K with N "
                                 "--output")
        return 1
    if args.threshold is None or not 2 <= args.threshold <= args.shares <= MAX_SHARES:
        raise UsageError(f"--shares {args.shares} needs --threshold K with 2 <= K <= "
                         f"{args.shares} (at most {MAX_SHARES} shares)",
                         fix="e.g. --shares 3 --threshold 2")
    if len(args.output) != args.shares or args.bundle_id or args.backup_of:
        raise UsageError(f"--shares {args.shares} writes {args.shares} sticks: give --output "
                         f"{args.shares} times (and no --bundle-id or --backup-of)",
                         fix="one --output and one --bind-serial per stick")
    if args.tcrypt_keyfile:
        raise UsageError("k-of-n sticks seal keys, not TrueCrypt keyfiles",
                         fix="enroll the keyfiles in bundles of their own (without --shares)")
    return int(args.shares)


def _backup(args: argparse.Namespace, settings: TrustSettings, request: EnrollRequest,
            now: datetime, out: TextIO) -> int:
    given = [option for option, value in (
        ("--key-file", args.key_file), ("--key-name", args.key_name),
        ("--tcrypt-keyfile", args.tcrypt_keyfile), ("--generate", args.generate),
        ("--generation", args.generation), ("--device", args.device),
        ("--encrypt-to", args.encrypt_to)) if value]
    if given:
        raise UsageError(f"--backup-of copies the primary's keys and generation; {given[0]} "
                         "does not go with it", fix=f"leave out {', '.join(given)}")
    entry = Enroller(GnuPG(settings.gnupghome), settings.signers).backup(
        request, args.backup_of, now)
    _enrolled(out, "backed up", entry, request.output)
    return 0


def _enrolled(out: TextIO, verb: str, entry: KeyEntry, output: Path) -> None:
    files = ", ".join(str(output / "keyd" / secret.file) + (f" (key {secret.name})"
                      if secret.name else "") for secret in entry.files)
    share = (f"share {entry.share.index} of {entry.share.count} ({entry.share.threshold} "
             "needed), " if entry.share else "")
    out.write(f"{verb} volume {entry.volume}: {share}bundle {entry.bundle_id}, generation "
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
    keyfiles: dict[str | None, list[SecretBytes]] = {}
    try:
        if files.default is not None:
            keys[None] = _read_key_file(Path(files.default), limits.key_bytes)
        for name, path in files.by_name.items():
            keys[name] = _read_key_file(Path(path), limits.key_bytes)
        for entry in args.tcrypt_keyfile:
            owner, where = split_named(entry)
            keyfiles.setdefault(owner, []).append(_read_key_file(Path(where), limits.key_bytes))
        given = args.key_file or args.tcrypt_keyfile
        for name in args.key_name or ([] if given else [None]):
            keys[name] = _generated(args.generate, limits)
    except BaseException:
        KeySet(keys, keyfiles).wipe()
        raise
    return KeySet(keys, keyfiles)


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
