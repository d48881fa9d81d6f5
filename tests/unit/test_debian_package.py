"""debian/ stays in step with what the product declares: its programs, its files, its layout.

The package itself is built (and its unit tests run against Debian's libraries) by `make deb`,
and installed in the lab by tests/vm/test_debian_package.py.
"""

from __future__ import annotations

from pathlib import Path

from keyd.cli.daemon_commands import FILES
from keyd.programs import packages
from keyd_lab.programs import apt_packages, package_relations

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
# Essential: always installed, and Debian policy forbids depending on it without a version.
ESSENTIAL = {"util-linux", "coreutils"}


def control_field(field: str) -> set[str]:
    """The package names in one relationship field of the binary package keyd."""
    names = set(package_relations((DEBIAN / "control").read_text(), (field,)))
    assert names, f"debian/control has no {field} for keyd"
    return names


def shipped_sources() -> set[str]:
    """The source files debian/ ships: keyd.install lines, and the sysusers/tmpfiles links."""
    lines = (DEBIAN / "keyd.install").read_text().splitlines()
    sources = {line.split()[0] for line in lines if line.strip()}
    for helper in ("keyd.sysusers", "keyd.tmpfiles", "keyd.examples", "keyd.docs"):
        path = DEBIAN / helper
        if path.is_symlink():
            sources.add(str(path.resolve().relative_to(ROOT)))
        else:
            sources |= set(path.read_text().split())
    return sources


def test_every_program_keyd_runs_is_a_dependency_or_recommendation() -> None:
    declared = set(packages()) - ESSENTIAL
    assert declared <= control_field("Depends") | control_field("Recommends")


def test_the_python_libraries_are_debians() -> None:
    assert {"python3-pyudev", "python3-gnupg", "python3-pydbus", "python3-gi", "python3-systemd",
            "python3-cryptography", "python3-pycryptodome"} <= control_field("Depends")


def test_the_package_ships_every_file_keydctl_install_installs() -> None:
    from_checkout = {source for source, _, _ in FILES}
    # keyd.8 is shipped as the man page built from it.
    from_checkout.discard("docs/keyd.8.md")
    assert from_checkout <= shipped_sources()
    manpages = (DEBIAN / "keyd.manpages").read_text().split()
    assert "debian/man/keyd.8" in manpages


def test_the_unit_starts_the_daemon_where_the_package_puts_it() -> None:
    # debian/rules moves keyd to /usr/sbin (a daemon); tests/vm/test_debian_package.py runs it.
    unit = (ROOT / "systemd/keyd.service").read_text()
    assert "\nExecStart=/usr/sbin/keyd\n" in unit


def test_control_fields_are_read_as_package_names() -> None:
    assert "mdadm" in control_field("Depends") and "ntfs-3g" in control_field("Recommends")
    assert not any(name.startswith("#") for name in control_field("Depends"))


def test_relations_keep_first_alternatives_and_drop_versions_and_substitutions() -> None:
    control = ("Source: x\n\nPackage: x\n# a comment: with a colon\nDepends: ${misc:Depends},\n"
               " a (>= 1.0), b | c,\n d [amd64],\nRecommends: e\nDescription: f, g\n")
    assert package_relations(control) == ["a", "b", "d", "e"]


def test_make_deps_installs_what_the_package_depends_on_and_recommends() -> None:
    # The lab's guest runs the host's root without a network: `apt-get install ./keyd_*.deb`
    # there must find every dependency and recommendation installed already.
    assert control_field("Depends") | control_field("Recommends") <= set(apt_packages())
