"""The storage engine and its adapters with real programs: one wiring for keyd, keydctl and
the initramfs."""

from __future__ import annotations

from keyd.adapters.block import Losetup, Mdadm, Mounter
from keyd.adapters.crypt_backends import CryptBackends, DmCryptProbe
from keyd.adapters.cryptsetup import Cryptsetup
from keyd.adapters.system import ProcHolders, Systemctl
from keyd.adapters.usercrypt import UserspaceCrypt
from keyd.adapters.zfs import Zpool
from keyd.engine.lockfile import DEFAULT_RUN_DIR
from keyd.engine.observe import KernelObserver
from keyd.engine.ports import Storage
from keyd.engine.service import Engine
from keyd.runner import Runner


def real_storage(runner: Runner) -> Storage:
    """Every storage adapter (zpool included), running programs through ``runner``."""
    crypt = CryptBackends(Cryptsetup(runner), UserspaceCrypt(runner), DmCryptProbe(runner))
    return Storage(crypt, Mdadm(runner), Mounter(runner), Losetup(runner), Zpool(runner))


def real_engine(runner: Runner, run_dir: str = DEFAULT_RUN_DIR) -> Engine:
    """The storage engine on the real kernel: /proc, /sys and the programs of ``runner``."""
    return Engine(KernelObserver(runner), real_storage(runner), ProcHolders(), Systemctl(runner),
                  run_dir=run_dir)
