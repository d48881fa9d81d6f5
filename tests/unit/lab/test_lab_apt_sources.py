"""Enabling Debian's contrib for the lab's OpenZFS: apt's two source formats, the decision, one write."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyd_lab.apt_sources import (
    DEBIAN_KEYRING,
    AptSource,
    contrib_file,
    enable_contrib,
    parse_deb822,
    parse_one_line,
    read_sources,
)

CLOUD_IMAGE_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

NODESOURCE = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/nodesource.gpg
"""

INSTALLER_SOURCES_LIST = """\
#deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main
deb http://ftp.de.debian.org/debian/ bookworm main non-free-firmware
deb-src http://ftp.de.debian.org/debian/ bookworm main non-free-firmware
deb [signed-by=/etc/apt/keyrings/local.gpg arch=amd64] http://security.debian.org/debian-security \
bookworm-security main
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
"""


def test_deb822_stanzas_parse_with_comments_between_fields() -> None:
    sources = parse_deb822(CLOUD_IMAGE_SOURCES)

    assert sources == [
        AptSource(("deb",), ("http://deb.debian.org/debian",), ("bookworm", "bookworm-updates"), ("main",),
                  DEBIAN_KEYRING),
        AptSource(("deb",), ("http://deb.debian.org/debian-security",), ("bookworm-security",), ("main",),
                  DEBIAN_KEYRING)]


def test_contrib_file_repeats_each_debian_source_with_contrib_only() -> None:
    text = contrib_file(parse_deb822(CLOUD_IMAGE_SOURCES + "\n" + NODESOURCE))

    assert text is not None
    written = parse_deb822(text)
    assert [(s.uris, s.suites, s.components) for s in written] == [
        (("http://deb.debian.org/debian",), ("bookworm", "bookworm-updates"), ("contrib",)),
        (("http://deb.debian.org/debian-security",), ("bookworm-security",), ("contrib",))]
    assert {s.signed_by for s in written} == {DEBIAN_KEYRING}


def test_one_line_sources_keep_their_options_and_skip_comments() -> None:
    sources = parse_one_line(INSTALLER_SOURCES_LIST)

    assert [(s.types, s.uris[0], s.suites, s.components, s.signed_by) for s in sources] == [
        (("deb",), "http://ftp.de.debian.org/debian/", ("bookworm",), ("main", "non-free-firmware"), ""),
        (("deb-src",), "http://ftp.de.debian.org/debian/", ("bookworm",), ("main", "non-free-firmware"), ""),
        (("deb",), "http://security.debian.org/debian-security", ("bookworm-security",), ("main",),
         "/etc/apt/keyrings/local.gpg"),
        (("deb",), "https://packages.cloud.google.com/apt", ("cloud-sdk-bookworm",), ("main",), "")]


def test_an_installer_sources_list_gets_contrib_for_its_mirror_and_security_not_for_third_parties() -> None:
    text = contrib_file(parse_one_line(INSTALLER_SOURCES_LIST))

    assert text is not None
    assert [(s.uris[0], s.signed_by) for s in parse_deb822(text)] == [
        ("http://ftp.de.debian.org/debian/", DEBIAN_KEYRING),
        ("http://security.debian.org/debian-security", "/etc/apt/keyrings/local.gpg")]


@pytest.mark.parametrize("sources", [
    pytest.param(CLOUD_IMAGE_SOURCES.replace("Components: main\n", "Components: main contrib\n", 1),
                 id="contrib-already-enabled"),
    pytest.param(NODESOURCE, id="no-debian-source-to-extend"),
    pytest.param(CLOUD_IMAGE_SOURCES.replace("Types: deb\n", "Types: deb\nEnabled: no\n"), id="all-disabled"),
])
def test_nothing_is_written_when_contrib_is_there_or_nothing_can_carry_it(sources: str) -> None:
    assert contrib_file(parse_deb822(sources)) is None


def test_an_inline_key_is_not_copied_and_the_debian_keyring_is_used() -> None:
    inline = CLOUD_IMAGE_SOURCES.replace(
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes",
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBF\n\nTypes", 1)

    assert parse_deb822(inline)[0].signed_by == ""
    text = contrib_file(parse_deb822(inline))
    assert text is not None and parse_deb822(text)[0].signed_by == DEBIAN_KEYRING


def test_enable_contrib_writes_the_file_once(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(CLOUD_IMAGE_SOURCES)
    disabled = tmp_path / "sources.list.d" / "old.list.disabled"
    disabled.write_text("deb http://deb.debian.org/debian sid contrib\n")

    written = enable_contrib(tmp_path)

    assert written == tmp_path / "sources.list.d" / "keyd-contrib.sources"
    assert any("contrib" in s.components for s in read_sources(tmp_path))
    assert enable_contrib(tmp_path) is None


def test_a_contrib_line_in_sources_list_counts_as_enabled(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main contrib\n")

    assert enable_contrib(tmp_path) is None
    assert not (tmp_path / "sources.list.d").exists()
