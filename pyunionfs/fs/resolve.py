"""Pure union logic: which layer (or layers) a merged name comes from.

The rules are overlayfs's (``fs/overlayfs/namei.c``), applied top-down over the
layers in which the parent directory exists:

* the first layer that has the name wins;
* a whiteout (any format of :mod:`.markers`) ends the search: the name is gone;
* a non-directory ends the search;
* a directory merges with the directories of the same name below it, until a
  layer where it is opaque, or a layer where the name is a non-directory or a
  whiteout (those end the merge without being shown).

Answers are kept in a :class:`~.cache.ResolutionCache` until the write path
reports a change; the rules themselves live in :meth:`Resolver._resolve`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from itertools import repeat
from typing import Protocol

from . import origin
from .cache import ResolutionCache
from .entry import Entry
from .layers import LayerStack
from .markers import OPAQUE, XWHITEOUTS, Markers
from .paths import check_name, join, proc_path
from .presence import LayerNames, LayerPresence, candidates


class IndexView(Protocol):
    """The work dir's ``index/`` as the resolver reads it (see :class:`.upper.Upper`)."""

    index: int
    index_keys: set[bytes]


class Resolver:
    """Applies the union rules to a :class:`LayerStack`."""

    def __init__(self, stack: LayerStack, markers: Markers) -> None:
        self.stack = stack
        self.markers = markers
        #: (st_dev, st_ino) of copied-up objects -> the identity of their
        #: lower original, learnt at copy-up or from an origin record.
        self.origins: dict[tuple[int, int], tuple[int, int]] = {}
        #: The upper's hard-link index, when the mount writes one: a lower
        #: file with several links resolves to its index copy if it has one.
        self.index: IndexView | None = None
        self.cache = ResolutionCache()
        #: The names of lower directories of merged directories spanning many
        #: layers, so that a lookup skips the layers that lack the name.
        self.presence = LayerNames(stack.listdir, lambda layer: stack.layers[layer].writable)

    def root(self) -> Entry:
        """The root merges every layer: overlayfs ignores opacity at the root."""
        layers = tuple(range(len(self.stack.layers)))
        sts = [self.stack.stat_self(i, b"") for i in layers]
        xwh = tuple(i for i in layers if self.markers.opaque(self.stack, i, b"") == XWHITEOUTS)
        return Entry(layers, sts[0], (sts[-1].st_dev, sts[-1].st_ino), xwh)

    def child(self, parent: Entry, parent_rel: bytes, name: bytes) -> Entry | None:
        """Resolve *name* in the merged directory *parent*; None if it is not there.

        A cached answer for an upper object is checked with one lstat of it,
        which also gives fresh attributes; one for a lower object is used
        as it is (lowers do not change under a mount).
        """
        check_name(name)
        if self.markers.is_oci_marker(name):
            return None
        known, cached = self.cache.lookup(parent.ident, name)
        if known:
            if cached is None:
                return None
            layer = cached.layers[0]
            if not self.stack.layers[layer].writable:
                return cached  # a lower object: its attributes cannot change under the mount
            st = self.stack.lstat(layer, parent_rel, name)
            if st is not None and stat.S_IFMT(st.st_mode) == stat.S_IFMT(cached.st.st_mode):
                nlink = self.merged_nlink(layer, join(parent_rel, name), st) if cached.nlink is not None or (
                    self.stack.layers[layer].writable and st.st_nlink > 1) else None
                return Entry(cached.layers, st, cached.ident, cached.xwh, nlink)
        entry = self._resolve(parent, parent_rel, name)
        if entry is None or entry.is_dir or entry.linked_up or (entry.st.st_nlink < 2 and entry.index is None) or (
            self.index is None
        ):
            # (A lower hard link may get an index copy through another name
            # at any time, and an index copy has no name here to lstat: both
            # are resolved afresh each time.)
            self.cache.store(parent.ident, name, entry)
        return entry

    def _resolve(self, parent: Entry, parent_rel: bytes, name: bytes) -> Entry | None:
        stack = self.stack
        markers = self.markers
        rel = join(parent_rel, name)
        dirs: list[int] = []
        top: os.stat_result | None = None
        low: os.stat_result | None = None
        xwh: list[int] = []
        last = parent.layers[-1]
        # Each layer to ask, with the names its directory holds when they were
        # read (fs/presence.py): then the layers that hold neither the name nor
        # its .wh.name are skipped, and no .wh.name is looked for with lstat.
        layers: Iterable[LayerPresence]
        presence = self.presence.get(parent_rel, parent.layers)
        if presence is not None:
            layers = candidates(presence, name, markers.oci_whiteout_name(name))
        else:
            layers = zip(parent.layers, repeat(None))
        for layer, held in layers:
            st = stack.lstat(layer, parent_rel, name) if held is None or name in held else None
            if st is None:
                if markers.oci_whiteout(stack, layer, parent_rel, name, held):
                    break
                continue
            if markers.is_whiteout(st, layer in parent.xwh, stack, layer, parent_rel, name):
                break
            if not stat.S_ISDIR(st.st_mode):
                if dirs:
                    break  # a non-directory below a directory ends the merge
                ident = (st.st_dev, st.st_ino)
                if stack.layers[layer].writable:
                    if layer + 1 < len(stack.layers):
                        ident = self._origin(parent, parent_rel, name, layer, ident)
                    return Entry((layer,), st, ident, nlink=self.merged_nlink(layer, rel, st))
                if st.st_nlink > 1 and self.index is not None and self.index.index_keys:
                    indexed = self._indexed(layer, parent_rel, name, ident)
                    if indexed is not None:
                        return indexed
                return Entry((layer,), st, ident)
            dirs.append(layer)
            top = top or st
            low = st
            opaque = markers.opaque(stack, layer, rel)
            if opaque == XWHITEOUTS:
                xwh.append(layer)
            if layer == last:
                break
            if opaque == OPAQUE or markers.oci_opaque(stack, layer, parent_rel, name, held):
                break
        if top is None or low is None:
            return None
        return Entry(tuple(dirs), top, (low.st_dev, low.st_ino), tuple(xwh))

    def _indexed(self, layer: int, parent_rel: bytes, name: bytes, ident: tuple[int, int]) -> Entry | None:
        """The index copy of lower hard link *name*, if one of its names was
        copied up (overlayfs's index=on): every name shows that one object.
        Nothing is written: the name is linked into the upper only when it
        is itself copied up (overlayfs's ``ovl_link_up``)."""
        assert self.index is not None
        record = origin.of(self.stack.dirfd(layer, parent_rel), name)
        if record is None:
            return None
        key = origin.index_name(record)
        if key not in self.index.index_keys:
            return None
        try:
            st = os.stat(key, dir_fd=self.index.index, follow_symlinks=False)
        except FileNotFoundError:
            return None
        nlink = self.nlink_of(proc_path(self.index.index, key), False, st) if st.st_nlink > 1 else None
        return Entry((0,), st, ident, nlink=nlink, index=key)

    def names(self, d: Entry, rel: bytes) -> list[bytes]:
        """Candidate names of merged directory *d*, each once, top layer's order first.

        Candidates still go through :meth:`child`: a name here may be whited
        out.  Marker files are never candidates.
        """
        cached = self.cache.names(d.ident)
        if cached is not None:
            return cached
        seen: set[bytes] = set()
        out: list[bytes] = []
        for layer in d.layers:
            for n in self.stack.listdir(layer, rel):
                if n not in seen and not self.markers.is_oci_marker(n):
                    seen.add(n)
                    out.append(n)
        self.cache.store_names(d.ident, out)
        return out

    def listing(self, d: Entry, rel: bytes) -> list[tuple[bytes, Entry]]:
        """The merged directory's visible entries."""
        out = []
        for n in self.names(d, rel):
            e = self.child(d, rel, n)
            if e is not None:
                out.append((n, e))
        return out

    def merged_nlink(self, layer: int, rel: bytes, st: os.stat_result) -> int | None:
        """The link count an upper file shows: its ``overlay.nlink`` record
        when it is an indexed copy of a lower hard link (counting the names
        still only in lower layers, less the index's own link)."""
        if st.st_nlink < 2 or stat.S_ISDIR(st.st_mode):
            return None
        path, follow = self.stack.entry_path(layer, rel)
        return self.nlink_of(path, follow, st)

    def nlink_of(self, path: bytes, follow: bool, st: os.stat_result, unlinked: bool = False) -> int | None:
        """The merged link count that the ``overlay.nlink`` record of the
        object at *path* gives (see :func:`.origin.parse_nlink`); None without one."""
        for xname in self.markers.nlink_names:
            try:
                value = os.getxattr(path, xname, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
                continue
            return origin.parse_nlink(value, st.st_nlink, st.st_nlink, unlinked)
        return None

    def _origin(
        self, parent: Entry, parent_rel: bytes, name: bytes, layer: int, ident: tuple[int, int]
    ) -> tuple[int, int]:
        """The identity a copied-up non-directory keeps: its lower original's.

        Known copies are remembered; otherwise the object's origin record is
        checked against the entry of the same name in the layers below (the
        kernel decodes the handle instead, which would mean opening objects
        by handle, possibly outside a layer).
        """
        known = self.origins.get(ident)
        if known is not None:
            return known
        rel = join(parent_rel, name)
        record = None
        for xname in self.markers.origin_names:
            try:
                record = self.stack.getxattr(layer, rel, xname)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        if record is None:
            return ident
        below = parent.layers[parent.layers.index(layer) + 1 :]
        for lower in below:
            st = self.stack.lstat(lower, parent_rel, name)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode) and origin.same_object(record, self.stack.dirfd(lower, parent_rel), name):
                self.origins[ident] = (st.st_dev, st.st_ino)
                return self.origins[ident]
            break
        found = origin.identity(record, [lay.fd for lay in self.stack.layers[layer + 1 :]])
        if found is not None and any(found[0] == lay.dev for lay in self.stack.layers[layer + 1 :]):
            self.origins[ident] = found
            return found
        return ident
