"""keyd's real-kernel lab: a Debian NAS in QEMU, with disks, USB sticks and a command channel.

Nothing in the daemon's import graph imports this package; it is for tests,
benchmarks, ``make demo`` and admins trying a config before trusting real disks.
"""
