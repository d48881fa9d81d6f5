"""The daemon core with fake ports: start-up, sticks, removal, busy locks, backoff, fallback."""

from __future__ import annotations

import copy
from dataclasses import replace

from keyd.daemon.uevents import MemberAdded, StickAdded, StickGone, StickInfo
from keyd.engine.errors import DegradedRefused, DevicesMissing, StorageError
from keyd.errors import KeydError
from keyd.trust.errors import Reason
from keyd.trust.secret import KeySet, SecretBytes
from tests.support.daemon_fakes import (
    GOOD_KEY,
    STICK,
    FakeLoop,
    accepted,
    harness,
    rejected,
    share_reports,
)


def test_start_up_keeps_open_volumes_and_waits_for_keys_for_the_rest() -> None:
    h = harness()
    h.engine.open.add("tank")
    h.daemon.start([])
    assert (h.state("tank"), h.state("work")) == ("unlocked", "waiting-for-key")
    assert h.units.calls == ["start smbd.service", "start keyd-unlocked@tank.target"]
    assert h.engine.calls == []  # nothing re-opened
    assert h.events() == ["reconciled", "daemon-started"]


def test_a_half_open_stack_found_at_start_up_is_rolled_back_and_audited() -> None:
    h = harness()
    h.engine.partial.add("work")
    h.daemon.start([])
    h.loop.run()
    assert h.engine.calls == ["lock work"]
    assert h.state("work") == "waiting-for-key"
    assert "lock-finished" in h.events()


def test_a_conflict_with_nothing_open_is_just_locked() -> None:
    h = harness()
    h.engine.conflict.add("work")
    h.daemon.start([])
    assert h.state("work") == "waiting-for-key" and h.engine.calls == []


def test_coldplugged_stick_unlocks_starts_services_wipes_the_key_and_commits() -> None:
    h = harness()
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "unlocked" and h.state("work") == "waiting-for-key"
    assert h.engine.keys_seen == [GOOD_KEY]
    assert h.units.calls == ["start smbd.service", "start keyd-unlocked@tank.target"]
    assert len(h.daemon.keys) == 0
    assert all(len(secret) == 0 for v in h.sticks.handed_out[0].verdicts  # wiped
               for _, secret in (v.keys.items() if v.keys else []))
    assert h.sticks.committed == [("tank",)]
    assert h.events() == ["stick-inserted", "daemon-started", "bundle-accepted", "unlock-started",
                          "unlock-finished"]
    finished = h.sink.records[-1]
    assert (finished.volume, finished.serial, finished.signer, finished.bundle_id) == \
        ("tank", "4C530001", "A" * 40, "b-1")
    messages = [record.message for record in h.sink.records]
    assert "volume tank: accepted" in messages  # named once, though the verdict names it too
    assert all(message.startswith("volume tank: ") for message in messages[2:])


def test_the_same_stick_reported_twice_is_checked_once() -> None:
    h = harness()
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.daemon.handle_uevent(StickAdded(STICK))
    h.loop.run()
    assert h.sticks.checked == ["/dev/sdc1"]


def test_one_stick_with_keys_for_two_volumes_unlocks_both() -> None:
    h = harness()
    h.sticks.reports.append(accepted("tank", "work"))
    h.daemon.start([STICK])
    h.loop.run()
    assert (h.state("tank"), h.state("work")) == ("unlocked", "unlocked")


def test_a_bundle_for_an_unconfigured_volume_is_refused_and_audited() -> None:
    h = harness()
    h.sticks.reports.append(accepted("nas9"))
    h.daemon.start([STICK])
    h.loop.run()
    refused = [r for r in h.sink.records if r.event == "bundle-rejected"]
    assert [r.reason for r in refused] == ["UNKNOWN_VOLUME"]
    assert "backoff" in h.events()


def test_a_rejected_stick_backs_off_and_is_retried_after_the_delay() -> None:
    h = harness()
    h.sticks.reports += [rejected(), accepted("tank")]
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "waiting-for-key"
    h.daemon.handle_uevent(StickGone("/dev/sdc1"))
    h.daemon.handle_uevent(StickAdded(STICK))  # re-inserted within the backoff
    h.loop.run()
    assert h.sticks.checked == ["/dev/sdc1"]
    assert h.events().count("backoff") == 2
    h.loop.advance(h.daemon.settings.backoff_base)
    assert h.sticks.checked == ["/dev/sdc1", "/dev/sdc1"]
    assert h.state("tank") == "unlocked"


