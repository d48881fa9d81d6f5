"""cryptsetup: open/close LUKS, plain, TrueCrypt and VeraCrypt mappings; key on stdin only.

How the key reaches cryptsetup matters for plain mode (cryptsetup(8), "NOTES ON
PASSPHRASE PROCESSING FOR PLAIN MODE"; cryptsetup's src/cryptsetup.c):

- a *hashed passphrase* (``hash`` set) is written to stdin without ``--key-file``:
  cryptsetup reads up to the newline and applies ``--hash``, exactly as when
  typed at a terminal (seed 004: aes + ripemd160); hashed *binary* keys go
  with ``--key-file=- --keyfile-size=N``, which cryptsetup also hashes;
- a *raw key* (plain without ``hash``) is what ``--key-file FILE`` gives: the
  first key_size/8 bytes, unhashed. keyd cuts those bytes itself and passes
  them with ``--key-file=- --hash plain`` (stdin is hashed unless the hash is
  "plain"), so no key ever lands in a file (seed 001);
- LUKS reads the key bytes verbatim with ``--key-file=-``;
- TCRYPT's ``--key-file`` means TrueCrypt keyfiles, so its passphrase goes to
  stdin without it; keyfiles from a key bundle go as ``--key-file`` memfd paths
  (keyd.memfd), one per keyfile, and with keyfiles the passphrase may be empty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from keyd.adapters.retry import Retry
from keyd.config.model import CryptLayer
from keyd.engine.errors import KeyRejected, StorageError
from keyd.errors import ProgramError
from keyd.memfd import memfd_path
from keyd.runner import Runner

# Key derivation can be slow: VeraCrypt without a pinned PRF tries every hash.
_TIMEOUTS = {"plain": 60.0, "luks": 300.0, "tcrypt": 600.0, "veracrypt": 600.0}
# cryptsetup's TCRYPT code matches --hash against its own PRF names with strcmp
# (lib/tcrypt/tcrypt.c, tcrypt_kdf[]): VeraCrypt's Streebog is "stribog512" there;
# `--hash streebog` would silently try no PRF at all and look like a wrong passphrase.
_TCRYPT_PRF = {"streebog": "stribog512"}


@dataclass(frozen=True)
class OpenCommand:
    """argv and the bytes for stdin of one ``cryptsetup open``."""

    argv: tuple[str, ...]
    stdin: bytes


def shape_key(volume: str, layer: CryptLayer, key: bytes | bytearray,
              with_keyfiles: bool = False) -> bytes:
    """The exact bytes cryptsetup must read for ``layer`` (see the module docstring)."""
    data = bytes(key)
    if layer.key_format == "passphrase":
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        if not data and not with_keyfiles:
            raise KeyRejected(f"the passphrase for {layer.name} of volume {volume} is empty")
    if layer.raw_key:
        need = (layer.key_size or 0) // 8
        data = data[layer.keyfile_offset:layer.keyfile_offset + need]
        if len(data) < need:
            raise KeyRejected(
                f"the key for {layer.name} of volume {volume} is too short: plain key_size "
                f"{layer.key_size} needs {need} bytes after keyfile_offset "
                f"{layer.keyfile_offset}, got {len(data)}",
                fix="supply the original key file (its first bytes are the cipher key)")
    return data


def _line(volume: str, layer: CryptLayer, data: bytes) -> bytes:
    # Read "until the first newline": a line break inside would silently cut the passphrase.
    if b"\n" in data:
        raise KeyRejected(f"the passphrase for {layer.name} of volume {volume} contains a "
                          "line break", fix="a passphrase is one line of text")
    return data + b"\n"


def open_command(volume: str, layer: CryptLayer, device: str, dm_name: str,
                 key: bytes | bytearray, *, keyfile_paths: Sequence[str] = ()) -> OpenCommand:
    """The cryptsetup argv and stdin that open ``layer``. Pure; key only in stdin, keyfiles
    (TrueCrypt/VeraCrypt only) as paths of in-memory files."""
    if keyfile_paths and layer.type not in ("tcrypt", "veracrypt"):
        raise KeyRejected(f"the key bundle has keyfiles for {layer.name} of volume {volume}, "
                          f"a {layer.type} layer", fix="keyfiles are for TrueCrypt/VeraCrypt "
                          "layers: enroll the key as a key (kind \"key\")")
    data = shape_key(volume, layer, key, bool(keyfile_paths))
    if layer.type == "luks":
        return OpenCommand(("cryptsetup", "open", "--type", "luks", "--key-file=-",
                            *_flags(layer), device, dm_name), data)
    if layer.type == "plain":
        return _plain(volume, layer, device, dm_name, data)
    options = ["--veracrypt"] if layer.type == "veracrypt" else ["--disable-veracrypt"]
    options += _when(layer.hidden, "--tcrypt-hidden") + _when(layer.system, "--tcrypt-system")
    options += _when(layer.backup_header, "--tcrypt-backup")
    if layer.pim is not None:
        options.append(f"--veracrypt-pim={layer.pim}")
    prf = _TCRYPT_PRF.get(layer.hash, layer.hash) if layer.hash is not None else None
    options += _value("--hash", prf) + _value("--cipher", layer.cipher)
    options += [arg for path in keyfile_paths for arg in ("--key-file", path)]
    return OpenCommand(("cryptsetup", "open", "--type", "tcrypt", *options, *_flags(layer),
                        device, dm_name), _line(volume, layer, data))


def _plain(volume: str, layer: CryptLayer, device: str, dm_name: str,
           data: bytes) -> OpenCommand:
    # --batch-mode: no "device has a signature, proceed?" question eating stdin.
    options = ["--batch-mode", "--cipher", str(layer.cipher), "--key-size", str(layer.key_size),
               "--offset", str(layer.offset), "--skip", str(layer.skip)]
    options += _value("--sector-size", layer.sector_size)
    options += _when(layer.iv_large_sectors, "--iv-large-sectors")
    if layer.raw_key:
        options += ["--key-file=-", "--hash", "plain"]
    elif layer.key_format == "binary":
        # Binary bytes to hash: all of them (without --keyfile-size only key_size are read).
        options += ["--key-file=-", f"--keyfile-size={len(data)}", "--hash", str(layer.hash)]
    else:
        options += ["--hash", str(layer.hash)]
        data = _line(volume, layer, data)
    return OpenCommand(("cryptsetup", "open", "--type", "plain", *options, *_flags(layer),
                        device, dm_name), data)


def _when(flag: bool, option: str) -> list[str]:
    return [option] if flag else []


def _value(option: str, value: object) -> list[str]:
    return [option, str(value)] if value is not None else []


def _flags(layer: CryptLayer) -> list[str]:
    return _when(layer.readonly, "--readonly") + _when(layer.allow_discards, "--allow-discards")


class Cryptsetup:
    """The :class:`~keyd.engine.ports.CryptPort` that runs cryptsetup."""

    def __init__(self, runner: Runner, retry: Retry | None = None) -> None:
        self.runner = runner
        self.retry = retry or Retry()

    def open(self, volume: str, layer: CryptLayer, device: str, dm_name: str,
             key: bytes | bytearray, *, keyfiles: Sequence[bytes | bytearray] = ()) -> str:
        """See CryptPort.open; exit 2 becomes KeyRejected ("wrong key for volume ...")."""
        try:
            with contextlib.ExitStack() as stack:
                paths = [stack.enter_context(memfd_path(keyfile)) for keyfile in keyfiles]
                command = open_command(volume, layer, device, dm_name, key, keyfile_paths=paths)
                self.runner.run(command.argv, secret=command.stdin,
                                timeout=_TIMEOUTS[layer.type])
        except ProgramError as exc:
            error = _open_error(volume, layer, device, dm_name, exc)
            if error is exc:
                raise
            raise error from exc
        return f"/dev/mapper/{dm_name}"

    def close(self, dm_name: str) -> None:
        """See CryptPort.close; exit 4 (no such device) means it is already closed."""
        try:
            self.retry.run(lambda: self.runner.run(["cryptsetup", "close", dm_name],
                                                   ok_codes=(0, 4)),
                           busy=lambda exc: exc.returncode == 5)
        except ProgramError as exc:
            if exc.returncode == 5:
                raise StorageError(f"{dm_name} is still in use and cannot be closed",
                                   fix="unmount what sits on it first") from exc
            raise


def _open_error(volume: str, layer: CryptLayer, device: str, dm_name: str,
                exc: ProgramError) -> Exception:
    code = exc.returncode
    if code == 2:
        what = "passphrase" if layer.key_format == "passphrase" else "key"
        return KeyRejected(f"wrong key for volume {volume} (cryptsetup exit 2)",
                           fix=f"check the {what} for {layer.name}"
                               + _tcrypt_hint(layer))
    if code == 5:
        return StorageError(f"cannot open {layer.name} of volume {volume}: {device} is busy or "
                            f"{dm_name} already exists (cryptsetup exit 5)",
                            fix="run `keydctl status` to see what holds it")
    if code == 4:
        return StorageError(f"cannot open {layer.name} of volume {volume}: cryptsetup rejects "
                            f"device {device} (exit 4)", fix="check the layer's device")
    return exc


def _tcrypt_hint(layer: CryptLayer) -> str:
    if layer.type not in ("tcrypt", "veracrypt"):
        return ""
    return "; also check hidden/system/pim/hash in keyd.toml (a wrong one looks like a wrong key)"
