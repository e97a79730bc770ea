"""What an upper directory changed: the one reading of an upper that ``diff`` and ``commit`` share.

An upper layer holds a container's changes in the kernel's on-disk format;
image tools want them as a list (``pyunionfs diff``, like ``docker diff``) or
as an OCI image layer (``pyunionfs commit``).  Both need the same reading of
the upper, done here once so that they cannot disagree:

* every entry, walked beneath the upper with no-follow directory fds (a
  symlink stored in the upper is reported, never followed);
* deletion and opacity markers recognised in every format :mod:`..fs.markers`
  knows, read the way the union reads them: a 0/0 character device, an xattr
  whiteout in an ``overlay.opaque=x`` directory and an OCI ``.wh.NAME`` file
  are all whiteouts; ``overlay.opaque=y``, ``.wh..wh..opq`` inside a
  directory, and a ``.wh.NAME`` beside a directory ``NAME`` make it opaque;
* the overlay's private xattrs (origin, impure, nlink, opaque...) told apart
  from the user's, with escaped ``overlay.overlay.X`` names shown as
  ``overlay.X``, as the mount shows them.

Order is deterministic: a directory comes before its children, the children
of one directory come whiteouts first (what OCI asks of layer writers:
"whiteout files appear before sibling directory entries"), then entries,
each group sorted by name.

An upper that uses ``overlay.redirect`` (renamed directories, kernel
``redirect_dir=on``) or ``overlay.metacopy`` (metadata-only copy-up) keeps
part of its meaning in a lower layer: with the lowers given, those entries
are read through them as the mount reads them (:mod:`.unionview`: a moved
directory comes out opaque with its whole merged subtree); without them,
the walk refuses with :class:`LayerError` rather than read wrongly.

Hard links of a lower file live partly outside the upper: with ``index=on``
(the kernel's option, pyunionfs's only way) a copied-up lower file with
several names has a copy in the work directory's ``index/``, and the names
never written, linked or renamed stay lower-only while the mount shows the
copy under them.  A layer must hold what the container saw, so with the
lowers known the walk adds those names itself, as :mod:`.indexnames` finds
them: each becomes an entry with the index copy's metadata and content, in
the same hard-link group as the copy's upper names; a lower directory
leading to such a name that the upper lacks is added with the lower's
metadata, as the kernel would copy it up.  The work directory is the one
given, or else pyunionfs's default beside the upper
(:func:`.config.default_workdir`); the kernel's is wherever ``workdir=``
said.

Without the lowers (or without the index) those names cannot be found.  The
walk then counts, per copied-up hard link, the merged link count its
``overlay.nlink`` record gives against the names it produced, and warns
once (to stderr by default) when some are missing, saying what to pass;
nothing is guessed.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType

from ..config import default_workdir
from ..errors import LayerError
from ..fs import origin
from ..fs.indexnames import IndexCopy, IndexDir, LowerView, index_names
from ..fs.entry import DataRef, StatLike
from ..fs.layers import LayerStack
from ..fs.markers import OPAQUE, XWHITEOUTS, Markers, classify_oci_name
from ..fs.paths import join, split as _split
from .unionview import UnionView

__all__ = [
    "ADDED", "CHANGED", "DELETED", "UpperEntry", "UpperWalk", "Warn", "changes", "display",
    "graft_entries", "path_key", "visible_xattrs", "warn_stderr",
]

ADDED = "A"
CHANGED = "C"
DELETED = "D"


def path_key(path: bytes) -> tuple[bytes, ...]:
    """Sort key that orders paths component by component (``a/b`` before ``a-c``),
    which is also depth-first order: a directory right before its contents."""
    return tuple(path.split(b"/")) if path else ()


def display(path: bytes) -> str:
    """A relative path for messages."""
    return os.fsdecode(path) or "."


#: Where a walk's warnings go: called with one line, without a prefix.
Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    """The default :data:`Warn`: one line on stderr, as the command line prints warnings."""
    print(f"pyunionfs: warning: {message}", file=sys.stderr)


XattrList = tuple[tuple[bytes, bytes], ...]


def visible_xattrs(markers: Markers, names: Sequence[bytes], get: Callable[[bytes], bytes]) -> XattrList:
    """The user-visible xattrs among the stored *names* (values read with
    *get*), as the mount shows them, sorted; one removed since it was listed
    is skipped rather than failing the whole walk."""
    out = []
    for name in names:
        visible = markers.visible_xattr(name)
        if visible is None:
            continue
        try:
            out.append((visible, get(name)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class UpperEntry:
    """One name of an upper, as an image layer sees it.

    ``path`` is relative to the upper (``b""`` is the upper itself).  For a
    whiteout, ``path`` is the name it hides and ``st`` is the marker's own
    lstat; nothing else applies.  ``xattrs`` are the user-visible ones,
    sorted by name.
    """

    path: bytes
    st: StatLike
    whiteout: bool = False
    opaque: bool = False
    copied_up: bool = False
    xattrs: XattrList = ()
    #: This directory holds xattr whiteouts (``overlay.opaque=x``).
    xwhiteouts: bool = False
    #: Not in the upper, but shown through it (see the module doc on hard
    #: links): a lower-only name of a copied-up hard link, or a lower
    #: directory on the way to one, with the metadata the mount shows.
    grafted: bool = False
    #: The work dir's ``index/`` entry whose content this grafted name shows.
    index: bytes | None = None
    #: Where this entry's content is when it is not the upper's own: a
    #: metadata-only copy's data, or a lower entry shown in a moved
    #: directory (a real path of the walk's :class:`.unionview.UnionView`).
    data: DataRef | None = None
    #: A directory whose children are the merged ones (read through the
    #: union): one renamed with ``redirect_dir=on``, and everything below it.
    moved: bool = False

    @property
    def is_dir(self) -> bool:
        return not self.whiteout and stat.S_ISDIR(self.st.st_mode)


class UpperWalk:
    """Reads one upper directory (read-only: nothing in it is changed).

    The upper is opened as a one-layer :class:`LayerStack`, so every access
    goes through the same no-follow directory fds as the mount's.  With
    *lowers* (topmost first) the names that copied-up hard links have only
    in the lowers are added, read from the index of *workdir* (default: the
    one pyunionfs makes beside the upper); see the module doc.  *warn* gets
    the one warning a walk may give: names it knows are missing.
    """

    def __init__(self, upper: bytes, markers: Markers, lowers: Sequence[bytes] | None = None,
                 workdir: bytes | None = None, warn: Warn = warn_stderr) -> None:
        self.markers = markers
        self.lowers = tuple(lowers or ())
        self.workdir = workdir if workdir is not None else default_workdir(os.path.abspath(upper))
        self.warn = warn
        #: Entries to add below each upper directory path (see :func:`graft_entries`).
        self.grafts: dict[bytes, list[UpperEntry]] = {}
        #: Merged link counts of copied-up hard links (index and nlink records), by (st_dev, st_ino).
        self.merged: dict[tuple[int, int], int] = {}
        self.index: IndexDir | None = None
        self.stack = LayerStack((upper,), writable_top=False)
        self.upper = upper
        #: The upper over its lowers, read as the mount reads them: made at
        #: the first entry that keeps part of itself below (see :mod:`.unionview`).
        self._view: UnionView | None = None
        try:
            self.index = self._open_index(given=workdir is not None)
            if self.index is not None:
                self._read_index(upper, self.index)
        except BaseException:
            self.close()
            raise

    def _open_index(self, given: bool) -> IndexDir | None:
        """The index of the work directory; None if it has none (an
        ``index=off`` mount, or a default work dir that was never made).  A
        work directory the user named (*given*) must exist: a typo must not
        pass silently."""
        try:
            wfd = os.open(self.workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            if not given and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise LayerError(f"work directory {os.fsdecode(self.workdir)}: {exc.strerror}") from None
        try:
            return IndexDir.open(wfd, self.markers)
        finally:
            os.close(wfd)

    def _read_index(self, upper: bytes, index: IndexDir) -> None:
        copies = index.copies()
        for c in copies:
            n = c.merged_nlink()
            if n is not None:
                self.merged[c.ident] = n
        live = [c for c in copies if c.merged_nlink() != 0]
        if not live or not self.lowers:
            return
        view = LowerView((upper, *self.lowers), self.markers)
        try:
            self.grafts = graft_entries(view, index_names(view, live), index)
        finally:
            view.close()

    def close(self) -> None:
        self.stack.close()
        if self._view is not None:
            self._view.close()
        if self.index is not None:
            self.index.close()
            self.index = None

    def __enter__(self) -> UpperWalk:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- the walk ---------------------------------------------------------

    def entries(self) -> Iterator[UpperEntry]:
        """The upper's root, then every entry below it, depth-first (see the module doc).

        Iterative, with one listing per directory held at a time: an upper
        may be thousands of directories deep.  Once every entry was given,
        the names of copied-up hard links are counted (:meth:`_check_links`).
        """
        seen: dict[tuple[int, int], int] = {}
        root = self._describe(b"", self.stack.stat_self(0, b""), False)
        yield root
        todo: list[Iterator[UpperEntry]] = [self._children(root)]
        while todo:
            entry = next(todo[-1], None)
            if entry is None:
                todo.pop()
                continue
            yield entry
            if entry.is_dir:
                todo.append(self._children(entry))
            elif not entry.whiteout:
                key = (entry.st.st_dev, entry.st.st_ino)
                seen[key] = seen.get(key, 0) + 1
        self._check_links(seen)

    def _check_links(self, seen: Mapping[tuple[int, int], int]) -> None:
        """Warn once if a copied-up hard link has fewer names in the walk
        than its merged link count: the rest are lower-only names this walk
        could not find (no lowers, no index), and the output lacks them."""
        missing = sum(max(0, n - seen.get(k, 0)) for k, n in self.merged.items())
        if not missing:
            return
        what = f"{missing} name(s) of hard-linked lower files copied up (index=on) "
        needs = []
        if self.index is None:
            needs.append(f"the work directory the upper was mounted with (--workdir; none at {display(self.workdir)})")
        if not self.lowers:
            needs.append("its lower layers (--lowers)")
        if needs:
            self.warn(what + "are only in the lower layers and are left out: finding them needs " + " and ".join(needs))
        else:
            self.warn(what + "were not found in the lower layers given: are they, and the work directory, "
                      "the ones the upper was mounted with?")

    def _children(self, d: UpperEntry) -> Iterator[UpperEntry]:
        if d.moved:
            return self._merged_children(d)
        rel = d.path
        grafted = self.grafts.get(rel, [])
        if d.grafted:
            return iter(sorted(grafted, key=lambda e: e.path))
        names = sorted(self.stack.listdir(0, rel))
        present = set(names)
        whiteouts: dict[bytes, os.stat_result] = {}
        beside_dir: set[bytes] = set()  # NAME with a .wh.NAME next to it: opaque if a directory
        for n in names:
            if not self.markers.is_oci_marker(n):
                continue
            kind, target = classify_oci_name(n)
            if kind != "whiteout":
                continue  # the opaque marker is read with its directory; invalid ones hide nothing
            st = self.stack.lstat(0, rel, n)
            if st is None:
                continue
            if target in present:
                beside_dir.add(target)
            else:
                whiteouts[target] = st
        entries: list[UpperEntry] = []
        for n in names:
            if self.markers.is_oci_marker(n):
                continue
            st = self.stack.lstat(0, rel, n)
            if st is None:
                continue  # gone since the listing: the upper is not ours to freeze
            child = join(rel, n)
            if self.markers.is_whiteout(st, d.xwhiteouts, self.stack, 0, rel, n):
                whiteouts[n] = st
                continue
            entries.append(self._describe(child, st, n in beside_dir))
        entries.extend(grafted)  # names the upper does not have: never a clash
        entries.sort(key=lambda e: e.path)
        out = [UpperEntry(join(rel, n), whiteouts[n], whiteout=True) for n in sorted(whiteouts)]
        out.extend(entries)
        return iter(out)

    def _describe(self, rel: bytes, st: StatLike, oci_opaque: bool) -> UpperEntry:
        names = self.stack.listxattr(0, rel)
        data = None
        moved = False
        if stat.S_ISREG(st.st_mode) and self.markers.metacopy(self.stack, 0, rel, st):
            data = self.union(rel, "a metadata-only copy (metacopy=on)").lowerdata(rel)
        elif stat.S_ISDIR(st.st_mode) and rel and self.markers.has_record(names, b"redirect"):
            self.union(rel, "a directory renamed with redirect_dir=on")
            moved = True
        opaque = xwh = False
        if moved:
            opaque = True  # whatever the lowers hold at its new name is not its content
        elif stat.S_ISDIR(st.st_mode):
            value = self.markers.opaque(self.stack, 0, rel, names)
            xwh = value == XWHITEOUTS
            opaque = value == OPAQUE or oci_opaque
            if not opaque:
                opaque = self.markers.oci_opaque_inside(self.stack, 0, rel)
        elif self.markers.has_record(names, b"nlink"):
            self._note_nlink(rel, st, names)
        return UpperEntry(
            rel,
            st,
            opaque=opaque,
            copied_up=self.markers.has_record(names, b"origin"),
            xattrs=visible_xattrs(self.markers, names, lambda n: self.stack.getxattr(0, rel, n)),
            xwhiteouts=xwh,
            data=data,
            moved=moved,
        )

    def union(self, rel: bytes, what: str) -> UnionView:
        """The upper over its lowers, for entry *rel*, which is *what* and so
        keeps part of itself in a lower layer; without the lowers, a one-line refusal."""
        if not self.lowers:
            raise LayerError(f"{display(rel)}: is {what}, which keeps part of itself in a lower layer: "
                             "give the lowers (--lowers) to read it from them")
        if self._view is None:
            self._view = UnionView(self.upper, self.lowers, self.markers)
        return self._view

    def _merged_children(self, d: UpperEntry) -> Iterator[UpperEntry]:
        """The children of moved directory *d*: its merged entries, each
        with its own metadata, the upper's where it has them (every
        directory below moved too: the layer holds the whole subtree)."""
        view = self.union(d.path, "in a directory renamed with redirect_dir=on")

        def visible(layer: int, real: bytes) -> XattrList:
            names = view.stack.listxattr(layer, real, real=True)
            return visible_xattrs(self.markers, names, lambda n: view.stack.getxattr(layer, real, n, real=True))

        for path, st, xattrs, data, in_upper in view.children(d.path, visible):
            if in_upper and data is None:
                own = self._describe(path, self.stack.lstat(0, *_split(path)) or st, False)
                yield replace(own, moved=own.is_dir, opaque=False) if own.is_dir else own
            else:
                yield UpperEntry(path, st, copied_up=True, xattrs=xattrs, data=data, moved=stat.S_ISDIR(st.st_mode))

    def _note_nlink(self, rel: bytes, st: StatLike, names: list[bytes]) -> None:
        """Learn a copied-up hard link's merged link count from its upper
        name (so a missing index is noticed too); ``U`` records only, the
        others need the lower object."""
        key = (st.st_dev, st.st_ino)
        if key in self.merged:
            return
        for xname in self.markers.nlink_names:
            if xname in names:
                value = self.stack.getxattr(0, rel, xname)
                n = origin.parse_nlink(value, st.st_nlink, 0, unlinked=True) if value[:1] == b"U" else None
                if n is not None:
                    self.merged[key] = n
                return

    # -- contents ---------------------------------------------------------

    def open(self, e: UpperEntry) -> int:
        """A read-only fd of regular file *e* (never through a symlink;
        O_NOATIME where allowed, so committing changes no atime): its index
        copy for a grafted name, else the upper's file."""
        if e.index is not None:
            assert self.index is not None, "grafted names come from the index"
            return self.index.open_copy(e.index)
        if e.data is not None:  # content below: a metadata-only copy's data, or a moved directory's file
            assert self._view is not None, "found through the union"
            return self._view.stack.open_real(e.data.layer, e.data.path)
        return self.stack.open_file(0, e.path, os.O_RDONLY)

    def readlink(self, e: UpperEntry) -> bytes:
        if e.index is not None:
            assert self.index is not None, "grafted names come from the index"
            return self.index.readlink(e.index)
        if e.data is not None:
            assert self._view is not None, "found through the union"
            return self._view.stack.readlink_real(e.data.layer, e.data.path)
        return self.stack.readlink(0, e.path)


