"""Open directories and the reading of merged listings, for :class:`.union.UnionFS`.

Two kinds of reader, one listing format.  A reader with a handle
(:meth:`Directories.open`: the reference engine, or ``-o timeout=0``) keeps
the listing it opened on, shared with the other handles of that directory
version (:class:`.cache.Listing`), until it rewinds or closes.  A reader
without one (the kernel's zero-message opendir, see ``Engine.opendir``)
has nothing the daemon could keep a listing in: its offsets carry the
listing's version instead (:meth:`Directories.read_at`).  Either way a
reader that stops and resumes while the directory changes sees every name
it had not seen yet that is still there, each once, as POSIX asks.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import fs_error
from .answers import Attr
from .cache import Listing
from .callers import DAEMON, Caller
from .entry import Entry
from .handles import HandleTable
from .inodes import ROOT_INO, Candidate, InodeTable, Node
from .layers import KIND_MODES, LayerStack, Scan
from .override import Overrides
from .paths import split
from .residents import RESIDENT_FROM
from .resolve import Resolver

#: Names left to list from which READDIR reads the directory's own entries (see :meth:`Directories.read`).
SCAN_FROM = 16
#: Handle-less readdir offsets (see :meth:`Directories.read_at` and :func:`offset_of`): bits 26
#: to 30 say how many low bits the position takes, the bits between hold the listing's version.
_BITS_AT = 26
#: Offsets at or past this are long ones: the version above bit 32, the position below.
_LONG = 1 << 31
#: Most position bits of a short offset (4,194,303 entries): at least 4 bits of version stay.
_MOST_BITS = 22

#: What a listing yields: (next offset, name, node-to-be, attributes).
Entries = Iterator[tuple[int, bytes, Node | None, Attr]]


class Union(Protocol):
    """What directories need of their union (:class:`.union.UnionFS`, which
    holds them: named here by what it offers, so that neither module imports
    the other)."""

    resolver: Resolver
    inodes: InodeTable
    handles: HandleTable
    stack: LayerStack
    overrides: Overrides | None

    def node(self, ino: int) -> Node: ...
    def check_current(self, node: Node) -> None: ...
    def attr_of(self, ino: int, entry: Entry, path: bytes) -> Attr: ...
    def resolve_path(self, path: bytes) -> Entry: ...


@dataclass(slots=True)
class _OpenDir:
    """An open directory: its node (which the kernel holds while it is open,
    so the node's path follows renames), the listing it reads (shared with
    the other handles of that version, see :class:`.cache.Listing`; None
    once the directory is removed) and whose handle it is."""

    ino: int
    entry: Entry
    listing: Listing | None
    #: The directory identity the listing is filed under.
    ident: tuple[int, int]
    uid: int


class Directories:
    """The directories open on one union, and how their listings are read."""

    def __init__(self, fs: Union) -> None:
        self.fs = fs
        self._open: dict[int, _OpenDir] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        """Number of open directory handles."""
        return len(self._open)

    def ino_of(self, handle: int) -> int | None:
        """The directory open as *handle*, if it is open."""
        d = self._open.get(handle)
        return d.ino if d is not None else None

    def listing_of(self, handle: int) -> Listing | None:
        """The listing *handle* reads now (tests look at its scan)."""
        d = self._open.get(handle)
        return d.listing if d is not None else None

    def open(self, ino: int, caller: Caller) -> int:
        """A handle on directory *ino* for *caller* (counted in its fair
        share, see :mod:`.handles`); its listing is made now, or shared."""
        fs = self.fs
        node = fs.node(ino)
        if not node.entry.is_dir:
            raise fs_error(errno.ENOTDIR)
        if node.gone:
            raise fs_error(errno.ENOENT)
        fs.check_current(node)
        with fs.handles.share.admitted(caller.uid):
            entry = node.entry
            listing = self._open_listing(entry, node.path)
        handle = next(self._ids)
        self._open[handle] = _OpenDir(ino, entry, listing, entry.ident, caller.uid)
        return handle

    def release(self, handle: int) -> None:
        d = self._open.pop(handle, None)
        if d is None:
            return
        if d.listing is not None:
            self.fs.resolver.cache.close_listing(d.ident, d.listing)
        self.fs.handles.share.give(d.uid)

    def close(self) -> None:
        """Release every handle (at unmount)."""
        for handle in list(self._open):
            self.release(handle)

    def _open_listing(self, entry: Entry, path: bytes) -> Listing:
        resolver = self.fs.resolver
        return resolver.cache.open_listing(entry.ident, lambda: resolver.names(entry, path))

    def _relist(self, d: _OpenDir, path: bytes | None) -> None:
        """Point *d* at the directory's current listing (None: it was removed)."""
        old, old_ident = d.listing, d.ident
        d.listing = None if path is None else self._open_listing(d.entry, path)
        d.ident = d.entry.ident
        if old is not None:
            self.fs.resolver.cache.close_listing(old_ident, old)

    def read(self, handle: int, start: int, plain: bool = False, lean: bool = False) -> Entries:
        """Entries from offset *start*: (next offset, name, node-to-be, attributes).

        ``.`` and ``..`` come first (offsets 1 and 2) with node None: the
        kernel takes no reference on them; another name with node None is
        one that cannot be looked up (EPERM, EIO), listed with its type
        only.  For the others the caller must call ``UnionFS.remember``
        once the kernel accepted the entry.  Offset 0 means "from the
        start" and re-reads the directory, like overlayfs on rewind.

        *plain*: only the number and type of each entry are wanted (READDIR,
        not READDIRPLUS): every entry comes with node None, and files and
        symlinks of a directory of one lower layer are read from its
        directory entries without an lstat each (:meth:`.Resolver.scanned`).
        *lean*: entries of nodes the kernel holds already come with node
        None too (READDIRPLUS then sends them with node ID 0).
        """
        d = self._open.get(handle)
        if d is None:
            raise fs_error(errno.EBADF)
        node = self.fs.inodes[d.ino]
        if node.gone:
            if d.listing is not None:
                self._relist(d, None)  # removed while open: nothing is left in it
        else:
            d.entry = node.entry  # it may have been copied up since opendir
            if start == 0:
                self._relist(d, node.path)
        return self._entries(node, d.entry, d.listing, start, plain, lean)

    def read_at(
        self, ino: int, cookie: int, plain: bool = False, caller: Caller = DAEMON, lean: bool = False
    ) -> Entries:
        """:meth:`read` of directory *ino* for *caller*, a reader without a handle.

        Each offset carries the version of the listing it points into
        (held for it: :class:`.cache.HeldListings`; see :func:`offset_of`), so
        a reader resumes in the listing it started on, whatever changed in
        the directory since: no name it has not seen yet is skipped, as a
        handle's own listing guarantees.  Offset 0 starts on the current
        listing.  A version pushed out of memory meanwhile resumes on the
        current listing at the same position.
        """
        fs = self.fs
        node = fs.node(ino)
        if not node.entry.is_dir:
            raise fs_error(errno.ENOTDIR)
        version, mask, bits, start = parse_offset(cookie)
        listing = None
        if not node.gone:  # (removed: nothing is left in it)
            resolver = fs.resolver
            if start:
                listing = resolver.cache.held.get(
                    node.entry.ident, lambda lst: lst.version & mask == version and _bits(lst) == bits
                )
            else:  # (a read from the start is what opendir was: the same check)
                fs.check_current(node)
            if listing is None:
                entry, path = node.entry, node.path
                listing = resolver.cache.held.hold(entry.ident, lambda: resolver.names(entry, path), caller.uid)
        if listing is None:
            yield from self._entries(node, node.entry, None, start, plain, lean)
            return
        base = offset_of(listing.version, _bits(listing), 0)  # (once: a position only adds its own bits)
        for off, name, child, attr in self._entries(node, node.entry, listing, start, plain, lean):
            yield base | off, name, child, attr

    def _entries(
        self, node: Node, parent: Entry, listing: Listing | None, start: int, plain: bool, lean: bool
    ) -> Entries:
        """The entries of directory *node* (resolving as *parent*) from
        position *start* of *listing* (see :meth:`read`)."""
        fs = self.fs
        names = listing.names if listing is not None else []
        # (Not for a few names: the kernel's last READDIR of a listing, past its end, is the most common.)
        big = plain and len(names) + 2 - max(start, 2) > SCAN_FROM
        scan = self._scan(listing, parent, node.path) if big and listing is not None else None
        dev = parent.st.st_dev if scan is not None else 0
        if start < 1:
            yield 1, b".", None, fs.attr_of(node.ino, parent, node.path)
        if start < 2:
            yield 2, b"..", None, self._dotdot_attr(node)
        # (Looked up once, not per entry: nothing else runs in the core meanwhile.)
        at, number, attr_of, nodes, holds = node.path, fs.inodes.number, fs.attr_of, fs.inodes.nodes, fs.inodes.holds
        # The plain files of a big directory of one lower layer are given to the kernel as
        # resident nodes (see .residents), and their entries not cached (they would take
        # a whole listing's worth of memory again, and a GETATTR reads the file anyway).
        # Only for the native engine's READDIRPLUS (*lean*), whose entries of held nodes go bare:
        # then a node made resident here is never one already (see InodeTable.remember).
        layer, own = None, None
        if lean and not plain and listing is not None and len(names) >= RESIDENT_FROM and fs.overrides is None:
            layer = fs.resolver.plain_lower(parent) if fs.inodes.residents.room(node.ino, names) else None
            own = fs.inodes.residents.only(node.ino, names)
        child = fs.resolver.listed(parent, at, store=layer is None)

        def held(ino: int, i: int) -> bool:
            """Whether the kernel holds node *ino*, listed at *i* (see Residents.only)."""
            full = nodes.get(ino)
            if full is not None:
                return full.lookups > 0 and not full.gone
            if own is not None:
                return i < len(own.inos) and own.inos[i] == ino
            return holds(ino)

        # Bare entries (number and kind, no node) where nothing more is of use: a READDIR takes
        # no more, and, for an engine that can send them (*lean*: pyfuse3 cannot), a READDIRPLUS
        # entry of a node the kernel already holds (git's lstats before its directory scan)
        # would only refresh what it has, and cost a reference it then FORGETs.  Not with
        # owner/mode records: one may change the kind shown.
        bare = fs.overrides is None
        prefix = at + b"/" if at else b""
        for i in range(max(start, 2) - 2, len(names)):
            name = names[i]
            if scan is not None and (kind := KIND_MODES.get(scan.kinds[i])) is not None:  # (name for path: not root's)
                yield i + 3, name, None, _bare(number((dev, scan.inos[i]), name), kind)
                continue
            path = prefix + name
            try:
                entry = child(name)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EIO):
                    raise
                # A name whose lookup fails (a metadata-only copy not
                # followed, or without data) is still listed, as the kernel
                # lists it: with no node, so the kernel makes no entry of it.
                st = next(filter(None, (fs.stack.lstat(k, node.path, name) for k in parent.layers)), None)
                if st is not None:
                    yield i + 3, name, None, _bare(number((st.st_dev, st.st_ino), path), st.st_mode)
                continue
            if entry is None:
                continue
            ino = number(entry.ident, path)
            if bare and (plain or (lean and held(ino, i))):
                yield i + 3, name, None, _bare(ino, entry.st.st_mode)
                continue
            if layer is not None and ino not in nodes and entry.plain_in(layer):
                made: Node = Candidate(ino, path, entry, 0, node.ino, layer=layer, listing=names, position=i)
            else:
                made = Node(ino, path, entry, 0, node.ino)
            yield i + 3, name, made, attr_of(ino, entry, path)

    def _scan(self, lst: Listing, entry: Entry, path: bytes) -> Scan | None:
        """The entries' own numbers and kinds for listing *lst* of directory
        *entry*, read once per listing."""
        if not lst.current:  # changed since: each name is resolved as it is now
            return None
        if not lst.scanned:
            lst.scanned = True
            lst.scan = self.fs.resolver.scanned(entry, path, lst.names)
        return lst.scan

    def _dotdot_attr(self, node: Node) -> Attr:
        """Attributes of an open directory's parent: the node the kernel holds
        (it keeps a cached child's parent), else a walk from the root."""
        fs = self.fs
        if node.ino == ROOT_INO:
            return fs.attr_of(node.ino, node.entry, node.path)
        above = fs.inodes.get(node.parent)
        if above is not None:
            return fs.attr_of(above.ino, above.entry, above.path)
        parent_path = split(node.path)[0]
        parent_entry = fs.resolve_path(parent_path)
        return fs.attr_of(fs.inodes.number(parent_entry.ident, parent_path), parent_entry, parent_path)


