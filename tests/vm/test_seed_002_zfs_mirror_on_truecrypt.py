"""Seed 002 on a real kernel: a ZFS mirror on two TrueCrypt volumes, and a pool on 4K-sector LUKS.

The volumes are made as the seed's author made them: tcplay creates two raw
TrueCrypt volumes with passphrases of their own, `zpool create -o ashift=9 ...
mirror` joins their mappings, checksummed data is written, the pool is exported
and the mappings closed. keyd is driven through keydctl in the guest (direct
mode, the passphrases read from one plain stick) and as keyd.service (the
passphrase fallback asking per key name, keydctl unlock with a key file per
name, and a signed stick carrying both passphrases); results are read from the
kernel (zpool, dmsetup, sha256).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.runner import SubprocessRunner
from keyd_lab.daemon_setup import (
    GUEST_BIN,
    Signer,
    audit_records,
    config_toml,
    cursor,
    events,
    install_keyd,
    journal_text,
    make_stick,
    start_keyd,
    stop_keyd,
    wait_state,
    wait_until,
)
from keyd_lab.media import StickSpec, build_stick
from tests.configs import LUKS, seed_002, zfs_on_crypt

from .conftest import GuestLab
from .fixtures.keydctl import RUN_DIR, Kernel, Keydctl, tcplay
from .fixtures.zfs import export_all, pools, vdevs
from .guest.daemon_lab import answer_question, asked

POOL, POOL4K = "secretpool", "pool4k"
PASSPHRASES = {"k1": "first TrueCrypt volume 2017", "k2": "second TrueCrypt volume 2017"}
STICK = "/mnt/t/stick"


def config(disk1: str, disk2: str, degraded: str) -> str:
    """Volume secret: the seed's mirror, one passphrase per TrueCrypt volume (keys k1 and k2)."""
    return seed_002(disk1, disk2, volume="secret", keys=("k1", "k2"), degraded=degraded,
                    description="seed 002: ZFS mirror on two TrueCrypt volumes")


@pytest.fixture
def zfs(guest: GuestLab) -> Iterator[GuestLab]:
    """The zfs module loaded; the test's pools exported afterwards, even on failure."""
    guest.check(["modprobe", "zfs"], timeout=120)
    yield guest
    export_all(guest, [POOL, POOL4K])


def make_seed_pool(guest: GuestLab) -> tuple[str, str, str]:
    """Two raw TrueCrypt volumes, a checksummed mirror over them; returns disks and checksums."""
    disks = (guest.disk("ZMIRROR1", 128), guest.disk("ZMIRROR2", 128))
    for disk, (name, passphrase) in zip(disks, PASSPHRASES.items(), strict=True):
        tcplay(guest, passphrase, "-c", "-d", disk, "-z", "-w", "-a", "RIPEMD160",
               "-b", "AES-256-XTS")
        tcplay(guest, passphrase, "-m", f"tcsetup_{name}", "-d", disk)
    guest.check(["zpool", "create", "-f", "-o", "ashift=9", "-O", "compression=off",
                 "-O", "checksum=sha256", "-O", f"mountpoint=/mnt/t/{POOL}", POOL, "mirror",
                 "/dev/mapper/tcsetup_k1", "/dev/mapper/tcsetup_k2"], timeout=120)
    guest.check(["zfs", "create", f"{POOL}/data"], timeout=60)
    sums = Kernel(guest).write_files(f"/mnt/t/{POOL}/data")
    return disks[0], disks[1], sums


def close_setup(guest: GuestLab) -> None:
    """Export the pool and close tcplay's mappings, as the seed does before unplugging."""
    guest.check(["zpool", "export", POOL], timeout=120)
    for name in PASSPHRASES:
        guest.check(["tcplay", "-u", f"tcsetup_{name}"])


def plug_key_stick(guest: GuestLab, tmp_path: Path) -> None:
    """One stick carrying both passphrases, mounted read-only at /mnt/t/stick."""
    files = {name: (text + "\n").encode() for name, text in PASSPHRASES.items()}
    image = build_stick(SubprocessRunner(), tmp_path / "keys.img", label="KEYS", files=files)
    device = guest.plug(StickSpec(image, "ZFSKEYS"))
    guest.sh(f"mkdir -p {STICK} && mount -o ro {device} {STICK}")


