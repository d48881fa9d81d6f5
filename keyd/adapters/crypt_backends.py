"""The crypt port keyd runs with: dm-crypt where the kernel has it, else keyd's userspace crypto.

A layer's ``backend`` decides: ``kernel`` (cryptsetup, dm-crypt), ``userspace``
(:mod:`keyd.adapters.usercrypt`: FUSE + loop) or ``auto``, dm-crypt when this kernel
offers it (loaded, built in, or a module that is not disabled), else userspace. Closing
goes to whichever backend holds the mapping, whatever the config says now: a layer opened
in userspace before a kernel upgrade still closes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from keyd.adapters.usercrypt import UserspaceCrypt
from keyd.config.model import CryptLayer
from keyd.engine.ports import CryptPort
from keyd.errors import ProgramError
from keyd.runner import Runner

log = logging.getLogger("keyd.engine")

NO_DM_CRYPT = "dm-crypt missing: using userspace crypto"
# modprobe.d's usual way to disable a module ("install dm_crypt /bin/false") still exits 0.
DISABLED = (["install", "/bin/false"], ["install", "/bin/true"])


class DmCryptProbe:
    """Whether this kernel can make dm-crypt mappings (a positive answer is kept).

    keyd.service may not load modules (no CAP_SYS_MODULE): the kernel loads dm_crypt itself
    when cryptsetup first asks for the target, so the question is whether it could, which
    ``modprobe --dry-run`` answers without loading anything.
    """

    def __init__(self, runner: Runner, root: str = "/") -> None:
        self.runner = runner
        self.root = Path(root)
        self._present = False

    def __call__(self) -> bool:
        """True when dm_crypt is loaded, built in, or a module the kernel may load."""
        if not self._present:
            self._present = self._probe()
        return self._present

    def _probe(self) -> bool:
        if (self.root / "sys" / "module" / "dm_crypt").is_dir():
            return True
        try:
            done = self.runner.run(["modprobe", "--dry-run", "--verbose", "dm_crypt"],
                                   ok_codes=(0, 1), timeout=30)
        except ProgramError:
            return False
        return done.returncode == 0 and not any(
            line.split()[:2] in DISABLED for line in done.stdout.splitlines())


class CryptBackends:
    """The :class:`~keyd.engine.ports.CryptPort` that picks the backend per layer."""

    def __init__(self, kernel: CryptPort, userspace: UserspaceCrypt, probe: DmCryptProbe) -> None:
        self.kernel = kernel
        self.userspace = userspace
        self.probe = probe

    def uses_userspace(self, layer: CryptLayer) -> bool:
        """Whether ``layer`` opens with keyd's userspace crypto on this kernel."""
        if layer.backend != "auto":
            return layer.backend == "userspace"
        return layer.type != "luks" and not self.probe()

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        """See CryptPort.open."""
        if self.uses_userspace(layer):
            if layer.backend == "auto":
                log.info("%s of volume %s: %s", layer.name, volume, NO_DM_CRYPT)
            return self.userspace.open(volume, layer, device, dm_name, key, keyfiles=keyfiles)
        return self.kernel.open(volume, layer, device, dm_name, key, keyfiles=keyfiles)

    def close(self, dm_name: str) -> None:
        """See CryptPort.close."""
        if self.userspace.serves(dm_name):
            self.userspace.close(dm_name)
        else:
            self.kernel.close(dm_name)
