"""The lab's ZFS build: names and argv from the kernel (pure), and the cache around dkms (scripted)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from keyd_lab import zfs
from keyd_lab.kernel import Kernel
from keyd_lab.zfs import ZfsBuildError, ZfsPlan
from tests.support.scripted_runner import Reply, ScriptedRunner

PLAN = ZfsPlan("6.1.0-56-amd64", "6.1.192-2", "2.1.11-1+deb12u1")
POLICY = "zfs-dkms:\n  Installed: (none)\n  Candidate: 2.1.11-1+deb12u1\n"


def test_plan_pins_the_headers_of_the_lab_kernel_and_the_zfs_source() -> None:
    assert PLAN.packages() == [
        "linux-headers-6.1.0-56-amd64=6.1.192-2", "linux-headers-6.1.0-56-common=6.1.192-2",
        "linux-kbuild-6.1=6.1.192-2", "zfs-dkms=2.1.11-1+deb12u1"]
    assert PLAN.upstream == "2.1.11"
    assert PLAN.key == "6.1.0-56-amd64_6.1.192-2_zfs-2.1.11-1+deb12u1"


@pytest.mark.parametrize(("plan", "different"), [
    (ZfsPlan("6.1.0-57-amd64", "6.1.192-2", PLAN.zfs_version), "kernel release"),
    (ZfsPlan(PLAN.kernel_release, "6.1.193-1", PLAN.zfs_version), "kernel package version"),
    (ZfsPlan(PLAN.kernel_release, PLAN.kernel_version, "2.1.11-1+deb12u2"), "zfs version"),
])
def test_the_cache_key_changes_with_kernel_and_zfs_versions(plan: ZfsPlan, different: str) -> None:
    assert plan.key != PLAN.key, different


def test_dkms_runs_in_its_own_trees_against_the_extracted_headers(tmp_path: Path) -> None:
    add, build = PLAN.dkms_argv("add", tmp_path), PLAN.dkms_argv("build", tmp_path)

    trees = ["--dkmstree", f"{tmp_path}/dkms", "--sourcetree", f"{tmp_path}/root/usr/src"]
    assert add == ["dkms", "add", "-m", "zfs", "-v", "2.1.11", *trees]
    assert build == ["dkms", "build", "-m", "zfs", "-v", "2.1.11", *trees, "-k", "6.1.0-56-amd64",
                     "--kernelsourcedir", f"{tmp_path}/root/lib/modules/6.1.0-56-amd64/build"]
    assert PLAN.built_modules(tmp_path) == tmp_path / "dkms/zfs/2.1.11/6.1.0-56-amd64/x86_64/module"


def test_the_headers_makefile_include_is_relocated_into_the_extracted_tree() -> None:
    text = "include /usr/src/linux-headers-6.1.0-56-common/Makefile\n"

    assert zfs.relocate_headers_makefile(text, Path("/c/w/root")) == \
        "include /c/w/root/usr/src/linux-headers-6.1.0-56-common/Makefile\n"


def test_missing_modules_names_what_modprobe_zfs_would_lack() -> None:
    assert zfs.missing_modules(list(zfs.MODULES)) == []
    assert zfs.missing_modules([m for m in zfs.MODULES if m not in ("spl", "zzstd")]) == ["spl", "zzstd"]


@pytest.mark.parametrize(("environ", "enabled"), [({}, True), ({"KEYD_LAB_ZFS": "1"}, True),
                                                  ({"KEYD_LAB_ZFS": "0"}, False)])
def test_zfs_is_on_unless_switched_off(environ: dict[str, str], enabled: bool) -> None:
    assert zfs.zfs_enabled(environ) is enabled


# ----- the cache, with dkms and friends scripted ------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kernel:
    """A plain cached kernel tree, as kernel.py leaves it, under a private cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "keyd-lab" / "kernel" / "k" / "root"
    release = root / "lib" / "modules" / PLAN.kernel_release
    (release / "kernel" / "fs").mkdir(parents=True)
    (release / "kernel" / "fs" / "xfs.ko").write_bytes(b"xfs")
    (release / "modules.dep").write_text("kernel/fs/xfs.ko:\n")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinux-{PLAN.kernel_release}").write_bytes(b"\x7fELF")
    return Kernel("linux-image-6.1.0-56-amd64", PLAN.kernel_version, PLAN.kernel_release, root)


