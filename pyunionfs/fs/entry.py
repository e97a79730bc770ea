"""What one lookup finds: the layers a merged name lives in, and its identity.

Its own module because both the resolver that makes entries
(:mod:`.resolve`) and the cache that keeps them (:mod:`.cache`) need it,
and the cache must not import the resolver.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import NamedTuple


class DataRef(NamedTuple):
    """Where a metadata-only copy finds its data (the kernel's "lowerdata"):
    a regular file at *path* (its own path in that layer, not a merged one)
    of lower *layer*, with *blocks* its st_blocks, which the copy shows."""

    layer: int
    path: bytes
    blocks: int


@dataclass(frozen=True, slots=True)
class Entry:
    """Where a merged name lives, as found by one lookup."""

    #: Layers that make up the entry, topmost first.  A non-directory has one;
    #: a merged directory has every layer whose directory it merges.
    layers: tuple[int, ...]
    #: lstat of the entry in ``layers[0]``: what the mount shows.
    st: os.stat_result
    #: (st_dev, st_ino) that names the object for inode numbering.  For a
    #: directory it is the lowest merged layer's, so it does not change when a
    #: lower directory later gets a copy in the upper.
    ident: tuple[int, int]
    #: Layers in which this directory holds xattr whiteouts (opaque=x).
    xwh: tuple[int, ...] = ()
    #: The merged link count of an indexed hard-linked file (its
    #: ``overlay.nlink`` record); None means st_nlink.
    nlink: int | None = None
    #: The name in the work dir's ``index/`` of the object this entry shows,
    #: when the merged name itself is still only in a lower layer: a lower
    #: hard link whose copy-up was made through another of its names.  The
    #: object is that index copy (``layers == (0,)``, ``st`` is its lstat),
    #: but this name has no upper link yet.  None: the object is at the name.
    index: bytes | None = None
    #: The data of a metadata-only copy (an ``overlay.metacopy`` record on
    #: the object in ``layers[0]``, whose own content is a hole): reads go
    #: there until the first write copies it in.  None: the object holds its data.
    data: DataRef | None = None
    #: Layers in which this directory carries the overlay's ``impure``
    #: record (entries in it were copied up or moved there by an overlay):
    #: only there can a file be a metadata-only copy the kernel made.
    impure: tuple[int, ...] = ()

    @property
    def real(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the object in ``layers[0]``: what a path
        found for this entry must lead to (``ident`` may be an origin's)."""
        return self.st.st_dev, self.st.st_ino

    @property
    def linked_up(self) -> bool:
        """Whether the upper holds this object under this very name."""
        return self.layers[0] == 0 and self.index is None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def merged(self) -> bool:
        """A directory that unions more than one layer (overlayfs reports nlink 1)."""
        return len(self.layers) > 1
