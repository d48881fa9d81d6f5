"""``keydctl doctor``: can this machine open the configured stacks? Each problem comes with its fix.

Checks: the programs the configuration needs (with their versions), the
kernel modules (``modprobe -n -v``: loadable, loaded or built in; ``zfs`` and
zpool/zfs only when a zfs layer is configured, with how to install OpenZFS), the plain-mode
hashes cryptsetup can compute, the configured devices (present, sector size),
RAID members found on disk, Debian's mdadm-last-resort@.timer against a raid layer's
``degraded = "never"``, and the run directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keyd.config.model import (
    Config,
    CryptLayer,
    Layer,
    LoopLayer,
    MountLayer,
    RaidLayer,
    ZfsLayer,
)
from keyd.engine.observed import ObservedState
from keyd.errors import ProgramError, ProgramMissing
from keyd.programs import PROGRAMS
from keyd.runner import Runner

# Kernel module behind each filesystem type (ext3 is served by ext4; ntfs-3g by fuse).
FS_MODULES = {"ext2": "ext4", "ext3": "ext4", "ext4": "ext4", "xfs": "xfs", "btrfs": "btrfs",
              "ntfs3": "ntfs3", "ntfs-3g": "fuse", "ntfs": "fuse", "fuseblk": "fuse",
              "vfat": "vfat", "exfat": "exfat"}
# OpenZFS is in Debian's contrib, built for the running kernel by DKMS.
ZFS_FIX = ("enable Debian's contrib archive (add `contrib` to Components: in "
           "/etc/apt/sources.list.d/debian.sources), then `apt-get update && apt-get install "
           "linux-headers-$(uname -r) zfs-dkms zfsutils-linux`")


@dataclass(frozen=True)
class Finding:
    """One check's outcome; ``fix`` says what to do when it is not ok."""

    status: Literal["ok", "warn", "fail"]
    topic: str
    text: str
    fix: str | None = None


def _layers(config: Config) -> list[Layer]:
    return [layer for volume in config.volumes for layer in volume.layers]


def needed_programs(config: Config) -> list[str]:
    """Programs the configured stacks use."""
    layers = _layers(config)
    names = ["mount", "umount", "modprobe"]
    names += ["cryptsetup"] if any(isinstance(x, CryptLayer) for x in layers) else []
    names += ["mdadm"] if any(isinstance(x, RaidLayer) for x in layers) else []
    names += ["losetup"] if any(isinstance(x, LoopLayer) for x in layers) else []
    names += ["zpool", "zfs"] if any(isinstance(x, ZfsLayer) for x in layers) else []
    names += ["ntfs-3g"] if any(isinstance(x, MountLayer) and x.fstype in ("ntfs-3g", "ntfs")
                                for x in layers) else []
    names += ["systemctl"] if any(v.services for v in config.volumes) else []
    return names


def needed_modules(config: Config) -> list[str]:
    """Kernel modules the configured stacks use (dm_crypt, raid456/raid1, loop, fs modules)."""
    layers = _layers(config)
    modules = ["dm_crypt"] if any(isinstance(x, CryptLayer) for x in layers) else []
    modules += ["raid456", "raid1"] if any(isinstance(x, RaidLayer) for x in layers) else []
    modules += ["loop"] if any(isinstance(x, LoopLayer) for x in layers) else []
    modules += ["zfs"] if any(isinstance(x, ZfsLayer) for x in layers) else []
    for layer in layers:
        if isinstance(layer, MountLayer):
            modules.append(FS_MODULES.get(layer.fstype, layer.fstype))
    return list(dict.fromkeys(modules))


def needs_dm_crypt(config: Config) -> bool:
    """Whether a crypt layer opens with dm-crypt only (LUKS, or backend = "kernel")."""
    return any(isinstance(x, CryptLayer) and (x.type == "luks" or x.backend == "kernel")
               for x in _layers(config))


