"""Pure parsing of gpg's ``[GNUPG:]`` status lines and keyd's trust decision.

gpg's own verdict (exit code, web of trust) is not used: gpg exits 0 for a
signature by an expired or revoked key. keyd accepts a signature only when
every signature group (from one ``NEWSIG`` to the next) has a ``GOODSIG`` and
a ``VALIDSIG`` whose *primary-key* fingerprint (VALIDSIG's tenth field) is
pinned in ``signers``, made with a hash of the SHA-2 family (VALIDSIG's eighth
field: gpg still verifies SHA-1 signatures, and SHA-1 collisions are practical),
and no group carries a refusing status. The strings come from gpg's doc/DETAILS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from keyd.fingerprint import normalize_fingerprint
from keyd.trust.errors import Reason, SignatureRejected

PREFIX = "[GNUPG:] "
_KEYWORD = re.compile(r"[A-Z][A-Z0-9_]*\Z")
# VALIDSIG <fpr> <date> <ts> <expire> <ver> <reserved> <pkalgo> <hashalgo> <class> <primary-fpr>
_VALIDSIG_PRIMARY = 9
_VALIDSIG_HASH = 7
# OpenPGP hash algorithm ids (RFC 4880, 9.4); keyd accepts the SHA-2 family only.
_HASH_NAMES = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160", "8": "SHA256", "9": "SHA384",
               "10": "SHA512", "11": "SHA224"}
STRONG_HASHES = frozenset({"8", "9", "10", "11"})

# Checked in this order, so the most specific reason wins when gpg emits several.
_REFUSALS: tuple[tuple[str, Reason, str], ...] = (
    ("BADSIG", Reason.BAD_SIGNATURE, "the signature does not match the manifest"),
    ("NO_PUBKEY", Reason.NO_PUBKEY, "the signing key is not in keyd's GnuPG home"),
    ("ERRSIG", Reason.SIGNATURE_ERROR, "gpg could not check the signature"),
    ("REVKEYSIG", Reason.REVOKED_SIGNER, "the signing key is revoked"),
    ("KEYREVOKED", Reason.REVOKED_SIGNER, "the signing key is revoked"),
    ("EXPKEYSIG", Reason.EXPIRED_SIGNER, "the signing key has expired"),
    ("KEYEXPIRED", Reason.EXPIRED_SIGNER, "the signing key has expired"),
    ("EXPSIG", Reason.EXPIRED_SIGNATURE, "the signature has expired"),
    ("SIGEXPIRED", Reason.EXPIRED_SIGNATURE, "the signature has expired"),
)


@dataclass(frozen=True)
class StatusLine:
    """One ``[GNUPG:] KEYWORD args...`` line, split on spaces."""

    keyword: str
    args: tuple[str, ...]


def parse_status(text: str) -> tuple[StatusLine, ...]:
    """Parse gpg status output; lines without the ``[GNUPG:]`` prefix are ignored.

    A prefixed line whose keyword is not an upper-case token is refused with
    MALFORMED_STATUS: keyd does not guess at output it does not understand.
    """
    lines: list[StatusLine] = []
    for raw in text.splitlines():
        if not raw.startswith(PREFIX):
            continue
        fields = raw[len(PREFIX):].split(" ")
        if not _KEYWORD.match(fields[0]):
            raise SignatureRejected(Reason.MALFORMED_STATUS,
                                    f"unexpected gpg status line {raw[:80]!r}")
        lines.append(StatusLine(fields[0], tuple(fields[1:])))
    return tuple(lines)


def _groups(lines: Sequence[StatusLine]) -> list[list[StatusLine]]:
    # Lines before the first NEWSIG belong to the first signature.
    groups: list[list[StatusLine]] = [[]]
    for line in lines:
        if line.keyword == "NEWSIG" and any(g.keyword == "NEWSIG" for g in groups[-1]):
            groups.append([])
        groups[-1].append(line)
    return groups


def _refusal(group: Iterable[StatusLine]) -> SignatureRejected | None:
    keywords = {line.keyword for line in group}
    for keyword, reason, text in _REFUSALS:
        if keyword in keywords:
            return SignatureRejected(reason, f"{text} (gpg status {keyword})")
    return None


def _primary(group: Sequence[StatusLine]) -> str:
    valid = [line for line in group if line.keyword == "VALIDSIG"]
    if not valid or not any(line.keyword == "GOODSIG" for line in group):
        raise SignatureRejected(Reason.BAD_SIGNATURE, "gpg found no good signature")
    if len(valid) != 1 or len(valid[0].args) <= _VALIDSIG_PRIMARY:
        raise SignatureRejected(Reason.MALFORMED_STATUS,
                                "gpg's VALIDSIG line lacks the primary-key fingerprint")
    primary = normalize_fingerprint(valid[0].args[_VALIDSIG_PRIMARY])
    if primary is None:
        raise SignatureRejected(Reason.MALFORMED_STATUS,
                                "gpg's VALIDSIG primary-key fingerprint is not hexadecimal")
    algo = valid[0].args[_VALIDSIG_HASH]
    if algo not in STRONG_HASHES:
        name = _HASH_NAMES.get(algo, f"hash algorithm {algo}")
        raise SignatureRejected(Reason.WEAK_SIGNATURE_HASH,
                                f"the manifest is signed with {name}, which keyd does not accept",
                                fix="sign again with SHA-256 or stronger (`keydctl enroll` does; "
                                    "by hand: gpg --digest-algo SHA512)")
    return primary


def decide(lines: Sequence[StatusLine], signers: Iterable[str]) -> str:
    """Return the pinned primary fingerprint that signed, or raise SignatureRejected.

    Every signature present must be good and by a pinned signer; one bad,
    expired, revoked or unknown signature refuses the whole manifest.
    """
    pinned = {fpr for fpr in (normalize_fingerprint(s) for s in signers) if fpr}
    if not any(line.keyword in ("NEWSIG", "VALIDSIG") for line in lines):
        raise SignatureRejected(Reason.BAD_SIGNATURE, "gpg found no signature")
    accepted: list[str] = []
    for group in _groups(lines):
        refusal = _refusal(group)
        if refusal is not None:
            raise refusal
        primary = _primary(group)
        if primary not in pinned:
            raise SignatureRejected(Reason.UNKNOWN_SIGNER,
                                    f"signed by {primary}, which is not in [trust] signers",
                                    fix="add the fingerprint to [trust] signers if you trust it")
        accepted.append(primary)
    return accepted[0]


def judge_output(status_text: str, returncode: int, signers: Iterable[str]) -> str:
    """Decide on raw gpg status output; a failing exit with no other cause is BAD_SIGNATURE."""
    signer = decide(parse_status(status_text), signers)
    if returncode != 0:
        raise SignatureRejected(Reason.BAD_SIGNATURE, f"gpg exited {returncode}")
    return signer
