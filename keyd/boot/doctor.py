"""``keydctl doctor`` on the boot set-up of a ``boot = "root"`` volume (keyd(8), BOOT).

The initramfs carries its own copy of keyd.toml and keyd's trust: after changing them
it must be rebuilt, or the boot unlocks with the old ones (or not at all).
"""

from __future__ import annotations

from pathlib import Path

from keyd.boot.hook import files_under
from keyd.config.model import Config
from keyd.engine.doctor import Finding
from keyd.engine.status import VolumeReport

HOOK = "usr/share/initramfs-tools/hooks/keyd"
REBUILD = "update-initramfs -u"


def check_boot(config: Config, root: Path, release: str,
               reports: dict[str, VolumeReport]) -> list[Finding]:
    """The hook, the initramfs against what it copied, and the root volume's stack."""
    volume = next((v for v in config.volumes if v.boot == "root"), None)
    if volume is None:
        return []
    if not (root / HOOK).exists():
        return [Finding("fail", "boot", f"volume {volume.name} is the root file system, but "
                                        f"keyd's initramfs hook /{HOOK} is missing",
                        f"reinstall keyd (apt-get install --reinstall keyd), then {REBUILD}")]
    return [_initramfs(config, root, release), _stack(volume.name, reports.get(volume.name))]


def _initramfs(config: Config, root: Path, release: str) -> Finding:
    image = root / "boot" / f"initrd.img-{release}"
    if not image.exists():
        return Finding("fail", "boot", f"/boot/initrd.img-{release} is missing", REBUILD)
    copied = [Path(config.file), root / config.trust.revocations.lstrip("/"),
              *files_under(root / config.trust.gnupghome.lstrip("/"))]
    newer = [str(p) for p in copied if p.exists() and p.stat().st_mtime > image.stat().st_mtime]
    if newer:
        return Finding("fail", "boot", f"/boot/initrd.img-{release} is older than "
                                       f"{', '.join(newer)}: the boot would use the old ones",
                       REBUILD)
    return Finding("ok", "boot", f"/boot/initrd.img-{release} has keyd.toml and keyd's trust "
                                 "as they are now")


def _stack(name: str, report: VolumeReport | None) -> Finding:
    if report is not None and report.state.startswith("unlocked"):
        return Finding("ok", "boot", f"the root volume {name} is open: the system booted from it")
    state = report.state if report is not None else "unknown"
    return Finding("warn", "boot", f"the root volume {name} is {state}: this system did not "
                                   "boot from it", f"see `keydctl status {name}`")

