"""What the resolver learnt about merged directories, kept until we change them.

Resolving a name costs a syscall per layer, plus xattr reads for directories
(opaque markers) and copied-up files (origin records); listing a merged
directory lists every layer.  Lowers never change under a mount (overlayfs's
rule, and ours), and the upper changes only through this daemon, so those
answers stay true until one of our own writes changes them: the write path
tells the cache exactly which names it touched (:meth:`ResolutionCache.changed`)
and which directories it removed (:meth:`ResolutionCache.dropped`).

Facts are filed under the directory's identity (its ``Entry.ident``), not its
path: a renamed directory keeps everything learnt about its contents, and no
change ever has to walk a subtree.  For an upper object, only *where* a name
resolves counts (its layers, identity, markers): a hit still costs one
``lstat`` of it, so sizes and times are always fresh.  A lower object's
attributes cannot change under the mount, so its hit costs no syscall.

Memory is bounded: past :data:`MAX_ENTRIES` names, the least recently used
directories are forgotten whole.

Open directories hold their listing apart from that (:class:`Listing`): a
handle must keep the names it was opened with (POSIX: entries added or
removed after opendir may or may not show, but the rest must, once each),
whatever the cache forgot meanwhile.  Handles opened on the same version of
a directory share one listing, as the kernel's overlayfs shares its
``ovl_dir_cache``: without that, every opendir after the cache forgot a big
directory (or after a change to it) kept its own copy, and 900 handles on a
100,000-entry directory held 1.8 GB.  A listing is freed when its last
handle closes.

Readers without a handle (the kernel's zero-message opendir, see
``Engine.opendir``) have no close to free a listing with: the listings they
read are *held* (:class:`HeldListings`), each under a version number that
their readdir offsets carry, the least recently read of the user holding
the most let go once they hold :data:`MAX_HELD_NAMES` names together.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .entry import Entry
    from .layers import Scan

#: Cached names (positive and negative, plus listed names) across all
#: directories.  About 430 bytes each (a listed name and its entry, measured
#: by tests/unit/test_core_cache.py), so about 45 MiB at most.
MAX_ENTRIES = 100_000

#: Names in the listings held for readers without a handle (see above):
#: about 20 MiB (some 100 bytes a name, with its entry's number and kind).
#: Each listing counts one more, so that empty ones are bounded too.  The
#: listing read last is held whatever its size.
MAX_HELD_NAMES = 200_000
#: Versions of one directory held at once: a directory changed and read
#: again and again has its oldest versions let go first.
MAX_HELD_VERSIONS = 16

Ident = tuple[int, int]


@dataclass(slots=True)
class _Dir:
    #: Candidate names of the merged directory (see ``Resolver.names``).
    names: list[bytes] | None = None
    #: name -> where it resolves (None: not there).
    children: dict[bytes, Entry | None] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Listing:
    """The candidate names of one version of a directory, shared by the
    handles opened on it (never changed: a change makes a new one)."""

    names: list[bytes]
    #: Open handles holding it.
    refs: int = 0
    #: Whether the directory is unchanged since it was listed.
    current: bool = True
    #: Each name's inode number and kind as its one layer records them
    #: (``Resolver.scanned``), once asked for; None where not known.
    scan: Scan | None = None
    scanned: bool = False
    #: Its number in the offsets of readers without a handle (0: none yet).
    version: int = 0


class ResolutionCache:
    """Per merged directory: its candidate names and where its names resolve."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._dirs: OrderedDict[Ident, _Dir] = OrderedDict()
        self._size = 0
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        #: The newest listing of each directory that has open handles.
        self._listings: dict[Ident, Listing] = {}
        #: Listings held by open handles, and the names in them (for the stats).
        self.live_listings = 0
        self.live_listed_names = 0
        #: Listings held for readers without a handle.
        self.held = HeldListings(self)

    def __len__(self) -> int:
        """Number of cached names (each listing counts as its length)."""
        return self._size

    def _dir(self, ident: Ident) -> _Dir:
        d = self._dirs.get(ident)
        if d is None:
            d = self._dirs[ident] = _Dir()
        else:
            self._dirs.move_to_end(ident)
        return d

    def lookup(self, parent: Ident, name: bytes) -> tuple[bool, Entry | None]:
        """(known, entry): *known* False means "resolve it yourself"."""
        d = self._dirs.get(parent)
        if d is None or name not in d.children:
            self.misses += 1
            return False, None
        self.hits += 1
        return True, d.children[name]

    def store(self, parent: Ident, name: bytes, entry: Entry | None) -> None:
        children = self._dir(parent).children
        if name not in children:
            self._size += 1
        children[name] = entry
        self._trim()

    def names(self, ident: Ident) -> list[bytes] | None:
        d = self._dirs.get(ident)
        return d.names if d is not None else None

    def store_names(self, ident: Ident, names: list[bytes]) -> None:
        d = self._dir(ident)
        self._size += len(names) - len(d.names or ())
        d.names = names
        self._trim()

    def open_listing(self, ident: Ident, list_now: Callable[[], list[bytes]]) -> Listing:
        """A reference to the current listing of directory *ident*, shared
        with the handles already open on this version of it; *list_now*
        lists it when none is.

        A directory changed and changed back (a temporary file made and
        removed; a copy-up) lists the same names again: then the handles
        share the earlier listing too, and the cache keeps that one copy.
        """
        lst = self._listings.get(ident)
        if lst is None or not lst.current:
            names = list_now()
            if lst is not None and lst.names == names:
                lst.current = True
                d = self._dirs.get(ident)
                if d is not None and d.names is names:
                    d.names = lst.names
            else:
                lst = self._listings[ident] = Listing(names)
                self.live_listings += 1
                self.live_listed_names += len(names)
        lst.refs += 1
        return lst

    def close_listing(self, ident: Ident, lst: Listing) -> None:
        """A handle let go of *lst* (a listing of directory *ident*): freed
        with its last handle."""
        lst.refs -= 1
        if lst.refs > 0:
            return
        self.live_listings -= 1
        self.live_listed_names -= len(lst.names)
        if self._listings.get(ident) is lst:
            del self._listings[ident]

    def _listing_stale(self, ident: Ident) -> None:
        lst = self._listings.get(ident)
        if lst is not None:
            lst.current = False

    def changed(self, parent: Ident, name: bytes) -> None:
        """We created, removed, replaced or copied up *name* in directory *parent*."""
        self._listing_stale(parent)
        d = self._dirs.get(parent)
        if d is None:
            return
        if d.names is not None:
            self._size -= len(d.names)
            d.names = None
        if name in d.children:
            del d.children[name]
            self._size -= 1

    def dropped(self, ident: Ident) -> None:
        """Directory *ident* is gone: its identity may name another one later."""
        self._listing_stale(ident)
        d = self._dirs.pop(ident, None)
        if d is not None:
            self._size -= len(d.children) + len(d.names or ())

    def negatives(self, ident: Ident) -> list[bytes]:
        """The names known to be missing from directory *ident*."""
        d = self._dirs.get(ident)
        return [n for n, e in d.children.items() if e is None] if d is not None else []

    def clear(self) -> None:
        """Forget everything (a lower may have changed): open handles keep
        their listings, new ones list afresh."""
        for lst in self._listings.values():
            lst.current = False
        self._dirs.clear()
        self._size = 0

    def _trim(self) -> None:
        while self._size > self.max_entries and len(self._dirs) > 1:
            _, d = self._dirs.popitem(last=False)
            self._size -= len(d.children) + len(d.names or ())