def test_pulling_a_stick_in_backoff_cancels_its_retry() -> None:
    h = harness()
    h.sticks.reports += [rejected(), rejected()]
    h.daemon.start([STICK])
    h.loop.run()
    h.daemon.handle_uevent(StickGone("/dev/sdc1"))
    other = StickInfo("/dev/sdd1", "vfat", "4C530001")
    h.daemon.handle_uevent(StickAdded(other))
    h.daemon.handle_uevent(StickGone("/dev/sdd1"))
    h.loop.advance(3600)
    assert h.sticks.checked == ["/dev/sdc1"]


def test_a_wrong_key_counts_for_the_sticks_backoff() -> None:
    h = harness()
    h.sticks.reports.append(accepted("tank", key=b"wrong"))
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "waiting-for-key"
    assert h.daemon.backoff.failures("4C530001") == 1
    failed = next(r for r in h.sink.records if r.event == "unlock-failed")
    assert (failed.result, failed.reason) == ("key", "WRONG_KEY")
    assert h.sticks.committed == []


def test_pulling_the_stick_locks_after_grace_stopping_services_first() -> None:
    h = harness(lock_on_removal=True, grace=10)
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    h.units.calls.clear()
    h.daemon.handle_uevent(StickGone("/dev/sdc1"))
    h.loop.advance(9)
    assert h.state("tank") == "unlocked"
    h.loop.advance(1)
    assert h.state("tank") == "locked"
    assert h.units.calls == ["stop keyd-unlocked@tank.target", "stop smbd.service"]
    assert h.events()[-4:] == ["stick-removed", "grace-started", "lock-started", "lock-finished"]


def test_policy_off_keeps_the_volume_unlocked_when_the_stick_is_pulled() -> None:
    h = harness(lock_on_removal=False)
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    h.daemon.handle_uevent(StickGone("/dev/sdc1"))
    h.loop.advance(3600)
    assert h.state("tank") == "unlocked" and "lock-started" not in h.events()


def test_a_busy_volume_stays_unlocked_with_a_warning_signal_after_retries() -> None:
    h = harness(lock_retries=1, lock_retry_delay=5)
    h.engine.open.add("tank")
    h.engine.busy += [True, True]
    h.daemon.start([])
    assert h.daemon.request_lock("tank", "dbus") == "locking"
    h.loop.run()
    h.loop.advance(5)
    assert h.state("tank") == "unlocked" and "tank" in h.engine.open
    assert h.engine.calls == ["lock tank", "lock tank"]
    volume, state, detail = h.signals.seen[-1]
    assert (volume, state) == ("tank", "unlocked") and "42 (bash)" in detail
    assert h.daemon.volume_info("tank")["detail"] == detail


def test_missing_members_wait_and_retry_when_a_disk_appears() -> None:
    h = harness()
    h.engine.unlock_errors.append(DegradedRefused("array md0 of tank: 2 of 3 members"))
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "waiting-for-members"
    h.daemon.handle_uevent(MemberAdded("/dev/sdb"))
    h.loop.run()
    assert h.state("tank") == "unlocked" and "degraded" in h.events()


def test_key_timeout_asks_for_the_passphrase_and_uses_it() -> None:
    h = harness(key_timeout=30, passphrase=True, passphrase_timeout=60)
    h.asker.answers.append(GOOD_KEY)
    h.daemon.start([])
    h.loop.advance(30)
    assert ("tank", 60) in h.asker.asked
    assert h.state("tank") == "unlocked"
    assert "key-timeout" in h.events() and "passphrase-fallback" in h.events()


def test_dbus_unlock_and_lock_go_through_the_machine() -> None:
    h = harness()
    h.daemon.start([])

    assert h.daemon.request_unlock("work", KeySet.single(SecretBytes(GOOD_KEY))) == "unlocking"
    h.loop.run()
    assert h.state("work") == "unlocked"
    assert h.daemon.request_lock("work", "dbus") == "locking"
    h.loop.run()
    assert h.state("work") == "locked"


def test_a_refused_unit_is_audited_and_does_not_change_the_state() -> None:
    h = harness()
    h.units.refuse.add("smbd.service")
    h.engine.open.add("tank")
    h.daemon.start([])
    failed = [r for r in h.sink.records if r.event == "services-failed"]
    assert [r.reason for r in failed] == ["smbd.service"] and h.state("tank") == "unlocked"


