"""Progress lines for the lab's long phases (download, extract, boot), on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def phase(name: str, timings: dict[str, float] | None = None, *, quiet: bool = False) -> Iterator[None]:
    """Print ``name ...`` then ``done in N s``; record the seconds in ``timings`` if given."""
    if not quiet:
        print(f"keyd-lab: {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    yield
    seconds = time.monotonic() - started
    if timings is not None:
        timings[name] = seconds
    if not quiet:
        print(f"keyd-lab: {name}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
