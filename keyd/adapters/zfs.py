"""The zpool adapter: import and export the pools of zfs layers through the runner.

Imports always use ``cachefile=none``: the pool's vdevs exist only while keyd
has their crypt layers open, so the system's zfs-import-cache must never try
to import the pool at boot. A failed import that left the pool imported (a
dataset that would not mount) is exported again before the error is raised,
so the executor's rollback only has the mappings left to close.
"""

from __future__ import annotations

from keyd.config.model import ZfsLayer
from keyd.engine.errors import StorageError, VolumeBusy
from keyd.engine.observed import ObservedState, ZfsPool
from keyd.engine.zfs_output import LIST_COLUMNS, parse_zpool_list
from keyd.errors import ProgramError
from keyd.runner import Runner

# Known zpool import failures (a phrase of stderr) and what to do about them.
_IMPORT_FIXES = (
    # keyd.service may not load kernel modules (no CAP_SYS_MODULE), so libzfs cannot either.
    ("modules are not loaded", "load the zfs module: `modprobe zfs`, and at every boot: "
                               "`echo zfs > /etc/modules-load.d/zfs.conf`"),
    ("in use from other system", "the pool was last imported by another host: export it there, "
                                 "or import it once by hand with `zpool import -f`"),
    ("more than one matching pool", 'names clash: set guid = "<id>" for this layer in '
                                    "keyd.toml (`zpool import -d DIR` lists the ids)"),
    ("no such pool", "check that its crypt layers are the pool's devices: "
                     "`zpool import -d DIR` lists the pools found there"),
    ("one or more devices is currently unavailable", "open (or connect) the missing vdevs, or set "
                                                     'degraded = "always" for a mirror'),
)


def import_argv(layer: ZfsLayer) -> list[str]:
    """The ``zpool import`` command line for ``layer``."""
    argv = ["zpool", "import", "-d", layer.search_dir, "-o", "cachefile=none"]
    argv += ["-R", layer.altroot] if layer.altroot else []
    argv += ["-o", "readonly=on"] if layer.read_only else []
    argv += [] if layer.mount else ["-N"]
    return [*argv, layer.target]


def _last_line(exc: ProgramError) -> str:
    lines = exc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {exc.returncode}"


def _import_fix(stderr: str) -> str:
    return next((fix for phrase, fix in _IMPORT_FIXES if phrase in stderr),
                "see `zpool import -d DIR` and `dmesg`")


class Zpool:
    """The :class:`~keyd.engine.ports.ZfsPort` that runs zpool."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def import_pool(self, label: str, layer: ZfsLayer) -> ZfsPool:
        """``zpool import -d DIR -o cachefile=none [-R ALTROOT] [-o readonly=on] [-N] POOL``."""
        try:
            self.runner.run(import_argv(layer), timeout=300)
        except ProgramError as exc:
            left = self._find(layer)
            if left is not None:  # imported, but e.g. a dataset did not mount
                self.export_pool(label, left.name)
            raise StorageError(f"could not import pool {layer.label} for {label}: "
                               f"{_last_line(exc)}", fix=_import_fix(exc.stderr)) from exc
        pool = self._find(layer)
        if pool is None:
            raise StorageError(f"zpool import of {layer.label} for {label} succeeded but "
                               "`zpool list` does not show the pool",
                               fix="see `zpool list` and `zpool status -P`")
        return pool

    def _find(self, layer: ZfsLayer) -> ZfsPool | None:
        try:
            done = self.runner.run(["zpool", "list", "-H", "-p", "-o", LIST_COLUMNS], timeout=30)
        except ProgramError:
            return None
        return ObservedState(pools=parse_zpool_list(done.stdout)).pool(layer.pool, layer.guid)

    def export_pool(self, label: str, pool: str) -> None:
        """``zpool export POOL``; "busy" (a dataset in use) becomes VolumeBusy."""
        try:
            self.runner.run(["zpool", "export", pool], timeout=300)
        except ProgramError as exc:
            if "busy" in exc.stderr:
                raise VolumeBusy(label, (), [f"zpool export {pool}: {_last_line(exc)}"]) from exc
            raise StorageError(f"could not export pool {pool} of {label}: {_last_line(exc)}",
                               fix=f"see `zpool status -P {pool}`") from exc

    def online(self, label: str, pool: str, device: str) -> None:
        """``zpool online POOL DEVICE``; a vdev that stays faulted is an error."""
        try:
            done = self.runner.run(["zpool", "online", pool, device], timeout=120)
        except ProgramError as exc:
            raise StorageError(f"could not bring {device} back into pool {pool} of {label}: "
                               f"{_last_line(exc)}", fix=f"see `zpool status -P {pool}`") from exc
        if "remains in faulted state" in done.stdout + done.stderr:
            raise StorageError(f"{device} of {label} was onlined but pool {pool} still "
                               "faults it", fix=f"see `zpool status -P {pool}` and `dmesg`")