def test_a_stick_check_that_raises_is_a_refusal_not_a_crash() -> None:
    h = harness()
    h.daemon.start([STICK])  # no scripted report: the fake raises IndexError
    h.loop.run()
    assert [r.reason for r in h.sink.records if r.event == "bundle-rejected"] == \
        ["INTERNAL_ERROR"]


def test_stop_wipes_held_keys_and_cancels_timers() -> None:
    h = harness()
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.work = h.loop.work[:1]
    work, done = h.loop.work.pop()
    done(work())  # the stick was read; the unlock is queued but not run
    assert len(h.daemon.keys) == 1
    h.daemon.stop()
    assert len(h.daemon.keys) == 0 and h.loop.timers == {}


def test_stick_refusal_reason_is_audited_with_its_code() -> None:
    h = harness()
    h.sticks.reports.append(rejected(Reason.REPLAYED_GENERATION))
    h.daemon.start([STICK])
    h.loop.run()
    assert [r.reason for r in h.sink.records if r.event == "bundle-rejected"] == \
        ["REPLAYED_GENERATION"]


def test_fake_loop_fires_timers_in_order() -> None:
    loop, fired = FakeLoop(), []
    loop.call_later(2, lambda: fired.append(2))
    loop.call_later(1, lambda: fired.append(1))
    loop.advance(3)
    assert fired == [1, 2]


def test_ready_waits_for_coldplugged_sticks_and_their_unlocks() -> None:
    h = harness()
    ready: list[bool] = []
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK], on_settled=lambda: ready.append(True))
    assert ready == []
    work, done = h.loop.work.pop(0)
    done(work())  # stick verified: the unlock is running now
    assert ready == [] and h.state("tank") == "unlocking"
    h.loop.run()
    assert ready == [True]


def test_ready_is_immediate_without_sticks() -> None:
    h = harness()
    ready: list[bool] = []
    h.daemon.start([], on_settled=lambda: ready.append(True))
    assert ready == [True]


def test_a_device_not_present_yet_waits_like_missing_members() -> None:
    h = harness()
    h.engine.unlock_errors.append(DevicesMissing(
        "cannot unlock volume tank: layer crypt0: device /dev/sdb is not present"))
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "waiting-for-members"
    h.daemon.handle_uevent(MemberAdded("/dev/sdb"))
    h.loop.run()
    assert h.state("tank") == "unlocked"


def test_other_storage_errors_fail_with_their_code() -> None:
    h = harness()
    h.engine.unlock_errors.append(StorageError("mountpoint /srv/tank is used by another mount"))
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "failed"
    assert [r.reason for r in h.sink.records if r.event == "unlock-failed"] == ["STORAGE_ERROR"]


def test_a_late_mirror_side_is_brought_back_with_the_key_of_the_stick_still_in() -> None:
    h = harness()
    h.engine.late.add("tank")
    h.sticks.reports += [accepted("tank"), accepted("tank")]
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "unlocked" and h.engine.degraded == {"tank"}
    assert len(h.daemon.keys) == 0  # no key is kept for later

    h.engine.late.discard("tank")
    h.daemon.handle_uevent(MemberAdded("/dev/sdd"))
    h.loop.run()

    assert h.sticks.checked == [STICK.devnode, STICK.devnode]  # read again for the side's key
    assert h.engine.calls[-2:] == ["mend tank", "mend tank"]  # key-less first, then with it
    assert h.engine.degraded == set() and h.state("tank") == "unlocked"
    mended = h.sink.records[-1]
    assert (mended.event, mended.result, mended.message) == (
        "mended", "mended", "volume tank: brought back: side is back in the pool")
    assert len(h.daemon.keys) == 0


def test_a_wrong_key_on_a_newer_stick_does_not_stop_the_mend_with_a_right_one() -> None:
    h = harness()
    h.engine.late.add("tank")
    h.sticks.reports += [accepted("tank")]
    h.daemon.start([STICK])
    h.loop.run()
    # While a (busy) lock runs, another stick goes in and the side's disk comes back.
    h.engine.held.add("tank")
    h.daemon.request_lock("tank", "keydctl lock")
    h.sticks.reports += [accepted("tank", key=b"wrong key"), accepted("tank")]
    h.daemon.handle_uevent(StickAdded(StickInfo("/dev/sde1", "vfat", "SERIAL3")))
    h.engine.late.discard("tank")
    h.daemon.handle_uevent(MemberAdded("/dev/sdd"))
    h.loop.run()
    # The newer stick replaced the lock; its key is wrong for the side, so the stick still
    # in from before is read again, and its key brings the side back.
    assert h.engine.degraded == set() and h.state("tank") == "unlocked"
    assert [r.result for r in h.sink.records if r.event == "mended"] == ["mend-failed",
                                                                         "mended"]
    assert len(h.daemon.keys) == 0


