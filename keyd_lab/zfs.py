"""OpenZFS for the lab kernel: built once on the host with DKMS, cached, and loadable in every guest.

Debian ships OpenZFS as DKMS source (``zfs-dkms``, in ``contrib``). Nothing is
installed for this: the matching ``linux-headers-*`` packages and ``zfs-dkms``
are downloaded and extracted into the cache, and ``dkms build`` runs with its
own tree, source tree and kernel directory there, so the host's DKMS state and
its running kernel are left alone. The built modules go under ``updates/zfs``
of a hard-linked copy of the lab kernel's modules tree, re-indexed by
``depmod -b``: the guest's ``modprobe zfs`` then resolves spl and friends.
The modules are only loaded on demand, so boot time is unchanged.

The cache entry is keyed by the kernel release and package version and by the
zfs-dkms version; a complete entry (with its manifest) is never rebuilt.
``KEYD_LAB_ZFS=0`` boots without it (for a box that cannot have contrib).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keyd.errors import ProgramError
from keyd.runner import Runner
from keyd_lab.errors import LabError
from keyd_lab.kernel import COMPLETE, Kernel, cache_dir, cache_locked
from keyd_lab.progress import phase

SOURCE_PACKAGE = "zfs-dkms"
MODULE_DIR = "updates/zfs"
# What `modprobe zfs` must find; dkms.conf builds these nine.
MODULES = ("spl", "zavl", "znvpair", "zunicode", "zcommon", "icp", "zlua", "zzstd", "zfs")
DKMS_TIMEOUT = 3 * 3600.0
INSTALL_FIX = "run 'make deps' (it enables Debian's contrib and installs dkms), or set KEYD_LAB_ZFS=0"


class ZfsBuildError(LabError):
    """The lab's ZFS modules could not be had; the fix says how to get them or boot without."""


@dataclass(frozen=True)
class ZfsPlan:
    """Which ZFS to build for which kernel, and every name and path that follows from it (no I/O)."""

    kernel_release: str
    kernel_version: str
    zfs_version: str

    @property
    def key(self) -> str:
        """The cache entry's name: kernel release and version, and zfs-dkms version."""
        return re.sub(r"[^A-Za-z0-9._+-]", "_",
                      f"{self.kernel_release}_{self.kernel_version}_zfs-{self.zfs_version}")

    @property
    def upstream(self) -> str:
        """The OpenZFS version dkms knows the module by (the Debian revision stripped)."""
        return self.zfs_version.rsplit("-", 1)[0] if "-" in self.zfs_version else self.zfs_version

    def packages(self) -> list[str]:
        """``apt-get download`` arguments: the headers the module builds against, pinned, and its source."""
        abi, _, _flavour = self.kernel_release.rpartition("-")
        series = ".".join(self.kernel_release.split(".")[:2])
        pin = f"={self.kernel_version}"
        return [f"linux-headers-{self.kernel_release}{pin}", f"linux-headers-{abi}-common{pin}",
                f"linux-kbuild-{series}{pin}", f"{SOURCE_PACKAGE}={self.zfs_version}"]

    def dkms_argv(self, command: str, work: Path) -> list[str]:
        """``dkms add`` or ``dkms build`` confined to ``work`` (its own trees, the extracted headers)."""
        argv = ["dkms", command, "-m", "zfs", "-v", self.upstream,
                "--dkmstree", str(work / "dkms"), "--sourcetree", str(work / "root" / "usr" / "src")]
        if command == "build":
            argv += ["-k", self.kernel_release, "--kernelsourcedir", str(self.build_link(work))]
        return argv

    def build_link(self, work: Path) -> Path:
        """The kernel directory for dkms: it must end in ``build``, zfs finds ``source`` beside it."""
        return work / "root" / "lib" / "modules" / self.kernel_release / "build"

    def built_modules(self, work: Path) -> Path:
        """Where ``dkms build`` leaves the .ko files."""
        return work / "dkms" / "zfs" / self.upstream / self.kernel_release / "x86_64" / "module"


def relocate_headers_makefile(text: str, root: Path) -> str:
    """Point the flavour headers' ``include /usr/src/...-common/Makefile`` into the extracted tree."""
    return re.sub(r"^include /usr/src/", f"include {root}/usr/src/", text, flags=re.MULTILINE)


def manifest(plan: ZfsPlan, modules: list[str], seconds: float) -> str:
    """The JSON written when an entry is complete: what was built, from what, and how long it took."""
    return json.dumps({"kernel_release": plan.kernel_release, "kernel_version": plan.kernel_version,
                       "zfs_version": plan.zfs_version, "modules": sorted(modules),
                       "build_seconds": round(seconds, 1)}, indent=1) + "\n"


def missing_modules(built: list[str]) -> list[str]:
    """The modules ``modprobe zfs`` needs that a build did not produce."""
    return [name for name in MODULES if name not in built]