def check_crypt_backends(config: Config, dm_crypt: bool, fuse_problems: Sequence[str],
                         fuse_fix: str) -> list[Finding]:
    """The layers that use keyd's userspace crypto on this kernel, and whether they can."""
    findings = []
    for volume in config.volumes:
        for layer in volume.layers:
            if not isinstance(layer, CryptLayer) or layer.type == "luks":
                continue
            if layer.backend == "kernel" or (layer.backend == "auto" and dm_crypt):
                continue
            why = "dm-crypt missing: using userspace crypto" if layer.backend == "auto" \
                else 'userspace crypto (backend = "userspace")'
            text = f"{volume.name}/{layer.name}: {why}"
            if fuse_problems:
                findings.append(Finding("fail", "crypt", f"{text}, but {'; '.join(fuse_problems)}",
                                        fuse_fix))
            else:
                findings.append(Finding("ok", "crypt", text))
    return findings


def check_programs(runner: Runner, names: Iterable[str]) -> list[Finding]:
    """Each program installed, with the first line of its version output."""
    findings = []
    for name in names:
        program = PROGRAMS[name]
        try:
            done = runner.run([name, *program.version_argv], timeout=10, ok_codes=range(256))
        except ProgramMissing as exc:
            fix = ZFS_FIX if program.package == "zfsutils-linux" else exc.fix
            findings.append(Finding("fail", "program", f"{name} is not installed", fix))
            continue
        except ProgramError as exc:
            findings.append(Finding("warn", "program", f"{name}: {exc.message}"))
            continue
        text = (done.stdout.strip() or done.stderr.strip() or "installed").splitlines()[0]
        findings.append(Finding("ok", "program", f"{name}: {text}"))
    return findings


def _present(root: Path, module: str) -> bool:
    # Built-in code has no .ko for modprobe to find, but shows in /sys/module or /proc/filesystems.
    if (root / "sys" / "module" / module).is_dir():
        return True
    try:
        filesystems = (root / "proc" / "filesystems").read_text().split()
    except OSError:
        return False
    return module in filesystems


def check_modules(runner: Runner, modules: Iterable[str], root: Path = Path("/")) -> list[Finding]:
    """Each module loadable (``modprobe -n -v``), already loaded, or built in."""
    findings = []
    for module in modules:
        try:
            done = runner.run(["modprobe", "-n", "-v", module], timeout=10, ok_codes=(0, 1))
        except ProgramError as exc:
            findings.append(Finding("warn", "module", f"{module}: {exc.message}"))
            continue
        if done.returncode == 0:
            how = "loadable" if "insmod" in done.stdout else "loaded or built in"
            findings.append(Finding("ok", "module", f"{module}: {how}"))
        elif _present(root, module):
            findings.append(Finding("ok", "module", f"{module}: built into the kernel"))
        else:
            findings.append(Finding("fail", "module", f"{module}: not available for this kernel",
                                    ZFS_FIX if module == "zfs" else
                                    "install the kernel's modules package "
                                    "(apt-get install linux-image-$(uname -r))"))
    return findings


def check_hashes(runner: Runner, config: Config) -> list[Finding]:
    """Plain-mode passphrase hashes (e.g. ripemd160) that cryptsetup can compute."""
    hashes = sorted({layer.hash for layer in _layers(config) if isinstance(layer, CryptLayer)
                     and layer.type == "plain" and layer.hash not in (None, "plain")})
    findings = []
    for name in hashes:
        assert name is not None
        try:
            runner.run(["cryptsetup", "benchmark", "--hash", name], timeout=60)
        except ProgramError as exc:
            findings.append(Finding("fail", "hash", f"cryptsetup cannot hash with {name}: "
                                                    f"{exc.message}",
                                    "cryptsetup >= 2.4 loads OpenSSL's legacy provider for "
                                    "ripemd160; upgrade cryptsetup or build it with gcrypt"))
            continue
        findings.append(Finding("ok", "hash", f"cryptsetup can hash passphrases with {name}"))
    return findings


def check_devices(config: Config, observed: ObservedState) -> list[Finding]:
    """Configured devices present (with sector size) and RAID members found."""
    findings = []
    for volume in config.volumes:
        for layer in volume.layers:
            findings.extend(_device_findings(volume.name, layer, observed))
    return findings


