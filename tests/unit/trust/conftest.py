"""Real gpg in throwaway homes, made once per test session (keys are fast ed25519 ones).

``admin`` holds the signers' secret keys (as an admin's workstation would);
``keyd`` is keyd's own GnuPG home: the signers' public keys, the revoked
signer's revocation, and the host key that encrypted key files are sent to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyd.runner import SubprocessRunner
from keyd.trust.manifest import KeyEntry, KeyFile, Manifest, render_manifest
from keyd.trust.revocation import Revocations
from keyd_lab import gpg_scratch


@dataclass(frozen=True)
class GpgWorld:
    """The homes and fingerprints the trust tests use."""

    admin: Path
    keyd: Path
    good: str
    other: str
    expired: str
    revoked: str
    host: str
    stranger: str
    runner: SubprocessRunner

    def sign(self, fpr: str, data: bytes, faked_time: str | None = None) -> bytes:
        """Sign ``data`` in the admin home."""
        return gpg_scratch.sign(self.runner, self.admin, fpr, data, faked_time)


@pytest.fixture(scope="session")
def gpg_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgWorld]:
    """Create the admin and keyd homes with every key the tests need."""
    runner = SubprocessRunner()
    base = tmp_path_factory.mktemp("gpg")
    admin, keyd = gpg_scratch.make_home(base / "admin"), gpg_scratch.make_home(base / "keyd")
    good = gpg_scratch.new_key(runner, admin, "Good Signer <good@keyd.test>")
    other = gpg_scratch.new_key(runner, admin, "Unpinned Signer <other@keyd.test>")
    expired = gpg_scratch.new_key(runner, admin, "Expired Signer <old@keyd.test>",
                              expire="1d", faked_time="20200101T000000")
    revoked = gpg_scratch.new_key(runner, admin, "Revoked Signer <rev@keyd.test>")
    stranger = gpg_scratch.new_key(runner, admin, "Stranger <stranger@keyd.test>")
    gpg_scratch.add_encryption_subkey(runner, admin, stranger)
    host = gpg_scratch.new_key(runner, keyd, "keyd host <host@keyd.test>", usage="cert")
    gpg_scratch.add_encryption_subkey(runner, keyd, host)
    for fpr in (good, other, expired, revoked):
        gpg_scratch.copy_public(runner, admin, keyd, fpr)
    gpg_scratch.copy_public(runner, keyd, admin, host)
    gpg_scratch.revoke_in(runner, admin, keyd, revoked)
    try:
        yield GpgWorld(admin, keyd, good, other, expired, revoked, host, stranger, runner)
    finally:
        for home in (admin, keyd):
            gpg_scratch.stop_agent(runner, home)


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SERIAL = "4C530001230313115364"
FS_UUID = "1234-ABCD"


@dataclass
class StickDir:
    """A directory laid out like a key stick, written through the test's gpg world."""

    root: Path
    world: GpgWorld
    now: datetime = NOW
    serial: str = SERIAL
    fs_uuid: str = FS_UUID

    @staticmethod
    def entry(volume: str, data: bytes, **changes: object) -> KeyEntry:
        """A manifest entry for ``data`` valid around NOW and bound to SERIAL."""
        base = KeyEntry(volume=volume, bundle_id=f"bundle-{volume}",
                        secrets=(KeyFile(f"{volume}.key", hashlib.sha256(data).hexdigest()),),
                        generation=1,
                        not_before=datetime(2026, 1, 1, tzinfo=UTC),
                        not_after=datetime(2027, 1, 1, tzinfo=UTC), bind_serial=SERIAL)
        return replace(base, **changes)  # type: ignore[arg-type]

    @property
    def keyd(self) -> Path:
        """The stick's keyd/ directory."""
        return self.root / "keyd"

    def write(self, keys: dict[str, bytes], entries: list[KeyEntry] | None = None, *,
              signer: str | None = None, revocations: Revocations | None = None,
              manifest: bytes | None = None, faked_time: str | None = None) -> bytes:
        """Write key files, a manifest and its signature; return the manifest bytes."""
        self.keyd.mkdir(parents=True, exist_ok=True)
        for name, data in keys.items():
            (self.keyd / f"{name}.key").write_bytes(data)
        if manifest is None:
            entries = entries or [self.entry(name, data) for name, data in keys.items()]
            manifest = render_manifest(Manifest(tuple(entries), revocations or Revocations()))
        (self.keyd / "manifest").write_bytes(manifest)
        signature = self.world.sign(signer or self.world.good, manifest, faked_time)
        (self.keyd / "manifest.sig").write_bytes(signature)
        return manifest


@pytest.fixture
def stick(tmp_path: Path, gpg_world: GpgWorld) -> StickDir:
    """An empty stick directory."""
    root = tmp_path / "stick"
    root.mkdir()
    return StickDir(root, gpg_world)


@pytest.fixture
def plain_stick(tmp_path: Path) -> Path:
    """A stick tree (no gpg) with keyd/manifest, keyd/manifest.sig and keyd/tank.key."""
    keyd = tmp_path / "plain-stick" / "keyd"
    keyd.mkdir(parents=True)
    (keyd / "manifest").write_bytes(b"format = 1\n")
    (keyd / "manifest.sig").write_bytes(b"sig")
    (keyd / "tank.key").write_bytes(b"\x00key\xff")
    return keyd.parent