class HeldListings:
    """The listings held for readers without a handle (see the module's
    docstring), by version, each charged to the user whose read first held
    it.  Past :data:`MAX_HELD_NAMES` names, the least recently read listing
    of the user holding the most names is let go first: one user's many
    readers push out their own listings, not another user's.  The listing
    held last is kept whatever its size (its reader is part-way through
    it)."""

    def __init__(self, cache: ResolutionCache, max_names: int = MAX_HELD_NAMES) -> None:
        self._cache = cache
        self.max_names = max_names
        #: Names in the held listings together.
        self.names = 0
        self._by_version: dict[int, tuple[Ident, Listing, int]] = {}
        #: Each directory's held versions, oldest first.
        self._by_ident: dict[Ident, list[int]] = {}
        #: Each user's held versions, least recently read first, and their names.
        self._by_uid: dict[int, OrderedDict[int, None]] = {}
        self._names_by_uid: dict[int, int] = {}
        self._versions = itertools.count(1)

    def __len__(self) -> int:
        """Number of held listings."""
        return len(self._by_version)

    def hold(self, ident: Ident, list_now: Callable[[], list[bytes]], uid: int) -> Listing:
        """The current listing of directory *ident* (as
        :meth:`ResolutionCache.open_listing` finds or makes it), held under
        its version for user *uid*'s reader until pushed out."""
        lst = self._cache.open_listing(ident, list_now)
        item = self._by_version.get(lst.version)
        if item is not None:
            lst.refs -= 1  # the hold already counts
            self._by_uid[item[2]].move_to_end(lst.version)
            return lst
        if not lst.version:
            lst.version = next(self._versions)
        self._by_version[lst.version] = (ident, lst, uid)
        self._by_ident.setdefault(ident, []).append(lst.version)
        self._by_uid.setdefault(uid, OrderedDict())[lst.version] = None
        self._names_by_uid[uid] = self._names_by_uid.get(uid, 0) + _cost(lst)
        self.names += _cost(lst)
        same = self._by_ident[ident]
        if len(same) > MAX_HELD_VERSIONS:
            self._release(same[0])
        self._let_go(keep=lst.version)
        return lst

    def get(self, ident: Ident, match: Callable[[Listing], bool]) -> Listing | None:
        """The newest listing of directory *ident* still held that *match*
        accepts (an offset names a version only in part: see
        ``directories.offset_of``).  Only *ident*'s: an offset is the
        reader's to choose (lseek), and versions are easy to guess, so a
        version of another directory must not list that one's names."""
        for version in reversed(self._by_ident.get(ident, ())):
            _, lst, uid = self._by_version[version]
            if match(lst):
                self._by_uid[uid].move_to_end(version)
                return lst
        return None

    def _let_go(self, keep: int) -> None:
        """Let go of listings past the bound (see the class), never *keep*."""
        while self.names > self.max_names:
            # (Users holding something but *keep*; a few users at most, so a plain max.)
            others = [uid for uid, versions in self._by_uid.items() if len(versions) > (keep in versions)]
            if not others:
                return
            uid = max(others, key=self._names_by_uid.__getitem__)
            self._release(next(v for v in self._by_uid[uid] if v != keep))

    def _release(self, version: int) -> None:
        """Let go of the listing held under *version*."""
        ident, lst, uid = self._by_version.pop(version)
        same = self._by_ident[ident]
        same.remove(version)
        if not same:
            del self._by_ident[ident]
        versions = self._by_uid[uid]
        del versions[version]
        self._names_by_uid[uid] -= _cost(lst)
        if not versions:
            del self._by_uid[uid], self._names_by_uid[uid]
        self.names -= _cost(lst)
        self._cache.close_listing(ident, lst)


def _cost(lst: Listing) -> int:
    """What a held listing counts against :data:`MAX_HELD_NAMES`."""
    return len(lst.names) + 1
