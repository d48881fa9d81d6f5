"""Per-stick backoff (injected clock values); the policy keys are tested in tests/unit/config."""

from __future__ import annotations

from keyd.daemon.backoff import Backoff


def test_backoff_doubles_per_failure_up_to_the_cap() -> None:
    book = Backoff(base=2, maximum=20)
    assert [book.delay(n) for n in range(7)] == [0, 2, 4, 8, 16, 20, 20]


def test_a_failed_stick_waits_and_others_do_not() -> None:
    book = Backoff(base=2, maximum=600).failed("S1", now=100.0).failed("S1", now=103.0)
    assert book.failures("S1") == 2
    assert book.wait("S1", now=103.0) == 4.0
    assert book.wait("S1", now=105.5) == 1.5
    assert book.wait("S1", now=200.0) == 0.0
    assert book.wait("S2", now=103.0) == 0.0


def test_success_forgets_the_failures() -> None:
    book = Backoff().failed("S1", 0.0).failed("S2", 0.0).succeeded("S1")
    assert (book.failures("S1"), book.wait("S1", 0.0), book.failures("S2")) == (0, 0.0, 1)


def test_huge_failure_counts_do_not_overflow() -> None:
    assert Backoff(base=1, maximum=60).delay(10_000) == 60