def fake_build_host(built: Sequence[str] = zfs.MODULES) -> ScriptedRunner:
    """apt, dpkg-deb, dkms and depmod, each leaving the files the real one would."""
    work = zfs.zfs_root() / (PLAN.key + ".partial") / "work"

    def download(argv: Sequence[str]) -> Reply:
        (work / "debs" / "linux-headers.deb").write_bytes(b"deb")
        return Reply()

    def extract(argv: Sequence[str]) -> Reply:
        makefile = Path(argv[3]) / "usr/src/linux-headers-6.1.0-56-amd64/Makefile"
        makefile.parent.mkdir(parents=True, exist_ok=True)
        makefile.write_text("include /usr/src/linux-headers-6.1.0-56-common/Makefile\n")
        links = Path(argv[3]) / "lib/modules/6.1.0-56-amd64"
        links.mkdir(parents=True, exist_ok=True)
        for name in ("build", "source"):
            if not (links / name).is_symlink():
                (links / name).symlink_to(f"/usr/src/linux-headers-6.1.0-56-{name}")
        return Reply()

    def dkms_add(argv: Sequence[str]) -> Reply:
        tree = Path(argv[argv.index("--dkmstree") + 1])
        return Reply() if tree.is_dir() else Reply(stderr=f"Error! No write access to DKMS tree at {tree}",
                                                   returncode=1)

    def dkms_build(argv: Sequence[str]) -> Reply:
        PLAN.built_modules(work).mkdir(parents=True)
        for name in built:
            (PLAN.built_modules(work) / f"{name}.ko").write_bytes(name.encode())
        return Reply()

    def depmod(argv: Sequence[str]) -> Reply:
        (Path(argv[2]) / "lib/modules" / argv[3] / "modules.dep").write_text("updates/zfs/zfs.ko: ...\n")
        return Reply()

    return (ScriptedRunner().on("apt-cache", "policy", "zfs-dkms", reply=Reply(POLICY))
            .on("apt-get", "download", reply=download).on("dpkg-deb", "-x", reply=extract)
            .on("dkms", "add", reply=dkms_add).on("dkms", "build", reply=dkms_build)
            .on("depmod", reply=depmod))


def test_a_cold_build_adds_zfs_to_a_copy_of_the_modules_tree_and_a_cached_run_builds_nothing(
        kernel: Kernel) -> None:
    cold = fake_build_host()
    with_zfs = zfs.ensure_zfs(cold, kernel)

    updates = with_zfs.modules / PLAN.kernel_release / "updates" / "zfs"
    assert sorted(p.name for p in updates.iterdir()) == sorted(f"{m}.ko" for m in zfs.MODULES)
    assert with_zfs.vmlinux.read_bytes() == b"\x7fELF"
    assert (with_zfs.release, with_zfs.version) == (kernel.release, kernel.version)
    assert (kernel.modules / PLAN.kernel_release / "modules.dep").read_text() == "kernel/fs/xfs.ko:\n"
    assert not (kernel.modules / PLAN.kernel_release / "updates").exists()
    entry = zfs.zfs_root() / PLAN.key
    assert json.loads((entry / "manifest.json").read_text())["zfs_version"] == PLAN.zfs_version
    assert not (entry / "work").exists()
    assert cold.argvs("dkms")[1][-1].endswith("/work/root/lib/modules/6.1.0-56-amd64/build")
    assert [a[:2] for a in cold.argvs("dkms")] == [("dkms", "add"), ("dkms", "build")]

    cached = fake_build_host()
    assert zfs.ensure_zfs(cached, kernel) == with_zfs
    assert cached.argvs("dkms") == [] and cached.argvs("apt-get") == []


def test_a_build_that_lacks_a_module_fails_naming_it_and_caches_nothing(kernel: Kernel) -> None:
    with pytest.raises(ZfsBuildError, match="dkms built no spl"):
        zfs.ensure_zfs(fake_build_host(built=[m for m in zfs.MODULES if m != "spl"]), kernel)

    assert not (zfs.zfs_root() / PLAN.key).exists()


def test_without_apt_a_cached_build_for_this_kernel_is_used_else_the_fix_is_given(kernel: Kernel) -> None:
    no_contrib = ScriptedRunner().on("apt-cache", reply=Reply("zfs-dkms:\n  Candidate: (none)\n"))
    with pytest.raises(ZfsBuildError, match="contrib") as raised:
        zfs.ensure_zfs(no_contrib, kernel)
    assert "make deps" in (raised.value.fix or "")

    built = zfs.ensure_zfs(fake_build_host(), kernel)
    offline = ScriptedRunner().on("apt-cache", reply=Reply(returncode=100))
    assert zfs.ensure_zfs(offline, kernel) == built