def test_a_wrong_request_key_does_not_stop_the_mend_with_the_stick_still_in() -> None:
    h = harness()
    h.engine.late.add("tank")
    h.sticks.reports += [accepted("tank")]
    h.daemon.start([STICK])
    h.loop.run()
    # Two requests with a wrong key: one runs when the side's disk comes back, the next
    # starts after it and is tried on the side that is back now.
    for _ in range(2):
        h.daemon.request_unlock("tank", KeySet.single(SecretBytes(b"not the key")), "uid 0")
    h.engine.late.discard("tank")
    h.daemon.handle_uevent(MemberAdded("/dev/sdd"))
    h.sticks.reports += [accepted("tank")]
    h.loop.run()
    assert h.engine.degraded == set() and h.state("tank") == "unlocked"
    assert len(h.daemon.keys) == 0


def test_a_degraded_volume_without_a_stick_tries_only_key_less_sides() -> None:
    h = harness()
    h.engine.late.add("tank")
    h.daemon.start([])
    h.daemon.request_unlock("tank", KeySet.single(SecretBytes(GOOD_KEY)), "uid 0")
    h.loop.run()
    h.engine.late.discard("tank")
    h.daemon.handle_uevent(MemberAdded("/dev/sdd"))
    h.loop.run()
    assert h.engine.calls[-1] == "mend tank" and h.engine.degraded == {"tank"}
    assert "mended" not in h.events()


def test_a_wrong_request_key_does_not_cancel_a_newer_request() -> None:
    # On an open, degraded volume a request's key is tried on the late side: a wrong one
    # fails there, and must not take the newer (right) request's hold with it.
    h = harness(lock_on_removal=True, grace=5.0)
    h.engine.late.add("tank")
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    h.engine.late.discard("tank")
    h.daemon.handle_uevent(StickGone(STICK.devnode))
    h.daemon.request_unlock("tank", KeySet.single(SecretBytes(b"not the key")), "uid 0")
    h.daemon.request_unlock("tank", KeySet.single(SecretBytes(GOOD_KEY)), "uid 0")
    h.loop.run()
    h.loop.advance(10.0)
    h.loop.run()
    assert "tank" in h.engine.open and h.engine.degraded == set()
    assert "lock-started" not in h.events()


def test_a_generation_that_cannot_be_recorded_is_audited_and_the_volume_still_opens() -> None:
    h = harness()
    h.sticks.commit_error = KeydError("cannot write /var/lib/keyd/generations.json: Read-only "
                                      "file system")
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    assert h.state("tank") == "unlocked"
    record = next(r for r in h.sink.records if r.event == "state-not-saved")
    assert record.volume == "tank" and record.priority == 4  # a warning
    assert "Read-only file system" in record.message and "retired sticks" in record.message


def stick(n: int) -> StickInfo:
    return StickInfo(f"/dev/sd{'xyz'[n]}1", "vfat", f"SHARESTICK{n}")


def test_two_of_three_share_sticks_unlock_and_one_says_how_many_more() -> None:
    h = harness()
    h.daemon.start([])
    first, second, _ = share_reports("tank")
    h.sticks.reports += [first]
    h.daemon.handle_uevent(StickAdded(stick(0)))
    h.loop.run()
    assert h.state("tank") == "waiting-for-key" and h.engine.calls == []
    assert h.daemon.shown["tank"][1] == "waiting for 1 more stick (1 of 2 shares)"
    accepted_share = h.sink.records[-1]
    assert (accepted_share.event, accepted_share.reason) == ("share-accepted", "1 of 2")
    h.sticks.reports += [second]
    h.daemon.handle_uevent(StickAdded(stick(1)))
    h.loop.run()
    assert h.state("tank") == "unlocked" and h.engine.keys_seen == [GOOD_KEY]
    trail = h.events()
    assert trail.index("share-accepted") < trail.index("shares-combined") \
        < trail.index("unlock-started") < trail.index("unlock-finished"), trail
    assert h.sticks.committed == [("tank",)]
    assert len(h.daemon.keys) == 0 and h.daemon.shares.waiting("tank") is None


