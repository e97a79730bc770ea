"""Lower-only names of copied-up hard links: what an upper alone does not say.

With ``index=on`` (the kernel's option, pyunionfs's only way) the first
copy-up of a lower file with several names goes to the work directory's
``index/<hex of its origin record>``, and only the names that were written,
linked or renamed become hard links of that copy in the upper.  The other
names stay lower-only, yet the mount shows the copy under them too: after
``echo x >> a`` on a lower file linked as ``a`` and ``b``, the container
reads ``x`` at ``b`` as well, while the upper holds ``a`` alone.  A reading
of the upper by itself (:mod:`.changes`, for ``diff`` and ``commit``) would
leave ``b`` out, and a layer built from it would give ``b`` its old lower
content.  This module finds those names, given the lowers and the work
directory; :mod:`.changes` adds them to its walk.

How they are found (:func:`index_names`): each live entry of the index
(:class:`IndexDir`, :class:`IndexCopy`) stands for one lower object, named
by the file handle in its origin record.  The lower layers are walked for
non-directories with several links, each object matched to that record by
its own handle; a name of it counts if the merged view of the upper over the
lowers (:class:`LowerView`, the union's own rules) still shows that lower
object there.

Everything here only reads.  This module imports nothing from
:mod:`.changes`; the imports run the other way.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from . import origin
from .entry import Entry
from .layers import LayerStack
from .markers import Markers
from .paths import join, proc_path
from .resolve import Resolver
from .syscalls import name_to_handle_at
from .upper import INDEX

__all__ = ["IndexCopy", "IndexDir", "LowerView", "index_names"]


@dataclass(frozen=True, slots=True)
class IndexCopy:
    """One entry of a work dir's ``index/``: the upper copy of a hard-linked lower object."""

    key: bytes
    #: (handle type, handle bytes) of the lower object, from the origin record.
    handle: tuple[int, bytes]
    st: os.stat_result
    #: The ``overlay.nlink`` record; None if the entry has none.
    nlink: bytes | None

    @property
    def ident(self) -> tuple[int, int]:
        return self.st.st_dev, self.st.st_ino

    def merged_nlink(self, lower_nlink: int | None = None) -> int | None:
        """The merged link count the record gives (0: every merged name is
        gone); None without a readable record, or for an ``L`` (relative to
        the lower) record while *lower_nlink* is unknown."""
        if self.nlink is None or (self.nlink[:1] == b"L" and lower_nlink is None):
            return None
        return origin.parse_nlink(self.nlink, self.st.st_nlink, lower_nlink or 0, unlinked=True)


