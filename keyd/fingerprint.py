"""OpenPGP fingerprints as keyd compares them: one spelling, one check.

A leaf module (standard library only) so that the configuration parser and the
trust code share it without importing each other.
"""

from __future__ import annotations

import re

_FINGERPRINT = re.compile(r"[0-9A-F]{40}([0-9A-F]{24})?\Z")


def normalize_fingerprint(text: str) -> str | None:
    """``text`` upper-cased without whitespace if it is a full v4/v5 fingerprint, else None.

    gpg prints fingerprints in groups of four (``gpg --fingerprint``), and admins
    paste them that way into keyd.toml, so every kind of whitespace is dropped.
    """
    candidate = "".join(text.split()).upper()
    return candidate if _FINGERPRINT.match(candidate) else None
