"""keyd's GnuPG home: refused when anyone but its owner could change it; gpg.conf is never read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from keyd.trust.errors import Reason, TrustError
from keyd.trust.gpg import GnuPG, check_home_safe
from keyd.trust.status import judge_output

if TYPE_CHECKING:  # the fixture's type; conftest is not imported at run time
    from tests.unit.trust.conftest import GpgWorld


def home(tmp_path: Path) -> Path:
    made = tmp_path / "gnupg"
    made.mkdir(mode=0o700)
    (made / "pubring.kbx").write_bytes(b"")
    return made


@pytest.mark.parametrize(("path", "mode"), [("", 0o777), ("", 0o770), ("gpg.conf", 0o666),
                                            ("pubring.kbx", 0o620)])
def test_a_home_others_could_write_is_refused_before_gpg_runs(tmp_path: Path, path: str,
                                                              mode: int) -> None:
    gnupghome = home(tmp_path)
    (gnupghome / "gpg.conf").write_text("agent-program /tmp/evil\n")
    (gnupghome / path).chmod(mode)
    with pytest.raises(TrustError) as caught:
        GnuPG(str(gnupghome))
    assert caught.value.reason is Reason.UNSAFE_GNUPGHOME
    assert str(gnupghome / path).rstrip("/") in str(caught.value)
    assert "chmod -R go-w" in str(caught.value.fix)


def test_a_home_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="is owned by uid"):
        check_home_safe(home(tmp_path), euid=4242)


def test_a_safe_home_passes(tmp_path: Path) -> None:
    check_home_safe(home(tmp_path))


def test_gpg_conf_in_the_home_is_not_read(gpg_world: GpgWorld) -> None:
    data = b"manifest bytes"
    signature = gpg_world.sign(gpg_world.good, data)
    conf = gpg_world.keyd / "gpg.conf"
    conf.write_text("faked-system-time 20000101T000000\n")  # read, every key is "too new"
    conf.chmod(0o600)
    try:
        output = GnuPG(str(gpg_world.keyd)).check(data, signature)
    finally:
        conf.unlink()
    assert judge_output(output.status, output.returncode, [gpg_world.good]) == gpg_world.good