def _bare(ino: int, mode: int) -> Attr:
    """Attributes of a listed entry that carries only its number and type."""
    return Attr(ino, mode, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def _bits(listing: Listing) -> int | None:
    """How many bits a position in *listing* takes in a short offset (its
    last entry's is its length + 2); None: too long for one."""
    bits = max(2, (len(listing.names) + 2).bit_length())
    return bits if bits <= _MOST_BITS else None


def offset_of(version: int, bits: int | None, position: int) -> int:
    """The offset of *position* in the listing with *version*.

    Short where the listing allows (under 2**31): 32-bit programs read
    directories with a 32-bit offset, and glibc fails their readdir with
    EOVERFLOW past it (ext4 gives them 31-bit offsets for that reason).  So
    the version is kept only in the bits the position leaves, wrapped: a
    reader that pauses while the directory changes that many times more
    resumes in a newer listing, as one let go of.  A listing of more than
    4 million names takes long offsets, the version whole above bit 32.
    """
    if bits is None:
        return version << 32 | position
    return bits << _BITS_AT | (version & ((1 << (_BITS_AT - bits)) - 1)) << bits | position


def parse_offset(cookie: int) -> tuple[int, int, int | None, int]:
    """(version as the offset has it, the mask it was kept under, position
    bits, position) of offset *cookie* (see :func:`offset_of`); offset 0 is
    position 0."""
    if cookie >= _LONG:
        return cookie >> 32, -1, None, cookie & 0xFFFFFFFF
    bits = min(cookie >> _BITS_AT, _MOST_BITS)  # (min: an offset we never gave)
    kept = (1 << (_BITS_AT - bits)) - 1
    return cookie >> bits & kept, kept, bits, cookie & ((1 << bits) - 1)
