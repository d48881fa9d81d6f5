"""k-of-n: any k shares give the master back, and only the right master opens the sealed keys."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.trust.errors import BundleRejected, Reason
from keyd.trust.secret import KeySet, SecretBytes
from keyd.trust.shares import ShareSet, combine, new_master, seal, split, unseal

SPLIT = ShareSet("vault", "set-1", 3, threshold=2, count=3)


def keys() -> KeySet:
    return KeySet({"k1": SecretBytes(b"first passphrase"), None: SecretBytes(b"\x00raw\xff")})


def opened(keyset: KeySet) -> dict[str | None, bytes]:
    return {name: bytes(secret.buffer) for name, secret in keyset.items()}


@settings(max_examples=30, deadline=None)
@given(threshold=st.integers(2, 5), extra=st.integers(0, 3), data=st.data())
def test_any_threshold_shares_give_the_master_back(threshold: int, extra: int,
                                                  data: st.DataObject) -> None:
    master = new_master()
    pieces = split(master, threshold, threshold + extra)
    chosen = data.draw(st.permutations(pieces)).copy()[:threshold]
    assert bytes(combine(chosen).buffer) == bytes(master.buffer)
    fewer = [*chosen[:threshold - 1], (chosen[-1][0], bytes(16))]  # one share forged
    assert bytes(combine(fewer).buffer) != bytes(master.buffer)


def test_sealed_keys_open_with_any_two_of_three_shares() -> None:
    master = new_master()
    pieces = split(master, 2, 3)
    sealed = seal(master, SPLIT, keys())
    for pair in itertools.combinations(pieces, 2):
        assert opened(unseal(combine(list(pair)), SPLIT, sealed)) == opened(keys())


@pytest.mark.parametrize("other", [replace(SPLIT, volume="tank"), replace(SPLIT, set_id="set-2"),
                                   replace(SPLIT, generation=4)])
def test_a_master_of_another_volume_set_or_generation_opens_nothing(other: ShareSet) -> None:
    master = new_master()
    sealed = seal(master, SPLIT, keys())
    with pytest.raises(BundleRejected) as caught:
        unseal(master, other, sealed)
    assert caught.value.reason is Reason.SHARES_DO_NOT_COMBINE


def test_shares_of_two_enrollments_never_combine_into_either() -> None:
    first, second = new_master(), new_master()
    sealed = seal(first, SPLIT, keys())
    mixed = [split(first, 2, 3)[0], split(second, 2, 3)[1]]
    with pytest.raises(BundleRejected):
        unseal(combine(mixed), SPLIT, sealed)


def test_a_key_sealed_for_one_name_does_not_open_as_another() -> None:
    master = new_master()
    sealed = seal(master, SPLIT, keys())
    with pytest.raises(BundleRejected):
        unseal(master, SPLIT, {"k2": sealed["k1"]})


@pytest.mark.parametrize(("threshold", "count"), [(1, 3), (4, 3), (2, 17)])
def test_impossible_splits_are_refused(threshold: int, count: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        split(new_master(), threshold, count)
