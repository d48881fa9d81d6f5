"""Enables Debian's ``contrib`` component for apt, which the lab needs for OpenZFS (zfs-dkms, zfsutils-linux).

Run as ``python3 -m keyd_lab.apt_sources`` (standard library only, as root):
if no Debian source already has ``contrib``, it writes
``/etc/apt/sources.list.d/keyd-contrib.sources`` (deb822) with the same URIs
and suites as the box's Debian sources, prints that path and exits 0; the
Makefile then runs ``apt-get update``. It prints nothing when there is
nothing to do, so a second run changes nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ETC_APT = Path("/etc/apt")
CONTRIB_FILE = "keyd-contrib.sources"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class AptSource:
    """One apt source entry, whichever file format it came from."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""

    @property
    def is_debian(self) -> bool:
        """A binary source from a Debian archive (deb.debian.org, security, snapshot or a mirror)."""
        return "deb" in self.types and any(_is_debian_uri(uri) for uri in self.uris)


def _is_debian_uri(uri: str) -> bool:
    parsed = urlparse(uri)
    last = parsed.path.rstrip("/").rsplit("/", 1)[-1]
    return last in ("debian", "debian-security") or (parsed.hostname or "").endswith(".debian.org")


def parse_deb822(text: str) -> list[AptSource]:
    """The entries of a ``.sources`` file; disabled stanzas (``Enabled: no``) are left out."""
    sources = []
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        sources.append(AptSource(
            types=tuple(stanza.get("types", "").split()), uris=tuple(stanza.get("uris", "").split()),
            suites=tuple(stanza.get("suites", "").split()),
            components=tuple(stanza.get("components", "").split()),
            # An inline key spans several lines; only a keyring path is reused.
            signed_by=stanza.get("signed-by", "") if "\n" not in stanza.get("signed-by", "") else ""))
    return sources


def _stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = [{}]
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanzas[-1]:
                stanzas.append({})
        elif line[0] in " \t" and key:
            stanzas[-1][key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanzas[-1][key] = value.strip()
    return [s for s in stanzas if s]


def parse_one_line(text: str) -> list[AptSource]:
    """The entries of a one-line-style ``sources.list`` (``deb [opts] URI SUITE COMPONENT...``)."""
    sources = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        options: dict[str, str] = {}
        rest = words[1:]
        if rest[0].startswith("["):
            closing = next(i for i, word in enumerate(rest) if word.endswith("]"))
            for option in " ".join(rest[:closing + 1]).strip("[]").split():
                name, _, value = option.partition("=")
                options[name] = value
            rest = rest[closing + 1:]
        if len(rest) >= 2:
            sources.append(AptSource((words[0],), (rest[0],), (rest[1],), tuple(rest[2:]),
                                     options.get("signed-by", "")))
    return sources


def contrib_enabled(sources: list[AptSource]) -> bool:
    """Whether some Debian source already offers ``contrib``."""
    return any(s.is_debian and "contrib" in s.components for s in sources)


def contrib_file(sources: list[AptSource]) -> str | None:
    """The deb822 text that adds ``contrib`` to every Debian source, or None when not needed or impossible."""
    debian = [s for s in sources if s.is_debian]
    if not debian or contrib_enabled(sources):
        return None
    stanzas = [
        "Types: deb\n"
        f"URIs: {' '.join(s.uris)}\n"
        f"Suites: {' '.join(s.suites)}\n"
        "Components: contrib\n"
        f"Signed-By: {s.signed_by or DEBIAN_KEYRING}\n"
        for s in debian]
    header = "# Written by keyd's install step (make apt): the lab builds OpenZFS from Debian's contrib.\n"
    return header + "\n".join(stanzas)


def read_sources(etc: Path = ETC_APT) -> list[AptSource]:
    """Every enabled entry apt reads: sources.list, sources.list.d/*.list and *.sources."""
    sources = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            sources += parse_one_line(path.read_text())
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        sources += parse_deb822(path.read_text())
    return sources


def enable_contrib(etc: Path = ETC_APT) -> Path | None:
    """Write the contrib sources file if needed; return its path when written."""
    text = contrib_file(read_sources(etc))
    if text is None:
        return None
    target = etc / "sources.list.d" / CONTRIB_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python3 -m keyd_lab.apt_sources")
    written = enable_contrib()
    if written is not None:
        print(written)
    elif not contrib_enabled(read_sources()):
        # Not fatal: the install below then fails naming zfsutils-linux; KEYD_LAB_ZFS=0 is the way out.
        print("keyd: no Debian apt source found to add contrib to; add it by hand for zfsutils-linux",
              file=sys.stderr)
