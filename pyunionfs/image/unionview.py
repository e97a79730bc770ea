"""An upper over its lowers, read as the mount reads them: what a layer needs where an upper
keeps part of an entry below.

Two kinds of upper entries have their meaning partly in a lower layer:

* a metadata-only copy (``metacopy=on``): its data is a lower file, found
  as the mount finds it (under its name or its redirect);
* a directory renamed with ``redirect_dir=on``: its lower parts stay where
  they were, and its ``overlay.redirect`` record says where.  An image layer
  cannot express a move, so the directory goes into the layer opaque, with
  its whole merged subtree (whatever lies below its new name in the lowers
  is hidden, and everything it shows is in the layer); its old name is
  whited out in the upper already.

Both are answered by the mount's own :class:`~..fs.resolve.Resolver` over
the layers ``(upper, *lowers)``, read-only, so a layer cannot disagree with
what the mount showed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence

from ..errors import LayerError
from ..fs.entry import DataRef, Entry, StatLike
from ..fs.layers import LayerStack
from ..fs.markers import Markers
from ..fs.paths import join
from ..fs.resolve import Resolver

#: What a merged entry of a moved subtree becomes in the walk: (path, lstat,
#: user-visible xattrs, where its content is -- None for one of the upper's
#: own -- and whether it lies in the upper).
Shown = tuple[bytes, StatLike, tuple[tuple[bytes, bytes], ...], DataRef | None, bool]


class UnionView:
    """The merged view of an upper and its lowers (opened at the first need, closed with the walk)."""

    def __init__(self, upper: bytes, lowers: Sequence[bytes], markers: Markers) -> None:
        self.resolver = Resolver(LayerStack((upper, *lowers), writable_top=False), markers)
        self.resolver.metacopy = True  # (a layer holds what the data is, whatever the mount's option)
        self.stack = self.resolver.stack
        self.markers = markers

    def close(self) -> None:
        self.stack.close()

    def entry(self, rel: bytes) -> Entry:
        """The merged entry at *rel*; LayerError when it is not there or cannot be read."""
        try:
            found = self.resolver.walk(self.resolver.root(), rel)
        except OSError as exc:
            raise LayerError(f"{_show(rel)}: cannot be read through the lowers: {exc.strerror}") from None
        if found is None:
            raise LayerError(f"{_show(rel)}: not found through the upper and the lowers given")
        return found

    def lowerdata(self, rel: bytes) -> DataRef:
        """Where metadata-only copy *rel* has its data."""
        data = self.entry(rel).data
        if data is None:
            raise LayerError(f"{_show(rel)}: its data cannot be found in the lowers given")
        return data

    def children(self, rel: bytes, visible: Callable[[int, bytes], tuple[tuple[bytes, bytes], ...]]) -> list[Shown]:
        """The merged entries of directory *rel*, sorted by name, each as
        :data:`Shown`; *visible* (layer, real path) gives an entry's
        user-visible xattrs."""
        resolver, stack = self.resolver, self.stack
        out: list[Shown] = []
        try:
            listing = resolver.listing(self.entry(rel), rel)
        except OSError as exc:
            raise LayerError(f"{_show(rel)}: cannot be listed through the lowers: {exc.strerror}") from None
        for name, e in sorted(listing):
            path = join(rel, name)
            layer = e.layers[0]
            real = stack.real(layer, path)
            if e.data is not None:
                data: DataRef | None = e.data
            elif layer == 0 or stat.S_ISDIR(e.st.st_mode):
                data = None
            else:
                data = DataRef(layer, real, e.st.st_blocks)
            out.append((path, e.st, visible(layer, real), data, layer == 0))
        return out


def _show(path: bytes) -> str:
    return os.fsdecode(path) or "."
