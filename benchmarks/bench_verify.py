"""Benchmark: full keyd verification of a 3-volume bundle vs a bare ``gpg --verify``.

Both run in the same process, on the same signature, in a throwaway GnuPG
home with a fast ed25519 key. Prints the median of N runs of each and their
ratio; the bar is <= 150 ms for the full verification. No asserts.

    .venv/bin/python benchmarks/bench_verify.py [-n 30]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyd.runner import SubprocessRunner
from keyd.trust.gpg import GnuPG
from keyd.trust.manifest import KeyEntry, KeyFile, Manifest, render_manifest
from keyd.trust.verify import StickIdentity, TrustState, Verifier, verify_directory
from keyd_lab import gpg_scratch

SERIAL = "BENCHSERIAL01"
VOLUMES = ("tank", "media", "backup")


def write_bundle(root: Path, runner: SubprocessRunner, home: Path, signer: str) -> None:
    """A stick directory with three 64-byte keys, a manifest and its signature."""
    keyd = root / "keyd"
    keyd.mkdir(parents=True)
    now = datetime.now(UTC).replace(microsecond=0)
    entries = []
    for index, volume in enumerate(VOLUMES):
        key = bytes([index + 1]) * 64
        (keyd / f"{volume}.key").write_bytes(key)
        entries.append(KeyEntry(volume=volume, bundle_id=f"bench-{volume}",
                                secrets=(KeyFile(f"{volume}.key",
                                                 hashlib.sha256(key).hexdigest()),),
                                generation=1,
                                not_before=now - timedelta(days=1),
                                not_after=now + timedelta(days=1), bind_serial=SERIAL))
    manifest = render_manifest(Manifest(tuple(entries)))
    (keyd / "manifest").write_bytes(manifest)
    (keyd / "manifest.sig").write_bytes(gpg_scratch.sign(runner, home, signer, manifest))


def median_ms(action: Callable[[], object], runs: int) -> float:
    """Median wall time of ``action`` in milliseconds, after one warm-up run."""
    action()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    """Set up, time both, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=30)
    runs = parser.parse_args().runs
    runner = SubprocessRunner()
    with tempfile.TemporaryDirectory(prefix="keyd-bench-") as tmp:
        home = gpg_scratch.make_home(Path(tmp, "gnupg"))
        signer = gpg_scratch.new_key(runner, home, "Bench Signer <bench@keyd.test>")
        stick = Path(tmp, "stick")
        write_bundle(stick, runner, home, signer)
        try:
            gpg = GnuPG(str(home))
            verifier = Verifier(gpg, (signer,))

            def full() -> None:
                with verify_directory(stick, verifier, StickIdentity(SERIAL), TrustState()) as r:
                    if len(r.accepted) != len(VOLUMES):
                        raise SystemExit(f"bundle not accepted: {r.message}")

            def cold() -> None:
                # As keydctl verify does: a new GnuPG adapter (gpg --list-config) per run.
                fresh = Verifier(GnuPG(str(home)), (signer,))
                verify_directory(stick, fresh, StickIdentity(SERIAL), TrustState()).wipe()

            def bare() -> None:
                runner.run(["gpg", "--homedir", str(home), "--batch", "--verify",
                            str(stick / "keyd" / "manifest.sig"), str(stick / "keyd" / "manifest")])

            keyd_ms, cold_ms = median_ms(full, runs), median_ms(cold, runs)
            gpg_ms = median_ms(bare, runs)
        finally:
            gpg_scratch.stop_agent(runner, home)
    print(f"3-volume bundle, median of {runs} runs:")
    print(f"  keyd full verification : {keyd_ms:7.1f} ms  (bar: <= 150 ms)")
    print(f"  same, new GnuPG adapter: {cold_ms:7.1f} ms  (as keydctl verify runs)")
    print(f"  bare gpg --verify      : {gpg_ms:7.1f} ms")
    print(f"  ratio keyd / gpg       : {keyd_ms / gpg_ms:7.2f}")


if __name__ == "__main__":
    main()
