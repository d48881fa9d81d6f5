"""Benchmark, on this host (root, /dev/fuse, loop): the userspace crypt backend as a block device.

Serves a 256 MiB aes-xts-plain64 volume with ``python -m keyd.crypto.serve`` from an image
on tmpfs (so the disk is not what is measured), attaches its FUSE file to a loop device
(``--direct-io=off``, as keyd does) and measures on the loop device with O_DIRECT, one request
at a time (what ``dd bs=1M iflag=direct`` does):

- sequential write and read of the whole volume in 1 MiB requests, each divided by the
  in-process rate of the same SectorCipher (keyd.crypto.ciphers) encrypting or decrypting the
  same amount in 1 MiB calls, measured in the same round: goals reads >= 0.6, writes >= 0.5;
- the sequential read again by two threads reading one half each: what a second request in
  flight gains (the kernel's side of one overlaps the serving process's work on the other);
- random 4 KiB reads per second, next to the in-process rate of 4 KiB decryptions.

The rounds interleave the FUSE and the in-process runs, so a busy machine slows both; the
median of each is printed. No asserts. The volume and loop helpers are the host tier's:

    .venv/bin/python benchmarks/bench_userspace_crypt.py [-n 3] [--sector-size 4096]
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python benchmarks/X.py` (sys.path[0] is benchmarks/): tests.host is not installed.
sys.path.insert(0, str(ROOT))

from keyd.crypto.ciphers import SectorCipher, sector_cipher  # noqa: E402
from keyd.crypto.serve import keep_heap  # noqa: E402
from tests.host.support import attached, host_problems, plain_image, serving  # noqa: E402

MiB = 1 << 20
SIZE = 256 * MiB
CHUNK = MiB
SMALL = 4096
RANDOM_SECONDS = 3.0


def _transfer(device: str, offsets: range, *, write: bool) -> None:
    fd = os.open(device, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT)
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(CHUNK))
    try:
        for offset in offsets:
            done = (os.pwritev if write else os.preadv)(fd, [buffer], offset)
            assert done == CHUNK, f"short {'write' if write else 'read'} at {offset}: {done}"
        if write:
            os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def sequential(device: str, *, write: bool, streams: int = 1) -> float:
    """Seconds to write or read the whole device in CHUNK requests with O_DIRECT, one at a
    time in each of ``streams`` threads (each its own part of the device)."""
    part = SIZE // streams
    threads = [threading.Thread(target=_transfer, args=(device, range(at, at + part, CHUNK)),
                                kwargs={"write": write}) for at in range(0, SIZE, part)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def random_reads(device: str) -> float:
    """4 KiB O_DIRECT reads at random 4 KiB-aligned offsets per second, one at a time."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, SMALL)
    count, started = 0, time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - started) < RANDOM_SECONDS:
            os.preadv(fd, [buffer], random.randrange(SIZE // SMALL) * SMALL)
            count += 1
        return count / elapsed
    finally:
        os.close(fd)
        buffer.close()


def in_process(cipher: SectorCipher, *, write: bool) -> float:
    """Seconds for the cipher alone to encrypt or decrypt SIZE bytes in CHUNK calls."""
    work = cipher.encrypt if write else cipher.decrypt
    data, per_chunk = os.urandom(CHUNK), CHUNK // cipher.sector_size
    started = time.perf_counter()
    for index in range(SIZE // CHUNK):
        work(index * per_chunk, data)
    return time.perf_counter() - started


def in_process_small(cipher: SectorCipher) -> float:
    """4 KiB decryptions at random sectors per second, the cipher alone."""
    data, sectors = os.urandom(SMALL), SIZE // cipher.sector_size
    per_call = SMALL // cipher.sector_size
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < RANDOM_SECONDS / 3:
        cipher.decrypt(random.randrange(0, sectors, per_call), data)
        count += 1
    return count / elapsed


def rate(seconds: list[float]) -> float:
    """MB/s of SIZE bytes at the median time."""
    return SIZE / statistics.median(seconds) / 1e6


def show(name: str, fuse: float, alone: float, goal: float | None, unit: str) -> None:
    """One line: the FUSE figure, the in-process one, the ratio and its goal."""
    target = f" (goal >= {goal})" if goal is not None else ""
    print(f"{name:<22} {fuse:9.1f} {unit} through FUSE+loop, {alone:9.1f} {unit} in-process: "
          f"ratio {fuse / alone:.2f}{target}")


def measure(device: str, cipher: SectorCipher, rounds: int) -> None:
    """Run the rounds and print the figures."""
    steps: dict[str, Callable[[], float]] = {
        "write": lambda: sequential(device, write=True),
        "encrypt": lambda: in_process(cipher, write=True),
        "read": lambda: sequential(device, write=False),
        "read2": lambda: sequential(device, write=False, streams=2),
        "decrypt": lambda: in_process(cipher, write=False)}
    times: dict[str, list[float]] = {key: [] for key in steps}
    small: dict[str, list[float]] = {"fuse": [], "alone": []}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(step())
        small["fuse"].append(random_reads(device))
        small["alone"].append(in_process_small(cipher))
    show("sequential write 1 MiB", rate(times["write"]), rate(times["encrypt"]), 0.5, "MB/s")
    show("sequential read 1 MiB", rate(times["read"]), rate(times["decrypt"]), 0.6, "MB/s")
    show("  the same, 2 readers", rate(times["read2"]), rate(times["decrypt"]), None, "MB/s")
    show("random read 4 KiB", statistics.median(small["fuse"]),
         statistics.median(small["alone"]), None, "/s  ")


def main() -> int:
    """Make the volume, serve it, attach it, measure, tear down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--sector-size", type=int, default=512, choices=(512, 4096))
    parser.add_argument("--dir", default="/dev/shm", help="where the image lives (tmpfs)")
    args = parser.parse_args()
    # The serving process's malloc settings, so the in-process figures are the cipher's best.
    keep_heap()
    problems = host_problems()
    if problems:
        sys.exit("cannot run here:\n  " + "\n  ".join(problems))
    with tempfile.TemporaryDirectory(prefix="keyd-bench-crypt-", dir=args.dir) as work:
        image = plain_image(Path(work), size=SIZE, sector_size=args.sector_size)
        cipher = sector_cipher("aes-xts-plain64", image.key, sector_size=args.sector_size)
        print(f"{SIZE // MiB} MiB aes-xts-plain64, {args.sector_size}-byte sectors, image on "
              f"{args.dir}, {args.rounds} rounds, {os.cpu_count()} CPUs")
        with serving(image, Path(work) / "crypt") as served, \
                attached(served.file, sector_size=args.sector_size) as device:
            measure(device, cipher, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