def _device_findings(volume: str, layer: Layer, observed: ObservedState) -> list[Finding]:
    paths: Sequence[str] = ()
    if isinstance(layer, CryptLayer | MountLayer) and layer.device is not None:
        paths = (layer.device,)
    if isinstance(layer, RaidLayer):
        paths = layer.devices
        found = observed.members_of(layer.uuid)
        count = f"{len(found.devices)} of {found.expected}" if found else "no"
        ok = found is not None and len(found.devices) >= found.expected
        assembled = observed.md_with_uuid(layer.uuid)
        note = f" (assembled as /dev/{assembled.kname})" if assembled else ""
        summary = Finding("ok" if ok else "warn", "device",
                         f"{volume}/{layer.name}: {count} members of md {layer.uuid} found{note}",
                         None if ok else "connect the missing disks (mdadm --examine --scan)")
        return [summary, *(_path_finding(volume, layer.name, p, observed) for p in paths)]
    return [_path_finding(volume, layer.name, p, observed) for p in paths]


def _path_finding(volume: str, layer: str, path: str, observed: ObservedState) -> Finding:
    kname = observed.paths.get(path)
    if kname is None:
        return Finding("fail", "device", f"{volume}/{layer}: {path} is not present",
                       "connect the disk or correct the path in keyd.toml")
    size = observed.sector_sizes.get(kname)
    sector = f", {size}-byte sectors" if size else ""
    return Finding("ok", "device", f"{volume}/{layer}: {path} -> /dev/{kname}{sector}")


LAST_RESORT = "mdadm-last-resort@.timer"


def check_last_resort(config: Config, root: Path) -> list[Finding]:
    """Debian's mdadm starts an incomplete array degraded after 30 s, whatever keyd's policy.

    Only relevant when a raid layer says ``degraded = "never"``; masked means the timer's
    unit path under /etc/systemd/system points to /dev/null.
    """
    strict = [f"{v.name}/{layer.name}" for v in config.volumes for layer in v.layers
              if isinstance(layer, RaidLayer) and layer.degraded.mode == "never"]
    shipped = any((root / d / LAST_RESORT).exists() for d in ("lib/systemd/system",
                                                             "usr/lib/systemd/system"))
    if not strict or not shipped:
        return []
    masked = (root / "etc/systemd/system" / LAST_RESORT).resolve() == Path("/dev/null")
    if masked:
        return [Finding("ok", "degraded", f"{LAST_RESORT} is masked: {', '.join(strict)} "
                                          "are never started degraded behind keyd's back")]
    return [Finding("warn", "degraded", f"{', '.join(strict)} say degraded = \"never\", but "
                                        f"Debian's {LAST_RESORT} starts an incomplete array "
                                        "degraded after 30 s (keyd then refuses to use it)",
                    f"systemctl mask {LAST_RESORT}")]


def _writable(path: str) -> bool:
    """``path`` is a writable directory, or the nearest existing parent is (keyd creates it)."""
    existing = path
    while not os.path.exists(existing) and existing not in ("", "/"):
        existing = os.path.dirname(existing)
    return os.path.isdir(existing) and os.access(existing, os.W_OK)


def check_run_dir(run_dir: str) -> Finding:
    """The lock directory exists and is writable (or can be created)."""
    if _writable(run_dir):
        return Finding("ok", "run dir", f"{run_dir} is usable for volume locks")
    return Finding("fail", "run dir", f"{run_dir} is not writable",
                   "run keydctl as root, or pass --run-dir DIR")


def check_state_dir(state_dir: str) -> Finding:
    """keyd can record accepted generations and learned revocations (the replay guard)."""
    if _writable(state_dir):
        return Finding("ok", "state", f"{state_dir} is writable (the replay guard's records)")
    return Finding("fail", "state", f"{state_dir} is not writable: keyd cannot record accepted "
                                    "generations, so a retired stick would be accepted again",
                   f"make {state_dir} a writable directory for root (it must survive reboots)")


def render(findings: Sequence[Finding]) -> str:
    """One line per finding, fixes indented below problems."""
    lines = []
    for finding in findings:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[finding.status]
        lines.append(f"{mark}  {finding.topic:<8}  {finding.text}")
        if finding.fix and finding.status != "ok":
            lines.append(f"{'':16}fix: {finding.fix}")
    return "\n".join(lines) + "\n"
