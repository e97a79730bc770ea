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
from collections.abc import Callable, Iterable, Iterator
from itertools import filterfalse, repeat
from typing import Protocol

from ..errors import fs_error
from . import origin
from .cache import ResolutionCache
from .entry import DataRef, Entry, Stat, only
from .layers import LayerStack, RealPaths, Scan
from .markers import OPAQUE, XWHITEOUTS, LayerView, Markers
from .paths import check_name, join, proc_path
from .presence import LayerNames, LayerPresence, candidates

_S_ISDIR = stat.S_ISDIR


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
        #: Whether ``overlay.redirect`` records are followed (the kernel's
        #: ``redirect_dir=follow``, what its default mode does here).
        self.follow = True
        #: Whether metadata-only copies are followed to their data (the
        #: kernel's ``metacopy=on``); else a lookup that meets one gives EPERM.
        self.metacopy = False
        self.real_paths = RealPaths(stack)

    def root(self) -> Entry:
        """The root merges every layer: overlayfs ignores opacity at the root."""
        layers = tuple(range(len(self.stack.layers)))
        sts = [self.stack.stat_self(i, b"") for i in layers]
        names = [self.stack.listxattr(i, b"") for i in layers]
        xwh = tuple(i for i in layers if self.markers.opaque(self.stack, i, b"", names[i]) == XWHITEOUTS)
        impure = tuple(i for i in layers if self.markers.has_record(names[i], b"impure"))
        return Entry(layers, Stat.of(sts[0]), (sts[-1].st_dev, sts[-1].st_ino), xwh, impure=impure)

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
            # (Another object at the name, or a metadata-only copy whose data
            # may have come up, is resolved afresh.)
            if st is not None and (st.st_dev, st.st_ino) == cached.real and cached.data is None:
                nlink = self.merged_nlink(layer, join(parent_rel, name), st) if (
                    cached.nlink is not None or st.st_nlink > 1) else None
                return cached.restat(st, nlink, None)
        entry = self._resolve(parent, parent_rel, name)
        if entry is None or entry.is_dir or entry.linked_up or self.index is None or (
            entry.index is None and entry.st.st_nlink < 2
        ):
            # (A lower hard link may get an index copy through another name
            # at any time, and an index copy has no name here to lstat: both
            # are resolved afresh each time.)
            self.cache.store(parent.ident, name, entry)
        return entry

    def walk(self, root: Entry, rel: bytes) -> Entry | None:
        """The entry at merged path *rel*, resolved a name at a time from the
        *root* entry; None if some name on the way is not there."""
        entry: Entry | None = root
        at = b""
        for name in rel.split(b"/") if rel else []:
            assert entry is not None
            entry = self.child(entry, at, name)
            if entry is None:
                return None
            at = join(at, name)
        return entry

    def listed(self, parent: Entry, parent_rel: bytes, store: bool = True) -> Callable[[bytes], Entry | None]:
        """:meth:`child` for the names of *parent*'s own listing (:meth:`names`),
        with what they share looked up once per listing, not once per name.
        Not *store*: what the fast path below finds is not cached.

        Those names came from the layers' own directories, so they need no
        checking.  In a directory of one lower layer a file or symlink is
        resolved from its lstat alone, exactly as :meth:`_resolve` does, and
        a directory from that same lstat; anything else goes through
        :meth:`child`.  A listing of thousands of names (READDIRPLUS) does all
        the rest per name.  Valid while the core's lock is held.
        """
        layer = self.plain_lower(parent)
        if layer is None:
            return lambda name: self.child(parent, parent_rel, name)
        lookup, lstat = self.cache.lookup, self.stack.lstat_real
        keep = self.cache.store if store else lambda ident, name, entry: None
        ident, resolve, stack_layers = parent.ident, self._resolve, self.stack.layers
        whiteout = self.markers.is_device_whiteout
        indexed = self.index is not None

        def listed_child(name: bytes) -> Entry | None:
            known, cached = lookup(ident, name)
            if known and (cached is None or not stack_layers[cached.layers[0]].writable):
                return cached  # a lower object: its attributes cannot change under the mount
            st = None if known else lstat(layer, parent_rel, name)
            if st is None or (st.st_nlink > 1 and indexed) or whiteout(st):
                # (Gone since listed, an upper object, a hard link that may
                # have an index copy, a whiteout: as child() has it.)
                return self.child(parent, parent_rel, name)
            entry = resolve(parent, parent_rel, name, st) if _S_ISDIR(st.st_mode) else Entry.lean(layer, st)
            keep(ident, name, entry)
            return entry

        return listed_child

    def plain_lower(self, parent: Entry) -> int | None:
        """The layer of directory *parent* where each of its names is a plain
        lookup in that one lower layer (:meth:`listed`'s fast path): no other
        layer, no xattr whiteouts, no copies a metadata-only record or a
        moved directory could make anything else.  None elsewhere."""
        layer = self._lone_lower(parent)
        if layer is None or self.metacopy or layer in parent.impure or self.stack.moved:
            return None
        return layer

    def _resolve(
        self, parent: Entry, parent_rel: bytes, name: bytes, first: os.stat_result | None = None
    ) -> Entry | None:
        """The rules (see the module's docstring).  *first*: the lstat of
        *name* in the one lower layer of *parent*, where the caller made it."""
        stack = self.stack
        layer = self._lone_lower(parent)
        if layer is not None:
            # The most common case: no layer below to merge, no whiteout
            # beside it that would hide anything, no copy-up record to read
            # for a plain file.  A lookup in a big image, and every entry of
            # a listing, comes here.
            if first is None:
                first = stack.lstat(layer, parent_rel, name)
            if first is None:
                return None
            if self.markers.is_device_whiteout(first):
                return None  # (with nothing below it to hide)
            if not stat.S_ISDIR(first.st_mode) and not (self.metacopy or layer in parent.impure) and (
                first.st_nlink < 2 or self.index is None or not self.index.index_keys
            ):
                return Entry.lean(layer, first)
            # (Else resolved in full below, with this lstat.)
        markers = self.markers
        rel = join(parent_rel, name)
        dirs: list[int] = []
        top: os.stat_result | None = None
        low: os.stat_result | None = None
        xwh: list[int] = []
        impure: list[int] = []
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
        st: os.stat_result | None
        for layer, held in layers:
            if first is not None:
                st, first = first, None
            else:
                st = stack.lstat(layer, parent_rel, name) if held is None or name in held else None
            if st is None:
                # (A .wh.NAME in the last layer hides nothing: no layer is below it.)
                if layer != last and markers.oci_whiteout(stack, layer, parent_rel, name, held):
                    break
                continue
            if markers.is_whiteout(st, layer in parent.xwh, stack, layer, parent_rel, name):
                break
            if not stat.S_ISDIR(st.st_mode):
                if dirs:
                    break  # a non-directory below a directory ends the merge
                ident = (st.st_dev, st.st_ino)
                # Exact where the mount follows them (there a missed one would
                # read as zeros); else only where the kernel may have left one.
                data = self._lowerdata(parent, parent_rel, name, layer) if (
                    self.metacopy or layer in parent.impure) and markers.metacopy(
                    stack, layer, rel, st, self.metacopy) else None
                if stack.layers[layer].writable:
                    if layer + 1 < len(stack.layers):
                        ident = self._origin(parent, parent_rel, name, layer, ident)
                    return Entry(only(layer), Stat.of(st), ident, nlink=self.merged_nlink(layer, rel, st), data=data)
                if st.st_nlink > 1 and self.index is not None and self.index.index_keys:
                    indexed = self._indexed(layer, parent_rel, name, ident)
                    if indexed is not None:
                        return indexed
                return Entry(only(layer), Stat.of(st), data=data)
            dirs.append(layer)
            top = top or st
            low = st
            xattrs = stack.listxattr(layer, rel)
            opaque = markers.opaque(stack, layer, rel, xattrs)
            if opaque == XWHITEOUTS:
                xwh.append(layer)
            if markers.has_record(xattrs, b"impure"):
                impure.append(layer)
            if opaque == OPAQUE or (layer != last and markers.oci_opaque(stack, layer, parent_rel, name, held)):
                break
            if layer + 1 < len(stack.layers) and markers.has_record(xattrs, b"redirect"):
                if not self.follow:
                    raise fs_error(errno.EPERM, rel)  # the kernel's "refusing to follow redirect"
                redirect = self._redirect(stack, layer, rel, xattrs)
                if redirect is not None:
                    moves: dict[int, bytes] = {}
                    low = self._follow(parent, parent_rel, layer, redirect, dirs, xwh, moves, impure) or low
                    stack.moved[rel] = moves
                    return Entry(tuple(dirs), Stat.of(top), (low.st_dev, low.st_ino), tuple(xwh), impure=tuple(impure))
            if layer == last:
                break
        if top is None or low is None:
            return None
        if stack.moved and dirs:
            stack.moved.pop(rel, None)  # no longer reached through a redirect
        return Entry(tuple(dirs), Stat.of(top), (low.st_dev, low.st_ino), tuple(xwh), impure=tuple(impure))

    def _redirect(self, view: LayerView, layer: int, rel: bytes, xattrs: list[bytes]) -> bytes | None:
        """Directory *rel*'s ``overlay.redirect`` in *layer*, if it is one the
        kernel follows: ``/a/b`` (from the layer root, no empty or dot
        components) or a bare name (beside it, in its parent)."""
        for key in self.markers.record_names(b"redirect"):
            if key in xattrs:
                try:
                    value = bytes(view.getxattr(layer, rel, key))
                except OSError:
                    return None
                break
        else:
            return None
        parts = value[1:].split(b"/") if value.startswith(b"/") else [value]
        if any(p in (b"", b".", b"..") or b"\0" in p for p in parts):
            return None
        return value

    def _follow(
        self, parent: Entry, parent_rel: bytes, layer: int, redirect: bytes,
        dirs: list[int], xwh: list[int], moves: dict[int, bytes], impure: list[int],
    ) -> os.stat_result | None:
        """Merge the directories below *layer* that its *redirect* names
        (``ovl_lookup``'s rules, see :meth:`_trail`).  Appends to *dirs*,
        *xwh* and *impure*, records where each was found in *moves*, and
        returns the lowest one's lstat."""
        stack, markers, real = self.stack, self.markers, self.real_paths
        count = len(stack.layers)
        trail = _Trail(redirect, layer)
        low: os.stat_result | None = None
        for k, path, st, cut, prefix in self._trail(parent, parent_rel, trail):
            where, _, name = path.rpartition(b"/")
            if st is None or markers.is_whiteout(st, False, real, k, where, name) or not stat.S_ISDIR(st.st_mode):
                return low
            dirs.append(k)
            moves[k] = path
            low = st
            xattrs = stack.listxattr(k, path, real=True)
            opaque = markers.opaque(real, k, path, xattrs)
            if opaque == XWHITEOUTS:
                xwh.append(k)
            if markers.has_record(xattrs, b"impure"):
                impure.append(k)
            if k + 1 == count or cut or opaque == OPAQUE or markers.oci_opaque(real, k, where, name):
                return low
            again = self._redirect(real, k, path, xattrs) if markers.has_record(xattrs, b"redirect") else None
            if again is not None:
                trail.turn(again, prefix, k)
        return low

    def _trail(self, parent: Entry, parent_rel: bytes, trail: _Trail) -> Iterator[
            tuple[int, bytes, os.stat_result | None, bool, bytes]]:
        """What each layer below holds where *trail* leads, as ``ovl_lookup``
        follows a redirect: a bare name in the parent's directories below, an
        absolute path from the root of every layer below (walked a component
        at a time, :meth:`_walk`).  Yields (layer, path there, its lstat,
        whether the layers below are cut off, the path's directory as the
        layers below look it up); an lstat of None means the trail ends
        there (a whiteout or an opaque directory on the way).  Layers with
        nothing there are passed over.  The consumer may :meth:`_Trail.turn`
        the trail at the layer just yielded (a redirect found there): the
        next layers are then those below it, on the new trail."""
        stack, markers, real = self.stack, self.markers, self.real_paths
        count = len(stack.layers)
        while True:
            above = trail.above
            pool: Iterable[int] = (
                range(above + 1, count) if trail.absolute else [k for k in parent.layers if k > above])
            for k in pool:
                path = trail.target if trail.absolute else join(stack.real(k, parent_rel), trail.target)
                where, _, name = path.rpartition(b"/")
                there, prefix, cut = self._walk(k, where) if trail.absolute else (True, where, False)
                if trail.absolute:
                    trail.target = join(prefix, name)  # what the layers below look up
                st = stack.lstat_real(k, where, name) if there else None
                if st is None and not cut and not (there and markers.oci_whiteout(real, k, where, name)):
                    continue
                yield k, path, st, cut, prefix
                if trail.above != above:
                    break  # turned here: start again below this layer
            else:
                return

    def _walk(self, k: int, where: bytes) -> tuple[bool, bytes, bool]:
        """Directory path *where* walked from layer *k*'s root, one component
        at a time, as ``ovl_lookup_layer`` walks an absolute redirect:
        whether it is all there; the path the layers below look up instead,
        where a directory on the way carries a redirect of its own (the
        kernel's prefix replacement, so a directory moved out of a moved
        one is still found); and whether the layers below are cut off (a
        whiteout, a non-directory or an opaque directory on the way)."""
        real, markers = self.real_paths, self.markers
        parts = where.split(b"/") if where else []
        at = prefix = b""
        cut = False
        for i, part in enumerate(parts):
            st = real.lstat(k, at, part)
            if st is None or not stat.S_ISDIR(st.st_mode) or markers.is_whiteout(st, False, real, k, at, part):
                return False, join(prefix, b"/".join(parts[i:])), st is not None
            at, above, prefix = join(at, part), prefix, join(prefix, part)
            xattrs = real.listxattr(k, at)
            if markers.opaque(real, k, at, xattrs) == OPAQUE:
                cut = True  # (this layer goes on; an opaque directory's own redirect is not read)
                continue
            redirect = self._redirect(real, k, at, xattrs) if markers.has_record(xattrs, b"redirect") else None
            if redirect is not None:
                if redirect.startswith(b"/"):
                    prefix, cut = redirect[1:], False
                else:
                    prefix = join(above, redirect)
        return True, prefix, cut

    def _lowerdata(self, parent: Entry, parent_rel: bytes, name: bytes, layer: int) -> DataRef:
        """Where the data of metadata-only copy *name* in *layer* is: the
        first regular file below under its name, or under its redirect (see
        :meth:`_trail`), passing through further metadata-only copies and
        their redirects, as ``ovl_lookup`` finds "lowerdata".  EPERM when the
        mount does not follow them (``metacopy=off``, the kernel's "refusing
        to follow metacopy origin"); EIO when no data is found, or something
        else is."""
        rel = join(parent_rel, name)
        if not self.metacopy:
            raise fs_error(errno.EPERM, rel)
        markers, real = self.markers, self.real_paths
        redirect = self._redirect(self.stack, layer, rel, self.stack.listxattr(layer, rel))
        trail = _Trail(redirect or name, layer)
        for k, path, st, _, prefix in self._trail(parent, parent_rel, trail):
            where, _, base = path.rpartition(b"/")
            if st is None or markers.is_whiteout(st, False, real, k, where, base) or not stat.S_ISREG(st.st_mode):
                break
            if not markers.metacopy(real, k, path, st):
                return DataRef(k, path, st.st_blocks)
            again = self._redirect(real, k, path, real.listxattr(k, path))
            if again is not None:
                trail.turn(again, prefix, k)
        raise fs_error(errno.EIO, rel)

    def _indexed(self, layer: int, parent_rel: bytes, name: bytes, ident: tuple[int, int]) -> Entry | None:
        """The index copy of lower hard link *name*, if one of its names was
        copied up (overlayfs's index=on): every name shows that one object.
        Nothing is written: the name is linked into the upper only when it
        is itself copied up (overlayfs's ``ovl_link_up``)."""
        assert self.index is not None
        record = origin.of(*self.stack.at(layer, join(parent_rel, name)))
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
        return Entry((0,), Stat.of(st), ident, nlink=nlink, index=key)

    def names(self, d: Entry, rel: bytes) -> list[bytes]:
        """Candidate names of merged directory *d*, each once, top layer's order first.

        Candidates still go through :meth:`child`: a name here may be whited
        out.  Marker files are never candidates.
        """
        cached = self.cache.names(d.ident)
        if cached is not None:
            return cached
        out: list[bytes]
        if len(d.layers) == 1:  # (one directory holds each name once)
            out = self.stack.listdir(d.layers[0], rel)
            if any(map(self.markers.is_oci_marker, out)):  # (else no second list of a huge directory's names)
                out = list(filterfalse(self.markers.is_oci_marker, out))
            self.cache.store_names(d.ident, out)
            return out
        seen: set[bytes] = set()
        out = []
        for layer in d.layers:
            for n in self.stack.listdir(layer, rel):
                if n not in seen and not self.markers.is_oci_marker(n):
                    seen.add(n)
                    out.append(n)
        self.cache.store_names(d.ident, out)
        return out

    def scanned(self, d: Entry, rel: bytes, names: list[bytes]) -> Scan | None:
        """Inode numbers and kinds of *names*, the listing of directory *d*,
        read from its directory entries: for a directory of one lower layer
        (whose entries resolve to themselves: no whiteout or copy-up above
        them, their inode numbers their own) on a filesystem whose entries
        record the inode numbers ``lstat`` shows.  None elsewhere."""
        layer = self._lone_lower(d)
        if layer is None:
            return None
        try:
            # Read again: the same entries in the same order (less the markers, which are
            # not candidates, see names), unless the directory changed in between.
            return self.stack.scan(layer, rel, names, self.markers.is_oci_marker)
        except OSError:
            return None  # (read once already for the listing; whatever stops it now, resolve name by name)

    def _lone_lower(self, d: Entry) -> int | None:
        """The layer of directory *d* if it is a directory of one lower layer
        with no xattr whiteouts: there every name is its own object, hidden
        by nothing and merged with nothing.  None elsewhere."""
        layers = d.layers
        if len(layers) > 1 or d.xwh or self.stack.layers[layers[0]].writable:
            return None
        return layers[0]

    def listing(self, d: Entry, rel: bytes) -> list[tuple[bytes, Entry]]:
        """The merged directory's visible entries."""
        out = []
        child = self.listed(d, rel)
        for n in self.names(d, rel):
            e = child(n)
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
            if not stat.S_ISDIR(st.st_mode) and origin.same_object(
                record, *self.stack.at(lower, join(parent_rel, name))
            ):
                self.origins[ident] = (st.st_dev, st.st_ino)
                return self.origins[ident]
            break
        found = origin.identity(record, [lay.fd for lay in self.stack.layers[layer + 1 :]])
        if found is not None and any(found[0] == lay.dev for lay in self.stack.layers[layer + 1 :]):
            self.origins[ident] = found
            return found
        return ident


class _Trail:
    """Where a redirect leads, as it changes on the way (see :meth:`Resolver._trail`)."""

    __slots__ = ("absolute", "target", "above")

    def __init__(self, redirect: bytes, above: int) -> None:
        self.absolute = redirect.startswith(b"/")
        #: The path looked up: from each layer's root if absolute, else in
        #: the parent's directories.
        self.target = redirect[1:] if self.absolute else redirect
        #: The layer below which the trail is followed.
        self.above = above

    def turn(self, again: bytes, prefix: bytes, layer: int) -> None:
        """Another redirect, found in *layer*: absolute, it replaces the
        path; a bare name replaces its last component (*prefix* is the
        path's directory as the layers below look it up)."""
        if again.startswith(b"/"):
            self.absolute, self.target = True, again[1:]
        else:
            self.target = join(prefix, again) if self.absolute else again
        self.above = layer