# -- lower-only names of copied-up hard links, added to the walk ---------------


def graft_entries(view: LowerView, names: Mapping[bytes, IndexCopy], index: IndexDir) -> dict[bytes, list[UpperEntry]]:
    """What the walk adds, by parent path: each of *names* with its copy's
    metadata (same st_dev/st_ino as the copy's upper names, so one hard-link
    group), and each directory on the way to one that the upper lacks, with
    the metadata the merged lowers give it (what a copy-up would keep)."""
    children: dict[bytes, list[UpperEntry]] = {}
    dirs: set[bytes] = set()
    xattrs: dict[bytes, XattrList] = {}
    for rel in sorted(names, key=path_key):
        parent = rel.rpartition(b"/")[0]
        _graft_dirs(view, parent, children, dirs)
        copy = names[rel]
        if copy.key not in xattrs:
            xattrs[copy.key] = _copy_xattrs(index, copy.key)
        children.setdefault(parent, []).append(
            UpperEntry(rel, copy.st, copied_up=True, xattrs=xattrs[copy.key], grafted=True, index=copy.key)
        )
    return children


def _graft_dirs(view: LowerView, rel: bytes, children: dict[bytes, list[UpperEntry]], done: set[bytes]) -> None:
    """Graft directory *rel* and those above it that only lower layers hold
    (the parents of an upper directory are all in the upper, so these are
    always the tail of the path)."""
    path = b""
    for part in rel.split(b"/") if rel else []:
        path = join(path, part)
        if path in done:
            continue
        done.add(path)
        entry = view.lookup(path)
        assert entry is not None and entry.is_dir, "a name below it resolved"
        if 0 in entry.layers:
            continue
        children.setdefault(path.rpartition(b"/")[0], []).append(
            UpperEntry(path, entry.st, copied_up=True, xattrs=_layer_xattrs(view, entry.layers[0], path), grafted=True)
        )