def zfs_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether lab boots carry ZFS (on unless ``KEYD_LAB_ZFS=0``)."""
    return environ.get("KEYD_LAB_ZFS", "1") != "0"


# ----- I/O ------------------------------------------------------------------------------------


def zfs_root() -> Path:
    """Where the lab caches its ZFS builds."""
    return cache_dir() / "zfs"


def resolve_zfs_version(runner: Runner) -> str:
    """The zfs-dkms version apt would download."""
    policy = runner.run(["apt-cache", "policy", SOURCE_PACKAGE]).stdout
    match = re.search(r"Candidate:\s*(\S+)", policy)
    if not match or match.group(1) == "(none)":
        raise ZfsBuildError(f"apt knows no version of {SOURCE_PACKAGE} (Debian's contrib is not enabled?)",
                            fix=INSTALL_FIX)
    return match.group(1)


def ensure_zfs(runner: Runner, kernel: Kernel, timings: dict[str, float] | None = None) -> Kernel:
    """``kernel`` with the ZFS modules added to its modules tree, building them first if not cached."""
    try:
        version = resolve_zfs_version(runner)
    except (ZfsBuildError, ProgramError):
        cached = _newest_cached(kernel)
        if cached is None:
            raise
        return cached
    plan = ZfsPlan(kernel.release, kernel.version, version)
    entry = zfs_root() / plan.key
    with cache_locked(zfs_root()):
        if not (entry / COMPLETE).exists():
            _build_entry(runner, plan, kernel, entry, timings)
    return dataclasses.replace(kernel, root=entry / "root")


def _newest_cached(kernel: Kernel) -> Kernel | None:
    # Offline (apt cannot be asked): any complete build for this very kernel will do.
    prefix = ZfsPlan(kernel.release, kernel.version, "").key.removesuffix("_zfs-")
    entries = sorted(zfs_root().glob(f"{prefix}_zfs-*/{COMPLETE}"), key=lambda p: p.stat().st_mtime)
    return dataclasses.replace(kernel, root=entries[-1].parent / "root") if entries else None


def _build_entry(runner: Runner, plan: ZfsPlan, kernel: Kernel, entry: Path,
                 timings: dict[str, float] | None) -> None:
    staging = entry.with_name(entry.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    work = staging / "work"
    started = time.monotonic()
    with phase(f"download headers and zfs-dkms {plan.zfs_version}", timings):
        _extract_packages(runner, plan, work)
    with phase(f"dkms build zfs {plan.upstream} for {plan.kernel_release} (cold: minutes)", timings):
        (work / "dkms").mkdir()  # dkms refuses a tree that does not exist ("no write access")
        runner.run(plan.dkms_argv("add", work), timeout=300)
        runner.run(plan.dkms_argv("build", work), timeout=DKMS_TIMEOUT)
    built = sorted(plan.built_modules(work).glob("*.ko"))
    if missing := missing_modules([ko.name.removesuffix(".ko") for ko in built]):
        raise ZfsBuildError(f"dkms built no {', '.join(missing)} in {plan.built_modules(work)}",
                            fix=f"read {work}/dkms/zfs/{plan.upstream}/build/make.log")
    with phase("add zfs to the lab's modules tree", timings):
        _install_modules(runner, plan, kernel, built, staging / "root")
    seconds = time.monotonic() - started
    (staging / "manifest.json").write_text(manifest(plan, [ko.name for ko in built], seconds))
    shutil.rmtree(work)
    (staging / COMPLETE).write_text(plan.key + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    staging.rename(entry)


def _extract_packages(runner: Runner, plan: ZfsPlan, work: Path) -> None:
    debs = work / "debs"
    debs.mkdir(parents=True)
    try:
        runner.run(["apt-get", "download", *plan.packages()], cwd=debs, timeout=600)
    except ProgramError as exc:
        raise ZfsBuildError(f"cannot download {' '.join(plan.packages())}: {exc}", fix=INSTALL_FIX) from exc
    root = work / "root"
    for deb in sorted(debs.glob("*.deb")):
        runner.run(["dpkg-deb", "-x", str(deb), str(root)], timeout=300)
    makefile = root / "usr" / "src" / f"linux-headers-{plan.kernel_release}" / "Makefile"
    makefile.write_text(relocate_headers_makefile(makefile.read_text(), root))
    # The headers ship /lib/modules/REL/{build,source} as absolute links into /usr/src: re-point them here.
    link = plan.build_link(work)
    link.parent.mkdir(parents=True, exist_ok=True)
    abi = plan.kernel_release.rpartition("-")[0]
    for name, target in (("build", plan.kernel_release), ("source", f"{abi}-common")):
        link.with_name(name).unlink(missing_ok=True)
        link.with_name(name).symlink_to(f"../../../usr/src/linux-headers-{target}")


def _install_modules(runner: Runner, plan: ZfsPlan, kernel: Kernel, built: list[Path], root: Path) -> None:
    # Hard links: the copy costs no space; depmod replaces its index files, it does not rewrite them.
    shutil.copytree(kernel.root, root, symlinks=True, copy_function=_link_or_copy)
    target = root / "lib" / "modules" / plan.kernel_release / MODULE_DIR
    target.mkdir(parents=True)
    for ko in built:
        shutil.copy2(ko, target / ko.name)
    runner.run(["depmod", "-b", str(root), plan.kernel_release], timeout=300)


def _link_or_copy(source: str, destination: str) -> None:
    # The modules.* indexes are copied so that nothing can ever write through into the plain kernel's tree.
    if Path(source).name.startswith("modules."):
        shutil.copy2(source, destination)
    else:
        os.link(source, destination)