class IndexDir:
    """The ``index/`` of a work directory, only read (never cleaned: that is
    the next mount's business, and the mount may still be live)."""

    def __init__(self, fd: int, markers: Markers) -> None:
        self.fd = fd
        self.markers = markers

    @classmethod
    def open(cls, workdir_fd: int, markers: Markers) -> IndexDir | None:
        """The index of the work directory open at *workdir_fd*; None if it
        has none (an ``index=off`` mount)."""
        try:
            fd = os.open(INDEX, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=workdir_fd)
        except FileNotFoundError:
            return None
        return cls(fd, markers)

    def close(self) -> None:
        os.close(self.fd)

    def copies(self) -> list[IndexCopy]:
        """The entries that stand for a lower object, sorted by name.

        Directories and whiteouts are left out (the kernel whites out an
        index entry, with ``nfs_export``, only to refuse old file handles);
        so is an entry whose origin record, or else its hex name, is not one
        :func:`.origin.decode` understands.
        """
        out = []
        for key in sorted(os.fsencode(n) for n in os.listdir(self.fd)):
            try:
                st = os.stat(key, dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed by a live mount since the listing
            if stat.S_ISDIR(st.st_mode) or self.markers.is_device_whiteout(st):
                continue
            handle = origin.decode(self._record(key, b"origin") or _unhex(key))
            if handle is not None:
                out.append(IndexCopy(key, handle, st, self._record(key, b"nlink")))
        return out

    def _record(self, key: bytes, what: bytes) -> bytes | None:
        for xname in self.markers.record_names(what):
            try:
                return self.getxattr(key, xname)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        return None

    def xattr_names(self, key: bytes) -> list[bytes]:
        """The xattr names stored on copy *key*, private ones too (none where
        the filesystem has no xattrs)."""
        try:
            return [os.fsencode(n) for n in os.listxattr(proc_path(self.fd, key), follow_symlinks=False)]
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            return []

    def getxattr(self, key: bytes, name: bytes) -> bytes:
        return os.getxattr(proc_path(self.fd, key), name, follow_symlinks=False)

    def open_copy(self, key: bytes) -> int:
        """A read-only fd of the copy (O_NOATIME where allowed, as for upper files)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(key, flags | os.O_NOATIME, dir_fd=self.fd)
        except PermissionError:
            return os.open(key, flags, dir_fd=self.fd)

    def readlink(self, key: bytes) -> bytes:
        return os.readlink(key, dir_fd=self.fd)


def _unhex(key: bytes) -> bytes:
    """The record an index name spells (the kernel names entries by the hex of it)."""
    try:
        return bytes.fromhex(key.decode("ascii"))
    except ValueError:
        return b""


class LowerView:
    """The merged view of a list of layers, through the union's own rules
    (:class:`.resolve.Resolver`): of the lowers, what existed before the
    upper's changes; of the upper over them, what the mount showed (the
    upper read as a plain layer: no origin or index lookups)."""

    def __init__(self, lowers: Sequence[bytes], markers: Markers) -> None:
        self.markers = markers
        self.stack = LayerStack(tuple(lowers), writable_top=False)
        try:
            self.resolver = Resolver(self.stack, markers)
            self._root = self.resolver.root()
        except BaseException:
            self.stack.close()
            raise

    def close(self) -> None:
        self.stack.close()

    def lookup(self, rel: bytes) -> Entry | None:
        """The merged entry at *rel*; None if the layers do not show it."""
        entry: Entry | None = self._root
        parent = b""
        for name in rel.split(b"/") if rel else []:
            if entry is None or not entry.is_dir:
                return None
            entry = self.resolver.child(entry, parent, name)
            parent = join(parent, name)
        return entry

    def names(self, rel: bytes) -> list[bytes]:
        """Names the layers show in directory *rel* (none if it is not a directory there)."""
        entry = self.lookup(rel)
        if entry is None or not entry.is_dir:
            return []
        return [n for n, _ in self.resolver.listing(entry, rel)]


def index_names(view: LowerView, copies: Sequence[IndexCopy]) -> dict[bytes, IndexCopy]:
    """Every name that *view* (the upper over the lowers) shows from a lower
    layer while its object has a copy in the index: the names a copied-up
    lower hard link has only in the lowers, each with its copy.

    Every lower layer is walked whole, since a lower object's names may be
    anywhere in it; only non-directories with several links are candidates,
    matched to the index by file handle once per object (name_to_handle_at
    needs no privilege, unlike opening the origin's handle).  A name counts
    only if the merged view resolves it to that very lower object: not
    whited out, not replaced by the upper or a higher lower, not below an
    opaque directory.  A copy whose nlink record says every merged name is
    gone has none.
    """
    by_handle = {c.handle: c for c in copies}
    objects: dict[tuple[int, int], IndexCopy | None] = {}
    found: dict[bytes, IndexCopy] = {}
    for layer in range(1, len(view.stack.layers)):
        for rel, st in _linked_files(view.stack, layer):
            ident = (st.st_dev, st.st_ino)
            if ident not in objects:
                handle = _handle(view.stack, layer, rel)
                objects[ident] = by_handle.get(handle) if handle is not None else None
            copy = objects[ident]
            if copy is None or rel in found or copy.merged_nlink(st.st_nlink) == 0:
                continue
            if _shows_lower(view, rel, ident):
                found[rel] = copy
    return found


def _linked_files(stack: LayerStack, layer: int) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of every non-directory of *layer* with more than one
    link, through the stack's no-follow directory fds."""
    todo = [b""]
    while todo:
        rel = todo.pop()
        for name in stack.listdir(layer, rel):
            st = stack.lstat(layer, rel, name)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                todo.append(join(rel, name))
            elif st.st_nlink > 1:
                yield join(rel, name), st


def _handle(stack: LayerStack, layer: int, rel: bytes) -> tuple[int, bytes] | None:
    parent, _, name = rel.rpartition(b"/")
    try:
        return name_to_handle_at(stack.dirfd(layer, parent), name)
    except OSError:
        return None  # no handles on that filesystem: the kernel's index cannot name it either


def _shows_lower(view: LowerView, rel: bytes, ident: tuple[int, int]) -> bool:
    """Whether the merged view shows lower object *ident* at *rel* (layer 0 is the upper)."""
    entry = view.lookup(rel)
    if entry is None or entry.is_dir or entry.layers[0] == 0:
        return False
    return (entry.st.st_dev, entry.st.st_ino) == ident

