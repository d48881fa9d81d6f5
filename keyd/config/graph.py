"""Checks on a volume's layer graph, and its bottom-up order.

The graph must be a tree growing downwards from one top layer: every ``below``
reference names a layer of the same volume, no layer sits on itself (directly
or not), no layer is shared by two upper layers, and each kind sits on the
kinds it can use (a loop image lives in a mounted filesystem; a filesystem
lives on a block device).
"""

from __future__ import annotations

from collections.abc import Iterable

from keyd.config.fields import Source
from keyd.config.model import Layer

# Which kinds each kind may sit on, and how many lower layers it takes.
_LOWER_KINDS = {"crypt": ("raid", "crypt", "loop"), "mount": ("raid", "crypt", "loop"),
                "loop": ("mount",), "raid": (), "zfs": ("crypt",)}
_LOWER_COUNT = {"crypt": (0, 1), "mount": (0, 1), "loop": (1, 1), "raid": (0, 0),
                "zfs": (1, 64)}


def order_layers(source: Source, volume: str,
                 layers: dict[str, Layer]) -> tuple[tuple[Layer, ...], str]:
    """Validate the graph; return the layers bottom-up and the name of the top layer."""
    if not layers:
        raise source.error(f"volume.{volume}", None, f"volume {volume!r} has no layers",
                           f"add at least one [volume.{volume}.layer.<name>] table")
    for layer in layers.values():
        _check_lowers(source, volume, layer, layers)
    _check_shared(source, volume, layers.values())
    _check_subdevice_names(source, volume, layers)
    ordered = _bottom_up(source, volume, layers)
    return ordered, _top(source, volume, layers)


def _where(volume: str, layer: str) -> str:
    return f"volume.{volume}.layer.{layer}"


def _check_lowers(source: Source, volume: str, layer: Layer, layers: dict[str, Layer]) -> None:
    low, high = _LOWER_COUNT.get(layer.kind, (0, len(layer.below)))
    if not low <= len(layer.below) <= high:
        count = "exactly one layer" if low == high == 1 else f"at most {high} layer(s)"
        raise source.error(_where(volume, layer.name), "below",
                           f"a {layer.kind} layer sits on {count}, not {len(layer.below)}",
                           "fix the below list")
    for name in layer.below:
        lower = layers.get(name)
        if lower is not None and lower.kind == "zfs":
            raise source.error(_where(volume, layer.name), "below",
                               f"nothing sits on zfs layer {name!r}: zfs mounts the pool's "
                               "datasets itself", f"remove layer {layer.name!r}; set the "
                               "datasets' mountpoint property (or the zfs layer's altroot)")
        if lower is None:
            known = ", ".join(sorted(layers))
            raise source.error(_where(volume, layer.name), "below",
                               f"below names {name!r}, which is not a layer of volume {volume!r}",
                               f"use one of: {known}")
        allowed = _LOWER_KINDS.get(layer.kind)
        if allowed is not None and lower.kind not in allowed:
            raise source.error(_where(volume, layer.name), "below",
                               f"a {layer.kind} layer cannot sit on {lower.kind} layer {name!r}",
                               f"a {layer.kind} layer sits on: {', '.join(allowed)}")


def _check_shared(source: Source, volume: str, layers: Iterable[Layer]) -> None:
    users: dict[str, str] = {}
    for layer in layers:
        for name in layer.below:
            if name in users:
                raise source.error(_where(volume, layer.name), "below",
                                   f"layer {name!r} is already used by layer {users[name]!r}",
                                   "a layer can carry only one layer above it")
            users[name] = layer.name


def _check_subdevice_names(source: Source, volume: str, layers: dict[str, Layer]) -> None:
    # cryptsetup names the extra mappings of a TrueCrypt cipher cascade <name>_1, <name>_2...
    for name in layers:
        stem, _, suffix = name.rpartition("_")
        lower = layers.get(stem)
        if suffix.isdigit() and lower is not None and lower.kind == "crypt":
            raise source.error(_where(volume, name), None,
                               f"layer name {name!r} clashes with cryptsetup's helper mappings "
                               f"for layer {stem!r}", "rename the layer")


def _bottom_up(source: Source, volume: str, layers: dict[str, Layer]) -> tuple[Layer, ...]:
    done: list[Layer] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = " -> ".join((*path[path.index(name):], name))
            raise source.error(_where(volume, name), "below", f"layers form a cycle: {cycle}",
                               "a layer cannot sit (directly or not) on itself")
        state[name] = "active"
        for lower in layers[name].below:
            visit(lower, (*path, name))
        state[name] = "done"
        done.append(layers[name])

    for name in layers:
        visit(name, ())
    return tuple(done)


def _top(source: Source, volume: str, layers: dict[str, Layer]) -> str:
    used = {name for layer in layers.values() for name in layer.below}
    tops = [name for name in layers if name not in used]
    if len(tops) != 1:
        names = ", ".join(tops) or "none"
        raise source.error(f"volume.{volume}", None,
                           f"volume {volume!r} must have exactly one top layer, found: {names}",
                           "connect the layers with below = [...] or split them into volumes")
    return tops[0]
