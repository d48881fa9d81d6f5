"""zpool output parsers as tables, over output of OpenZFS 2.1.

ONLINE and DEGRADED are verbatim ``zpool status -P`` output captured from zfs 2.1.11 in
the lab (tests/vm/test_seed_002_zfs_mirror_on_truecrypt.py, after a scrub, and after an
unlock with one of the two keys). MIXED follows 2.1's printf formats (zpool_main.c) for
cases the lab run did not produce: "cannot open", a log section, a resilver in progress.
"""

from __future__ import annotations

import pytest

from keyd.engine.observed import PoolVdev, ZfsPool
from keyd.engine.zfs_output import join_pools, parse_zpool_list, parse_zpool_status

# The first line as zfs 2.1.11 printed it in the lab; the second with an altroot.
LIST = ("secretpool\t12112915652374083086\tONLINE\t-\n"
        "tank\t2464308567901183139\tDEGRADED\t/mnt/alt\n")

ONLINE = (
    "  pool: secretpool\n state: ONLINE\n  scan: scrub repaired 0B in 00:00:02 with 0 errors on "
    "Mon Nov 23 17:14:19 2026\nconfig:\n\n"
    "\tNAME                             STATE     READ WRITE CKSUM\n"
    "\tsecretpool                       ONLINE       0     0     0\n"
    "\t  mirror-0                       ONLINE       0     0     0\n"
    "\t    /dev/mapper/keyd-secret-tc1  ONLINE       0     0     0\n"
    "\t    /dev/mapper/keyd-secret-tc2  ONLINE       0     0     0\n"
    "\nerrors: No known data errors\n")

DEGRADED = (
    "  pool: secretpool\n state: DEGRADED\nstatus: One or more devices could not be used "
    "because the label is missing or\n\tinvalid.  Sufficient replicas exist for the pool to "
    "continue\n\tfunctioning in a degraded state.\naction: Replace the device using 'zpool "
    "replace'.\n   see: https://openzfs.github.io/openzfs-docs/msg/ZFS-8000-4J\n  scan: scrub "
    "repaired 0B in 00:00:02 with 0 errors on Mon Nov 23 17:14:19 2026\nconfig:\n\n"
    "\tNAME                             STATE     READ WRITE CKSUM\n"
    "\tsecretpool                       DEGRADED     0     0     0\n"
    "\t  mirror-0                       DEGRADED     0     0     0\n"
    "\t    /dev/mapper/keyd-secret-tc1  ONLINE       0     0     0\n"
    "\t    6509745120227696062          UNAVAIL      0     0     0  was "
    "/dev/mapper/keyd-secret-tc2\n\nerrors: No known data errors\n")

MIXED = """\
  pool: tank
 state: DEGRADED
  scan: none requested
config:

\tNAME                                STATE     READ WRITE CKSUM
\ttank                                DEGRADED     0     0     0
\t  mirror-0                          DEGRADED     0     0     0
\t    /dev/mapper/keyd-tank-a         ONLINE       0     0     3
\t    /dev/mapper/keyd-tank-c         UNAVAIL      0     0     0  cannot open
\tlogs
\t  /dev/mapper/keyd-tank-log         ONLINE       0     0     0

errors: No known data errors
"""

RESILVERING = """\
  pool: p
 state: ONLINE
  scan: resilver in progress since Mon Nov 23 16:00:00 2026
\t1.2G scanned at 100M/s, 600M issued at 50M/s, 2G total
\t600M resilvered, 30.00% done, 00:00:28 to go
config:

\tNAME          STATE     READ WRITE CKSUM
\tp             ONLINE       0     0     0
\t  /dev/vdb    ONLINE       0     0     0

errors: No known data errors
"""


def test_zpool_list_lines() -> None:
    assert parse_zpool_list(LIST) == (
        ZfsPool("secretpool", "12112915652374083086", "ONLINE"),
        ZfsPool("tank", "2464308567901183139", "DEGRADED", altroot="/mnt/alt"))


@pytest.mark.parametrize("text", ["", "no pools available\n", "a\tb\tONLINE\t-\n",
                                  "secretpool\t1\tONLINE\n"])
def test_zpool_list_without_pools_or_with_junk(text: str) -> None:
    assert parse_zpool_list(text) == ()


@pytest.mark.parametrize(("text", "name", "state", "scan", "vdevs"), [
    (ONLINE, "secretpool", "ONLINE",
     "scrub repaired 0B in 00:00:02 with 0 errors on Mon Nov 23 17:14:19 2026",
     (PoolVdev("/dev/mapper/keyd-secret-tc1", "ONLINE", "0 0 0"),
      PoolVdev("/dev/mapper/keyd-secret-tc2", "ONLINE", "0 0 0"))),
    (DEGRADED, "secretpool", "DEGRADED",
     "scrub repaired 0B in 00:00:02 with 0 errors on Mon Nov 23 17:14:19 2026",
     (PoolVdev("/dev/mapper/keyd-secret-tc1", "ONLINE", "0 0 0"),
      PoolVdev("/dev/mapper/keyd-secret-tc2", "UNAVAIL", "0 0 0"))),
    (MIXED, "tank", "DEGRADED", "none requested",
     (PoolVdev("/dev/mapper/keyd-tank-a", "ONLINE", "0 0 3"),
      PoolVdev("/dev/mapper/keyd-tank-c", "UNAVAIL", "0 0 0"),
      PoolVdev("/dev/mapper/keyd-tank-log", "ONLINE", "0 0 0"))),
    (RESILVERING, "p", "ONLINE", "resilver in progress since Mon Nov 23 16:00:00 2026",
     (PoolVdev("/dev/vdb", "ONLINE", "0 0 0"),)),
])
def test_zpool_status_blocks(text: str, name: str, state: str, scan: str,
                             vdevs: tuple[PoolVdev, ...]) -> None:
    assert parse_zpool_status(text) == {name: (state, scan, vdevs)}


def test_zpool_status_of_several_pools_and_of_none() -> None:
    both = parse_zpool_status(ONLINE + "\n" + MIXED)
    assert sorted(both) == ["secretpool", "tank"]
    assert parse_zpool_status("no pools available\n") == {}


def test_join_adds_vdevs_and_scan_to_the_listed_pools() -> None:
    pools = join_pools(parse_zpool_list(LIST), parse_zpool_status(ONLINE))
    assert pools[0].vdevs[0].path == "/dev/mapper/keyd-secret-tc1"
    assert pools[0].scan.startswith("scrub repaired 0B")
    assert pools[1] == ZfsPool("tank", "2464308567901183139", "DEGRADED", altroot="/mnt/alt")