def _copy_xattrs(index: IndexDir, key: bytes) -> XattrList:
    """The user-visible xattrs of index copy *key*."""
    return visible_xattrs(index.markers, index.xattr_names(key), lambda n: index.getxattr(key, n))


def _layer_xattrs(view: LowerView, layer: int, rel: bytes) -> XattrList:
    """The user-visible xattrs of entry *rel* of *layer* of *view*."""
    names = view.stack.listxattr(layer, rel)
    return visible_xattrs(view.markers, names, lambda n: view.stack.getxattr(layer, rel, n))


def changes(upper: bytes, markers: Markers, lowers: Sequence[bytes] | None = None, workdir: bytes | None = None,
            warn: Warn = warn_stderr) -> list[tuple[str, bytes]]:
    """``(kind, path)`` for everything the upper changed, sorted by :func:`path_key`.

    With *lowers* (topmost first) the decision is by existence in their merged
    view: a path they show is ``C`` when the upper has it and ``D`` when the
    upper deletes it (a whiteout, or a name missing below an opaque
    directory); a path they do not show is ``A``, and a whiteout of such a
    path is no change at all.  Only the topmost deleted path is listed, as
    ``docker diff`` does.

    Without lowers nothing can be looked up, so the upper's own records
    decide: a whiteout is ``D``; an opaque directory and everything below a
    path already reported ``A`` is ``A``; otherwise an entry copied up from a
    lower layer (``overlay.origin``) or a non-opaque directory (overlayfs
    only creates those to merge with a lower one) is ``C``, anything else
    ``A``.  Names hidden by an opaque directory are then unknown and not listed.

    The names a copied-up lower hard link has only in the lowers show the
    copy, so they changed too: with *lowers* they are found through the
    index of *workdir* (see :class:`UpperWalk`) and listed ``C``, with the
    lower directories leading to them; without, they cannot be found and
    *warn* is told how many are missing.
    """
    view = LowerView(lowers, markers) if lowers else None
    out: list[tuple[str, bytes]] = []
    added: set[bytes] = set()  # directories reported A (without lowers)
    # Directories whose lower contents the upper replaced (opaque, or below one).
    replaced: set[bytes] = set()
    try:
        with UpperWalk(upper, markers, lowers, workdir, warn) as walk:
            entries = walk.entries()
            next(entries)  # the upper itself: never listed, and overlayfs ignores opacity at the root
            upper_names: dict[bytes, set[bytes]] = {}
            for e in entries:
                parent, _, name = e.path.rpartition(b"/")
                if not e.whiteout:
                    upper_names.setdefault(parent, set()).add(name)
                if view is not None:
                    existed = view.lookup(e.path) is not None
                    if e.whiteout:
                        if existed and parent not in replaced:
                            out.append((DELETED, e.path))
                        continue
                    out.append((CHANGED if existed else ADDED, e.path))
                    if e.is_dir and (e.opaque or parent in replaced):
                        replaced.add(e.path)
                    continue
                if e.whiteout:
                    out.append((DELETED, e.path))
                    continue
                fresh = parent in added or e.opaque
                kind = CHANGED if not fresh and (e.copied_up or e.is_dir) else ADDED
                if kind == ADDED and e.is_dir:
                    added.add(e.path)
                out.append((kind, e.path))
            if view is not None:
                for d in sorted(replaced):
                    have = upper_names.get(d, set())
                    out.extend((DELETED, join(d, n)) for n in view.names(d) if n not in have)
    except OSError as exc:
        where = os.path.join(os.fsdecode(upper), os.fsdecode(exc.filename or b""))
        raise LayerError(f"{where}: {exc.strerror or exc}") from None
    finally:
        if view is not None:
            view.close()
    out.sort(key=lambda c: path_key(c[1]))
    return out