def key_args(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--key-file", f"{name}={STICK}/{name}")]


def test_seed002_mirror_unlocks_locks_and_degrades_by_policy(
        zfs: GuestLab, tmp_path: Path) -> None:
    guest, kernel = zfs, Kernel(zfs)
    disk1, disk2, sums = make_seed_pool(guest)
    never = Keydctl(guest, "/etc/keyd/seed002.toml").write_config(config(disk1, disk2, "never"))
    # While the setup's own mappings carry the pool, it is not keyd's: never exported, and the
    # unlock refuses before opening anything.
    assert never.ok("lock", "secret").stdout.strip() == "volume secret already locked"
    assert pools(guest) == {POOL: "ONLINE"}
    pool_layer = never.status("secret")["by_name"]["pool"]
    assert pool_layer["state"] == "conflict" and "not this layer's mappings: " \
        "/dev/mapper/tcsetup_k1, /dev/mapper/tcsetup_k2" in pool_layer["problem"], pool_layer
    foreign = never("unlock", "secret", "--key-file", "/dev/null")
    assert foreign.rc == 1 and "which keyd did not create" in foreign.stderr, foreign
    assert kernel.dm() == ["tcsetup_k1", "tcsetup_k2"]
    close_setup(guest)
    plug_key_stick(guest, tmp_path)

    opened = never("unlock", "secret", *key_args("k1", "k2"))

    assert opened.rc == 0, opened
    assert pools(guest) == {POOL: "ONLINE"}
    assert vdevs(guest, POOL) == ["/dev/mapper/keyd-secret-tc1", "/dev/mapper/keyd-secret-tc2"]
    assert kernel.checksums(f"/mnt/t/{POOL}/data") == sums
    assert guest.check(["cat", f"{RUN_DIR}/zfs/secret.pool"]).stdout.strip() == \
        guest.check(["zpool", "get", "-H", "-p", "-o", "value", "guid", POOL]).stdout.strip()
    guest.check(["zpool", "scrub", "-w", POOL], timeout=300)
    layer = never.status("secret")["by_name"]["pool"]
    assert (layer["state"], layer["degraded"], layer["pool"]["health"]) == ("open", False, "ONLINE")
    assert [(v["layer"], v["state"]) for v in layer["pool"]["vdevs"]] == \
        [("tc1", "ONLINE"), ("tc2", "ONLINE")]
    assert layer["pool"]["scan"].startswith("scrub repaired 0B") and "with 0 errors" in \
        layer["pool"]["scan"], layer
    table = never.ok("status", "secret").stdout
    assert "pool secretpool ONLINE, last scan: scrub repaired" in table, table

    # A shell inside a dataset keeps the pool busy: the lock names it and changes nothing.
    pid = guest.sh(f"cd /mnt/t/{POOL}/data && (setsid sleep 600 </dev/null >/dev/null 2>&1 &"
                   " echo $!)").strip()
    busy = never("lock", "secret")
    assert busy.rc == 5 and f"pid {pid} (sleep)" in busy.stderr, busy
    assert pools(guest) == {POOL: "ONLINE"}
    guest.check(["kill", pid])
    guest.sh(f"while kill -0 {pid} 2>/dev/null; do sleep 0.2; done")
    locked = never("lock", "secret")
    assert locked.rc == 0 and "volume secret locked" in locked.stdout, locked
    assert pools(guest) == {} and kernel.dm() == []
    assert guest.run(["test", "-e", f"{RUN_DIR}/zfs/secret.pool"]).rc == 1

    # One key only: "never" refuses before anything is opened.
    refused = never("unlock", "secret", *key_args("k1"))
    assert refused.rc == 1 and "degraded policy is never" in refused.stderr, refused
    assert "no key 'k2' was given" in refused.stderr
    assert pools(guest) == {} and kernel.dm() == []

    # "always": the mirror comes up DEGRADED from one side, says so, and serves the data.
    always = Keydctl(guest, "/etc/keyd/seed002-always.toml").write_config(
        config(disk1, disk2, "always"))
    degraded = always("unlock", "secret", *key_args("k1"))
    assert degraded.rc == 0, degraded
    assert "warning: zfs pool secretpool" in degraded.stderr and "DEGRADED (without tc2)" in \
        degraded.stderr, degraded.stderr
    assert pools(guest) == {POOL: "DEGRADED"} and kernel.dm() == ["keyd-secret-tc1"]
    report = always.status("secret")
    assert report["state"] == "unlocked (degraded)", report
    assert report["by_name"]["pool"]["pool"]["health"] == "DEGRADED"
    assert kernel.checksums(f"/mnt/t/{POOL}/data") == sums
    assert always.ok("lock", "secret").rc == 0
    assert pools(guest) == {} and kernel.dm() == []

    # Both keys again: ZFS resilvers the side that missed nothing; the pool is whole.
    assert never.ok("unlock", "secret", *key_args("k1", "k2")).rc == 0
    guest.check(["zpool", "wait", "-t", "resilver", POOL], timeout=300)
    assert pools(guest) == {POOL: "ONLINE"}
    assert kernel.checksums(f"/mnt/t/{POOL}/data") == sums
    assert never.ok("lock", "secret").rc == 0
    assert pools(guest) == {} and kernel.dm() == []


def test_pool_on_luks_on_a_4k_sector_disk_keeps_ashift_12(zfs: GuestLab) -> None:
    guest, kernel = zfs, Kernel(zfs)
    disk = guest.disk("ZLUKS4K", 128, sector_size=4096)
    passphrase = "luks under zfs"
    guest.check(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf",
                 "pbkdf2", "--pbkdf-force-iterations", "1000", disk], input=passphrase,
                timeout=120)
    guest.check(["cryptsetup", "open", disk, "luks4ksetup"], input=passphrase, timeout=120)
    guest.check(["zpool", "create", "-f", "-o", "ashift=12", "-O", f"mountpoint=/mnt/t/{POOL4K}",
                 POOL4K, "/dev/mapper/luks4ksetup"], timeout=120)
    sums = kernel.write_files(f"/mnt/t/{POOL4K}")
    guest.check(["zpool", "export", POOL4K], timeout=120)
    guest.check(["cryptsetup", "close", "luks4ksetup"])
    keydctl = Keydctl(guest, "/etc/keyd/p4k.toml").write_config(
        zfs_on_crypt("p4k", {"luks": disk}, pool=POOL4K, crypt=LUKS))

    opened = keydctl("unlock", "p4k", "--key-file", "-", input=passphrase)

    assert opened.rc == 0, opened
    assert guest.check(["blockdev", "--getss", "/dev/mapper/keyd-p4k-luks"]).stdout.strip() == \
        "4096"
    assert guest.check(["zpool", "get", "-H", "-o", "value", "ashift", POOL4K]).stdout.strip() \
        == "12"
    assert pools(guest) == {POOL4K: "ONLINE"}
    assert vdevs(guest, POOL4K) == ["/dev/mapper/keyd-p4k-luks"]
    assert kernel.checksums(f"/mnt/t/{POOL4K}") == sums
    assert keydctl.ok("lock", "p4k").rc == 0
    assert pools(guest) == {} and kernel.dm() == []


