"""keyd.service under stress on a real kernel: SIGKILL mid-unlock, a uevent storm, its figures."""

from __future__ import annotations

from pathlib import Path

from keyd_lab.daemon_setup import (
    Signer,
    audit_records,
    config_toml,
    cursor,
    events,
    install_keyd,
    journal_text,
    make_stick,
    start_keyd,
    volume_key,
    volume_state,
    wait_until,
)

from .conftest import GuestLab
from .guest.daemon_lab import (
    dummy_unit,
    format_volume,
    mappings,
    volume_toml,
)

# Slow enough under TCG that keyd is surely inside cryptsetup when it is killed.
SLOW_PBKDF2_ITERATIONS = 800_000
STORM_ROUNDS = 1000  # losetup attach + detach: 2 block uevents ("change") per round


def fully_unlocked(volume: str) -> str:
    return (f"test -e /dev/mapper/keyd-{volume}-crypt && findmnt /mnt/t/{volume} && "
            f"systemctl is-active keyd-dummy-{volume}.service")


def main_pid(guest: GuestLab) -> int:
    return int(guest.check(["systemctl", "show", "-p", "MainPID", "--value", "keyd.service"])
               .stdout.strip())


def test_sigkill_during_cryptsetup_is_restarted_by_systemd_and_ends_consistent(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    volume, serial = "kilo", "KEYDKILL"
    disk = guest.disk("DISKKILL", 64)
    format_volume(guest, disk, volume_key(volume), iterations=SLOW_PBKDF2_ITERATIONS)
    unit = f"keyd-dummy-{volume}.service"
    install_keyd(guest, signer,
                 config_toml(signer, volume_toml(volume, disk, [unit])) + "\n[daemon]\nbackoff_base = 1\n",
                 {unit: dummy_unit(volume)})
    start_keyd(guest)
    first_pid = main_pid(guest)
    start = cursor(guest)

    guest.plug(make_stick(tmp_path, signer, serial, {volume: volume_key(volume)}))
    assert wait_until(guest, "pgrep -x cryptsetup", 180), journal_text(guest, "keyd.service")
    guest.check(["kill", "-KILL", str(first_pid)])  # keyd only: KillMode=process spares cryptsetup

    assert wait_until(guest, "test \"$(systemctl show -p NRestarts --value keyd.service)\" -ge 1 "
                             "&& systemctl is-active keyd.service", 240), \
        journal_text(guest, "keyd.service")
    assert main_pid(guest) != first_pid
    settled = f"! pgrep -x cryptsetup && ( {fully_unlocked(volume)} || " \
              f"! test -e /dev/mapper/keyd-{volume}-crypt )"
    assert wait_until(guest, settled, 300), journal_text(guest, "keyd.service")
    # The stick is still in: the restarted keyd must end with the volume fully open.
    assert wait_until(guest, fully_unlocked(volume), 300), journal_text(guest, "keyd.service")
    assert volume_state(guest, volume) == "unlocked"
    assert mappings(guest) == [f"keyd-{volume}-crypt"]
    trail = events(audit_records(guest, start, ("daemon-started", "unlock-finished")))
    waited = guest.run(["journalctl", "-b", "-u", "keyd.service", "-q", "-o", "cat", "-g",
                        "left running by the previous keyd"]).stdout.strip()
    print(f"\nSIGKILL mid-unlock: audit trail {trail}\nleftover wait: {waited or 'none needed'}")
    # The restarted keyd audited its start, and the unlock finished after it.
    assert "daemon-started" in trail, trail
    assert "unlock-finished" in trail[trail.index("daemon-started"):], trail


def test_two_sticks_for_two_volumes_are_handled_inside_a_storm_of_loop_uevents(
        guest: GuestLab, tmp_path: Path, signer: Signer, keyd_stopped: None) -> None:
    names = {"echo": "KEYDSTORME", "foxtrot": "KEYDSTORMF"}
    volumes, units = "", {}
    for volume in names:
        disk = guest.disk(f"DISK{volume.upper()}", 64)
        format_volume(guest, disk, volume_key(volume))
        units[f"keyd-dummy-{volume}.service"] = dummy_unit(volume)
        volumes += volume_toml(volume, disk, [f"keyd-dummy-{volume}.service"])
    install_keyd(guest, signer, config_toml(signer, volumes), units)
    start_keyd(guest)
    sticks = {v: make_stick(tmp_path, signer, s, {v: volume_key(v)}) for v, s in names.items()}
    start = cursor(guest)
    # The storm stops early once the test has seen what it is about (both volumes unlocked while
    # it raged): the rounds left would only burn the guest's CPU.
    guest.sh("truncate -s 1M /run/storm.img; rm -f /run/storm.done /run/storm.stop; "
             f"( for i in $(seq {STORM_ROUNDS}); do [ -e /run/storm.stop ] && break; "
             "d=$(losetup -f --show /run/storm.img) && losetup -d $d; done; "
             "echo $i > /run/storm.done ) >/run/storm.log 2>&1 </dev/null &")

    guest.sh("sleep 5")
    guest.plug(sticks["echo"])
    guest.sh("sleep 5")
    guest.plug(sticks["foxtrot"])

    for volume in names:
        assert wait_until(guest, fully_unlocked(volume), 600), journal_text(guest, "keyd.service")
    storm_running_at_unlock = guest.run(["test", "-e", "/run/storm.done"]).rc != 0
    guest.check(["touch", "/run/storm.stop"])
    assert wait_until(guest, "test -e /run/storm.done", 120)
    rounds = guest.check(["cat", "/run/storm.done"]).stdout.strip()
    print(f"\nstorm still running when both volumes were unlocked: {storm_running_at_unlock} "
          f"(round {rounds} of {STORM_ROUNDS})")
    records = audit_records(guest, start, ("unlock-finished",) * len(names))
    for volume, serial in names.items():
        accepted = [r for r in records if r["KEYD_EVENT"] == "bundle-accepted"
                    and r.get("KEYD_VOLUME") == volume]
        assert [r["KEYD_STICK_SERIAL"] for r in accepted] == [serial], accepted
        assert events(records, volume)[-2:] == ["unlock-started", "unlock-finished"] or \
            "unlock-finished" in events(records, volume)
        assert volume_state(guest, volume) == "unlocked"
    lost = guest.run(["journalctl", "-b", "-u", "keyd.service", "-q", "-g", "events were lost"])
    print(f"udev overflow rescans: {len(lost.stdout.splitlines())}")


def test_daemon_figures_ready_time_idle_rss_and_security_score(
        guest: GuestLab, signer: Signer, keyd_stopped: None) -> None:
    install_keyd(guest, signer, config_toml(signer, volume_toml("idle", "/dev/disk/by-id/none")))
    start_keyd(guest)
    show = guest.check(["systemctl", "show", "keyd.service", "-p", "ExecMainStartTimestampMonotonic",
                        "-p", "ActiveEnterTimestampMonotonic", "-p", "MainPID"]).stdout
    props = dict(line.split("=", 1) for line in show.splitlines())
    ready_ms = (int(props["ActiveEnterTimestampMonotonic"])
                - int(props["ExecMainStartTimestampMonotonic"])) / 1000
    guest.sh("sleep 10")
    rss = guest.check(["grep", "VmRSS", f"/proc/{props['MainPID']}/status"]).stdout.split()[1]
    score = guest.run(["systemd-analyze", "security", "--no-pager", "keyd.service"], timeout=120)
    overall = [line for line in score.stdout.splitlines() if "Overall exposure" in line]
    print(f"\nkeyd in the lab (TCG, 1 stick coldplugged and rejected): start -> READY "
          f"{ready_ms:.0f} ms; idle VmRSS {int(rss) / 1024:.1f} MiB; "
          f"systemd-analyze security: {overall}")
    assert overall, score