def test_the_same_share_twice_counts_once_and_other_enrollments_never_combine() -> None:
    h = harness()
    h.daemon.start([])
    mine, theirs = share_reports("tank"), share_reports("tank", set_id="set-2")
    h.sticks.reports += [copy.deepcopy(mine[0]), mine[0], theirs[1]]  # a stick read twice
    for n in range(3):
        h.daemon.handle_uevent(StickAdded(stick(n)))
        h.loop.run()
        h.daemon.handle_uevent(StickGone(stick(n).devnode))
    assert h.engine.calls == [] and h.state("tank") != "unlocked"
    assert h.daemon.shares.waiting("tank") == (1, 2)


def test_shares_expire_after_share_timeout() -> None:
    h = harness(share_timeout=60.0)
    h.daemon.start([])
    h.sticks.reports += [share_reports("tank")[0]]
    h.daemon.handle_uevent(StickAdded(stick(0)))
    h.loop.run()
    h.loop.advance(61)
    assert h.daemon.shares.waiting("tank") is None
    assert "shares-expired" in h.events()
    assert not h.daemon.shown["tank"][1].startswith("waiting for")


def test_learned_revocations_near_their_cap_are_a_warning_in_the_audit() -> None:
    h = harness()
    h.sticks.commit_warning = "/var/lib/keyd/revoked-learned.toml holds 60000 bundle_ids"
    h.sticks.reports.append(accepted("tank"))
    h.daemon.start([STICK])
    h.loop.run()
    record = next(r for r in h.sink.records if r.event == "revocations-near-cap")
    assert record.priority == 4 and "holds 60000 bundle_ids" in record.message


def test_shutdown_locks_every_open_volume_once_and_opens_nothing_after() -> None:
    h = harness()
    h.engine.open.add("tank")
    h.daemon.start([])
    h.units.calls.clear()

    assert h.daemon.request_shutdown("system shutdown") == ["tank"]  # work is locked already
    h.loop.run()
    assert h.state("tank") == "locked" and h.engine.calls == ["lock tank (quiesce)"]
    assert h.units.calls == ["stop keyd-unlocked@tank.target", "stop smbd.service"]
    assert h.events()[-2:] == ["lock-started", "lock-finished"]

    # A stick, a request or a passphrase now opens nothing, and no service starts.
    h.sticks.reports.append(accepted("tank"))
    h.daemon.handle_uevent(StickAdded(STICK))
    assert h.daemon.request_unlock("work", KeySet.single(SecretBytes(GOOD_KEY))) == "locked"
    h.loop.advance(3600)
    assert h.state("tank") == "locked" and h.state("work") == "locked"
    assert not [call for call in h.engine.calls if call.startswith("unlock")]
    assert not [call for call in h.units.calls if call.startswith("start")]
    assert len(h.daemon.keys) == 0


def test_a_busy_volume_at_shutdown_is_flushed_and_left_open_at_once_with_its_holders() -> None:
    h = harness(lock_retries=3, lock_retry_delay=5)
    h.engine.open.add("tank")
    h.engine.busy.append(True)
    h.daemon.start([])
    h.units.calls.clear()

    h.daemon.request_shutdown("system shutdown")
    h.loop.run()
    h.loop.advance(60)
    assert h.engine.calls == ["lock tank (quiesce)"]  # no retries: nothing to wait for
    assert h.state("tank") == "unlocked" and "tank" in h.engine.open
    [busy] = [r for r in h.sink.records if r.event.value == "lock-busy"]
    assert busy.message == ("volume tank: busy at shutdown, left open: 42 (bash): cwd in "
                            "/srv/tank; /srv/tank: synced, still read-write")
    assert busy.result == "left-open"
    assert not [call for call in h.units.calls if call.startswith("start")]  # no services back


def test_the_root_file_systems_volume_is_not_locked_at_shutdown() -> None:
    h = harness()
    h.engine.open |= {"tank", "work"}
    h.daemon.volumes["work"] = replace(h.daemon.volumes["work"], boot="root")
    h.daemon.start([])
    assert h.daemon.request_shutdown("system shutdown") == ["tank"]
    h.loop.run()
    assert h.state("work") == "unlocked" and "work" in h.engine.open
    assert "lock work (quiesce)" not in h.engine.calls