def test_seed002_through_keyd_with_a_passphrase_per_truecrypt_volume(
        zfs: GuestLab, tmp_path: Path, signer: Signer) -> None:
    guest, kernel = zfs, Kernel(zfs)
    disk1, disk2, sums = make_seed_pool(guest)
    close_setup(guest)
    policy = {"key_timeout": 3, "passphrase": True, "passphrase_timeout": 300}
    install_keyd(guest, signer, config_toml(signer, seed_002(
        disk1, disk2, volume="secret", keys=("k1", "k2"), degraded="never", policy=policy)))
    keydctl = str(GUEST_BIN / "keydctl")
    start = cursor(guest)
    try:
        start_keyd(guest)
        # No stick: after key_timeout keyd asks once per key name, each question with its own id.
        for name, passphrase in PASSPHRASES.items():
            assert wait_until(guest, asked(f"keyd:secret:{name}"), 180), \
                journal_text(guest, "keyd.service")
            answer_question(guest, f"keyd:secret:{name}", passphrase.encode())
        assert wait_until(guest, f"findmnt /mnt/t/{POOL}/data", 240), \
            journal_text(guest, "keyd.service")
        assert wait_state(guest, "secret", "unlocked"), journal_text(guest, "keyd.service")
        assert pools(guest) == {POOL: "ONLINE"}
        assert kernel.checksums(f"/mnt/t/{POOL}/data") == sums
        trail = events(audit_records(guest, start, ("passphrase-fallback", "unlock-finished"), "secret"),
                       "secret")
        assert trail.index("passphrase-fallback") < trail.index("unlock-finished"), trail
        assert guest.check([keydctl, "lock", "secret"], timeout=240).stdout.strip() == \
            "volume secret locked (through keyd)"
        assert pools(guest) == {} and kernel.dm() == []

        # keydctl unlock through keyd with a key file per key name.
        for name, passphrase in PASSPHRASES.items():
            guest.check(["sh", "-c", f"cat > /root/{name}.pass"], input=passphrase + "\n")
        opened = guest.check([keydctl, "unlock", "secret", "--key-file", "k1=/root/k1.pass",
                              "--key-file", "k2=/root/k2.pass"], timeout=240)
        assert opened.stdout.strip() == "volume secret unlocked (through keyd)", opened
        assert pools(guest) == {POOL: "ONLINE"}
        assert vdevs(guest, POOL) == ["/dev/mapper/keyd-secret-tc1", "/dev/mapper/keyd-secret-tc2"]
        guest.check([keydctl, "lock", "secret"], timeout=240)
        assert pools(guest) == {} and kernel.dm() == []

        # One signed stick (bundle format 2) with a passphrase per TrueCrypt volume.
        plugged = cursor(guest)
        guest.plug(make_stick(tmp_path, signer, "SEED002KEYS", {"secret": {
            name: (text + "\n").encode() for name, text in PASSPHRASES.items()}}))
        assert wait_until(guest, f"findmnt /mnt/t/{POOL}/data", 240), \
            journal_text(guest, "keyd.service")
        assert wait_state(guest, "secret", "unlocked"), journal_text(guest, "keyd.service")
        assert pools(guest) == {POOL: "ONLINE"} and kernel.checksums(f"/mnt/t/{POOL}/data") == sums
        records = audit_records(guest, plugged, ("bundle-accepted", "unlock-finished"), "secret")
        accepted = next(r for r in records if r["KEYD_EVENT"] == "bundle-accepted")
        assert "keys k1, k2" in accepted["MESSAGE"], accepted
        assert "unlock-failed" not in events(records, "secret")
        guest.check([keydctl, "lock", "secret"], timeout=240)
        assert pools(guest) == {} and kernel.dm() == []
    finally:
        stop_keyd(guest)
