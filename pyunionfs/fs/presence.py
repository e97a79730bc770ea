"""Which lower layers hold a name: read once per directory, answered from memory.

Why: a lookup in a merged directory asks every layer the directory spans,
top-down, until one has the name.  With one ``lstat`` per layer (and one
more for an OCI ``.wh.NAME``) a name that lives in the bottom of a
128-layer image costs 255 failed syscalls, about 7 µs a layer in Python.
The kernel's overlayfs pays a hashed dcache lookup per layer;
fuse-overlayfs reads each layer's directory once and answers from memory.
We do the latter, for lower layers only: they do not change under a mount
(the same assumption the kernel makes; ``drop-caches`` forgets everything
here too), so a directory's names, read once, answer every later lookup in
it.  The upper is always asked (it changes under us).

Bounded, in memory and in work:

- only directories a merged directory spans with at least
  :data:`MIN_LAYERS` layers are read; below that a syscall per layer is
  cheaper than a listing;
- a layer directory of more than :data:`MAX_DIR_NAMES` names is not kept
  (``None``: ask it with ``lstat``, as before), so one huge directory does
  not cost its size in memory for a few lookups;
- past :data:`MAX_NAMES` names kept in all, the least recently used
  directories are forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterator
from itertools import compress, repeat
from operator import contains, or_

#: Layers a merged directory must span for its lower directories to be read.
MIN_LAYERS = 4
#: A lower directory with more names than this is asked name by name instead.
MAX_DIR_NAMES = 20_000
#: Names kept in all directories together (about 70 bytes each).
MAX_NAMES = 1_000_000

#: One layer of a merged directory: the layer, and the names its directory
#: holds there, or None where the layer must be asked (the upper, a huge directory).
LayerPresence = tuple[int, frozenset[bytes] | None]


class _Asked:
    """Stands for a layer that must be asked: it may hold any name."""

    __slots__ = ()

    def __contains__(self, name: object) -> bool:
        return True


_ASKED = _Asked()


class Presence:
    """Per layer of a merged directory, top-down: the names it holds there.

    *sets* runs beside *layers* (``_ASKED`` for None), so that :func:`candidates`
    tests every layer in C (``map``/``compress``), not in a Python loop: at 128
    layers that loop was the largest single cost of a lookup.
    """

    __slots__ = ("layers", "sets")

    def __init__(self, layers: tuple[LayerPresence, ...]) -> None:
        self.layers = layers
        self.sets: tuple[Container[bytes], ...] = tuple(_ASKED if names is None else names for _, names in layers)

    def __iter__(self) -> Iterator[LayerPresence]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class LayerNames:
    """The names of lower layers' directories, keyed by the merged directory
    (its path in the layers and the layers it spans)."""

    def __init__(self, listdir: Callable[[int, bytes], list[bytes]], writable: Callable[[int], bool],
                 max_names: int = MAX_NAMES) -> None:
        self._listdir = listdir
        self._writable = writable
        self._dirs: OrderedDict[tuple[bytes, tuple[int, ...]], Presence] = OrderedDict()
        self._size = 0
        self.max_names = max_names

    def get(self, rel: bytes, layers: tuple[int, ...]) -> Presence | None:
        """The presence of each layer of the merged directory *rel*, or None
        when it spans too few layers to be worth reading."""
        if len(layers) < MIN_LAYERS:
            return None
        key = (rel, layers)
        known = self._dirs.get(key)
        if known is not None:
            self._dirs.move_to_end(key)
            return known
        presence = Presence(tuple((layer, self._read(layer, rel)) for layer in layers))
        self._dirs[key] = presence
        self._size += _count(presence)
        while self._size > self.max_names and len(self._dirs) > 1:
            _, old = self._dirs.popitem(last=False)
            self._size -= _count(old)
        return presence

    def _read(self, layer: int, rel: bytes) -> frozenset[bytes] | None:
        if self._writable(layer):
            return None
        try:
            names = self._listdir(layer, rel)
        except (FileNotFoundError, NotADirectoryError):
            return frozenset()  # the layer has no such directory: it holds no name there
        except OSError:
            return None  # unreadable (or a symlink where a directory was): ask name by name
        return frozenset(names) if len(names) <= MAX_DIR_NAMES else None

    def clear(self) -> None:
        """Forget everything (``drop-caches``: a lower may have changed)."""
        self._dirs.clear()
        self._size = 0

    @property
    def size(self) -> int:
        """Names kept, in all directories together."""
        return self._size


def _count(presence: Presence) -> int:
    return sum(len(names) for _, names in presence.layers if names is not None)


def candidates(presence: Presence, name: bytes, whiteout: bytes | None) -> list[LayerPresence]:
    """The layers that may answer for *name*, each with its names (None: ask
    it): those that hold *name* or its OCI whiteout *whiteout*, and those that
    must be asked."""
    sets = presence.sets
    held = map(contains, sets, repeat(name))
    if whiteout is not None:
        held = map(or_, held, map(contains, sets, repeat(whiteout)))
    return list(compress(presence.layers, held))


__all__ = ["MAX_DIR_NAMES", "MAX_NAMES", "MIN_LAYERS", "LayerNames", "LayerPresence", "Presence", "candidates"]
