"""The gpg status-line parser and trust decision, as tables of real gpg 2.2 output, plus fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyd.fingerprint import normalize_fingerprint
from keyd.trust.errors import Reason, SignatureRejected
from keyd.trust.status import decide, judge_output, parse_status

PRIMARY = "9EFDB299F0E04041D7EEEB40EDE7A9F809657101"
SUBKEY = "1111111111111111111111111111111111111111"
KEYID = "EDE7A9F809657101"


def validsig(signing: str = PRIMARY, primary: str = PRIMARY) -> str:
    return f"[GNUPG:] VALIDSIG {signing} 2026-11-23 1795440101 0 4 0 22 8 00 {primary}"


GOOD = "\n".join([
    "[GNUPG:] NEWSIG",
    f"[GNUPG:] KEY_CONSIDERED {PRIMARY} 0",
    "[GNUPG:] SIG_ID SbkE9QJluu/1J8n/Uvjj1/Z1Fmc 2026-11-23 1795440101",
    f"[GNUPG:] GOODSIG {KEYID} Signer A <a@x>",
    validsig(),
])


def with_line(extra: str, base: str = GOOD) -> str:
    return base + "\n" + extra


@pytest.mark.parametrize(("status", "reason"), [
    (with_line(f"[GNUPG:] BADSIG {KEYID} Signer A <a@x>"), Reason.BAD_SIGNATURE),
    (f"[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG {KEYID} 22 8 00 1795440149 9 {PRIMARY}\n"
     f"[GNUPG:] NO_PUBKEY {KEYID}", Reason.NO_PUBKEY),
    (f"[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG {KEYID} 22 8 00 1795440149 4 {PRIMARY}",
     Reason.SIGNATURE_ERROR),
    (GOOD.replace("GOODSIG", "EXPKEYSIG"), Reason.EXPIRED_SIGNER),
    (with_line("[GNUPG:] KEYEXPIRED 1577923200"), Reason.EXPIRED_SIGNER),
    (GOOD.replace("GOODSIG", "REVKEYSIG"), Reason.REVOKED_SIGNER),
    (with_line("[GNUPG:] KEYREVOKED"), Reason.REVOKED_SIGNER),
    (GOOD.replace("GOODSIG", "EXPSIG"), Reason.EXPIRED_SIGNATURE),
    ("[GNUPG:] NODATA 1\n[GNUPG:] NODATA 2", Reason.BAD_SIGNATURE),
    ("", Reason.BAD_SIGNATURE),
    ("gpg: Good signature from someone\n", Reason.BAD_SIGNATURE),
    ("\n".join(GOOD.splitlines()[:-1]), Reason.BAD_SIGNATURE),  # GOODSIG without VALIDSIG
    (GOOD.replace(f" 00 {PRIMARY}", " 00"), Reason.MALFORMED_STATUS),
    (GOOD.replace(f" 00 {PRIMARY}", " 00 nothex"), Reason.MALFORMED_STATUS),
    (with_line("[GNUPG:] lowercase keyword"), Reason.MALFORMED_STATUS),
])
def test_refusing_status_is_reported_with_its_reason(status: str, reason: Reason) -> None:
    with pytest.raises(SignatureRejected) as caught:
        decide(parse_status(status), [PRIMARY])
    assert caught.value.reason is reason


def test_good_signature_by_pinned_primary_returns_it() -> None:
    assert decide(parse_status(GOOD), [PRIMARY.lower()]) == PRIMARY


def test_subkey_signature_is_judged_by_its_primary_fingerprint() -> None:
    status = GOOD.replace(validsig(), validsig(signing=SUBKEY))
    assert decide(parse_status(status), [PRIMARY]) == PRIMARY
    with pytest.raises(SignatureRejected) as caught:
        decide(parse_status(status), [SUBKEY])
    assert caught.value.reason is Reason.UNKNOWN_SIGNER


def test_signature_by_unpinned_key_is_unknown_signer() -> None:
    with pytest.raises(SignatureRejected) as caught:
        decide(parse_status(GOOD), ["A" * 40])
    assert caught.value.reason is Reason.UNKNOWN_SIGNER


def test_one_bad_signature_among_good_ones_refuses_all() -> None:
    bad = GOOD.replace("GOODSIG", "REVKEYSIG")
    with pytest.raises(SignatureRejected) as caught:
        decide(parse_status(GOOD + "\n" + bad), [PRIMARY])
    assert caught.value.reason is Reason.REVOKED_SIGNER


def test_unpinned_second_signature_refuses_all() -> None:
    other = GOOD.replace(validsig(), validsig(primary="B" * 40))
    with pytest.raises(SignatureRejected) as caught:
        decide(parse_status(GOOD + "\n" + other), [PRIMARY])
    assert caught.value.reason is Reason.UNKNOWN_SIGNER


def test_nonzero_exit_without_other_cause_is_bad_signature() -> None:
    assert judge_output(GOOD, 0, [PRIMARY]) == PRIMARY
    with pytest.raises(SignatureRejected) as caught:
        judge_output(GOOD, 2, [PRIMARY])
    assert caught.value.reason is Reason.BAD_SIGNATURE


def test_lines_without_prefix_are_ignored() -> None:
    lines = parse_status("gpg: [GNUPG:] VALIDSIG fake\n  [GNUPG:] GOODSIG fake\n" + GOOD)
    assert [line.keyword for line in lines] == ["NEWSIG", "KEY_CONSIDERED", "SIG_ID", "GOODSIG",
                                                "VALIDSIG"]


@pytest.mark.parametrize(("text", "expected"), [
    (PRIMARY.lower(), PRIMARY),
    ("9EFD B299 F0E0 4041 D7EE  EB40 EDE7 A9F8 0965 7101", PRIMARY),
    (KEYID, None),
    ("G" * 40, None),
    ("A" * 64, "A" * 64),
    ("9EFDB299F0E0\t4041D7EEEB40EDE7A9F8\n09657101", PRIMARY),
])
def test_fingerprints_are_normalized_or_refused(text: str, expected: str | None) -> None:
    assert normalize_fingerprint(text) == expected


STATUS_WORDS = st.sampled_from(["NEWSIG", "GOODSIG", "VALIDSIG", "BADSIG", "ERRSIG", "NO_PUBKEY",
                                "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "KEYEXPIRED", "KEYREVOKED",
                                "KEY_CONSIDERED", "TRUST_UNDEFINED", "x", ""])
STATUS_LINES = st.lists(st.one_of(
    st.text(),
    st.builds(lambda w, args: " ".join(["[GNUPG:]", w, *args]), STATUS_WORDS,
              st.lists(st.sampled_from([PRIMARY, KEYID, "0", "00", "", "ü"]), max_size=12)),
), max_size=12).map("\n".join)


@given(STATUS_LINES, st.integers(-1, 3))
def test_fuzzed_status_output_is_accepted_only_with_good_pinned_signature(
        text: str, returncode: int) -> None:
    try:
        signer = judge_output(text, returncode, [PRIMARY])
    except SignatureRejected as exc:
        assert isinstance(exc.reason, Reason)
        return
    lines = parse_status(text)
    keywords = {line.keyword for line in lines}
    assert signer == PRIMARY and returncode == 0
    assert {"GOODSIG", "VALIDSIG"} <= keywords
    assert not keywords & {"BADSIG", "ERRSIG", "NO_PUBKEY", "EXPSIG", "EXPKEYSIG", "REVKEYSIG",
                           "KEYEXPIRED", "KEYREVOKED"}


@given(st.text())
def test_any_text_parses_or_raises_a_typed_error(text: str) -> None:
    try:
        lines = parse_status(text)
    except SignatureRejected as exc:
        assert exc.reason is Reason.MALFORMED_STATUS
    else:
        assert all(line.keyword for line in lines)


@pytest.mark.parametrize(("algo", "name"), [("2", "SHA1"), ("1", "MD5"), ("3", "RIPEMD160"),
                                            ("99", "hash algorithm 99")])
def test_a_signature_made_with_a_weak_hash_is_refused(algo: str, name: str) -> None:
    status = GOOD.replace(" 22 8 00 ", f" 22 {algo} 00 ")
    with pytest.raises(SignatureRejected) as caught:
        decide(parse_status(status), [PRIMARY])
    assert caught.value.reason is Reason.WEAK_SIGNATURE_HASH
    assert f"signed with {name}" in str(caught.value)


@pytest.mark.parametrize("algo", ["8", "9", "10", "11"])
def test_sha2_signatures_are_accepted(algo: str) -> None:
    assert decide(parse_status(GOOD.replace(" 22 8 00 ", f" 22 {algo} 00 ")), [PRIMARY]) == \
        PRIMARY
