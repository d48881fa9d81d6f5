"""The safe reader, with both openat2 and the O_NOFOLLOW fallback, on real directories."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from keyd.trust.errors import Reason, UnsafeStickError
from keyd.trust.safe_read import (
    RESOLVE_STRICT,
    NofollowOpener,
    Openat2Opener,
    Opener,
    openat2,
    openat2_available,
    read_bundle,
)
from keyd.trust.settings import Limits

OPENERS = [pytest.param(NofollowOpener(), id="nofollow")]
if openat2_available():
    OPENERS.insert(0, pytest.param(Openat2Opener(), id="openat2"))


@pytest.fixture(params=OPENERS)
def opener(request: pytest.FixtureRequest) -> Opener:
    """Each test runs with every opener this kernel supports."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def root(plain_stick: Path) -> Path:
    """The stick root under test."""
    return plain_stick


def test_regular_files_are_read_exactly(root: Path, opener: Opener) -> None:
    with read_bundle(root, opener=opener) as bundle:
        assert {name: bytes(data) for name, data in bundle.files.items()} == {
            "manifest": b"format = 1\n", "manifest.sig": b"sig", "tank.key": b"\x00key\xff"}
        assert bundle.problems == {}
        assert bundle.opener == opener.name
        data = bundle.files["tank.key"]
    assert data == bytearray(5)  # zeroed on leaving the with-block


@pytest.mark.parametrize("make", ["symlink_out", "symlink_in", "fifo", "directory", "socket",
                                  "hardlink_ok"])
def test_only_regular_files_are_read(root: Path, tmp_path: Path, opener: Opener,
                                     make: str) -> None:
    target = root / "keyd" / "odd.key"
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside")
    if make == "symlink_out":
        target.symlink_to(secret)
    elif make == "symlink_in":
        target.symlink_to("tank.key")
    elif make == "fifo":
        os.mkfifo(target)
    elif make == "directory":
        target.mkdir()
    elif make == "socket":
        import socket
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.bind(str(target))
            except OSError:
                pytest.skip("path too long for a unix socket")
    else:
        os.link(root / "keyd" / "tank.key", target)
    bundle = read_bundle(root, opener=opener)
    if make == "hardlink_ok":
        assert bytes(bundle.files["odd.key"]) == b"\x00key\xff"
        return
    assert "odd.key" not in bundle.files
    assert bundle.problems["odd.key"].reason is Reason.UNSAFE_FILE
    assert "keyd/odd.key" in str(bundle.problems["odd.key"])


def test_device_node_is_refused_without_being_opened(root: Path, opener: Opener) -> None:
    try:
        os.mknod(root / "keyd" / "dev.key", 0o600 | 0o060000, os.makedev(7, 200))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    bundle = read_bundle(root, opener=opener)
    assert bundle.problems["dev.key"].reason is Reason.UNSAFE_FILE
    assert "block device" in str(bundle.problems["dev.key"])


def test_symlinked_bundle_directory_is_refused(tmp_path: Path, opener: Opener) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "stick").mkdir()
    (tmp_path / "stick" / "keyd").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeStickError) as caught:
        read_bundle(tmp_path / "stick", opener=opener)
    assert caught.value.reason is Reason.UNSAFE_FILE


def test_missing_bundle_directory_is_no_bundle(tmp_path: Path, opener: Opener) -> None:
    with pytest.raises(UnsafeStickError) as caught:
        read_bundle(tmp_path, opener=opener)
    assert caught.value.reason is Reason.NO_BUNDLE


@pytest.mark.parametrize(("limits", "name"), [
    (Limits(manifest_bytes=5), "manifest"),
    (Limits(signature_bytes=2), "manifest.sig"),
    (Limits(key_bytes=4), "tank.key"),
])
def test_each_file_kind_has_its_own_cap(root: Path, opener: Opener, limits: Limits,
                                        name: str) -> None:
    bundle = read_bundle(root, limits, opener)
    assert bundle.problems[name].reason is Reason.TOO_LARGE
    assert set(bundle.files) | {name} == {"manifest", "manifest.sig", "tank.key"}


def test_total_and_count_caps_refuse_the_whole_directory(root: Path, opener: Opener) -> None:
    for limits, reason in ((Limits(total_bytes=10), Reason.TOO_LARGE),
                           (Limits(files=2), Reason.TOO_MANY_FILES)):
        with pytest.raises(UnsafeStickError) as caught:
            read_bundle(root, limits, opener)
        assert caught.value.reason is reason


def test_non_utf8_names_are_refused_not_crashed_on(root: Path, opener: Opener) -> None:
    os.close(os.open(os.path.join(os.fsencode(root / "keyd"), b"bad\xffname"),
                     os.O_CREAT | os.O_WRONLY, 0o600))
    bundle = read_bundle(root, opener=opener)
    (problem,) = bundle.problems.values()
    assert problem.reason is Reason.UNSAFE_FILE
    assert "tank.key" in bundle.files


def test_fallback_opener_refuses_multi_component_names(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("keyd/tank.key", "..", ".", ""):
            with pytest.raises(OSError, match="one plain component"):
                NofollowOpener().open(fd, name, os.O_RDONLY)
    finally:
        os.close(fd)


@pytest.mark.skipif(not openat2_available(), reason="kernel without openat2")
def test_openat2_refuses_to_escape_or_follow(root: Path, tmp_path: Path) -> None:
    (root / "keyd" / "link").symlink_to("tank.key")
    fd = os.open(root / "keyd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, code in (("../keyd/tank.key", errno.EXDEV), ("link", errno.ELOOP),
                           (str(tmp_path), errno.EXDEV)):
            with pytest.raises(OSError) as caught:
                openat2(fd, name, os.O_RDONLY, RESOLVE_STRICT)
            assert caught.value.errno == code
        os.close(openat2(fd, "tank.key", os.O_RDONLY, RESOLVE_STRICT))
    finally:
        os.close(fd)
