"""Inode numbers and the kernel's references to them.

Numbering follows overlayfs's "xino" idea: an object's number is its real
inode number, with the index of its filesystem in the high bits.  So numbers
are unique across layers on different filesystems, stable for the life of the
mount (and across remounts), and two names of one hardlinked lower file get
the same number, as they must.  With all layers on one filesystem the index is
0 and st_ino is the real one, as in overlayfs.  A real number too large for
the remaining bits (or one that would read as the root's) gets a number from a
private range instead: unique, but only stable while mounted.

FUSE uses the inode number as the node id, so the table also counts the
kernel's lookups and forgets a node when the kernel does.  The nodes of the
plain files of big lower directories are kept as columns until something
needs more of them (:mod:`.residents`); every way in here but :meth:`peek`
and ``in`` sees a full node.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .entry import Entry
from .paths import join
from .residents import Residents, Table

ROOT_INO = 1
#: The xattr names of an object with none, shared by every such node.
NO_XATTRS: frozenset[bytes] = frozenset()
_DEV_SHIFT = 48
_REAL_MASK = (1 << _DEV_SHIFT) - 1
_PRIVATE_BASE = 1 << 63


@dataclass(slots=True)
class Node:
    """One object the kernel knows: its number, where it is, how often looked up."""

    ino: int
    path: bytes
    entry: Entry
    lookups: int = 0
    #: The directory it was last seen in, for ``..`` without a walk from the root.
    parent: int = ROOT_INO
    #: Other names of a hard-linked file seen so far (``path`` is one of them).
    aliases: set[bytes] | None = None
    #: No name left (unlinked or replaced while the kernel still holds it).
    gone: bool = False
    #: An O_PATH fd on the object, taken just before the name it was known
    #: by went away (unlinked, or replaced by a rename), and held until the
    #: kernel forgets the node.  From then on requests for the node reach
    #: the object through it (while it is the object the node shows, see
    #: ``union._pin``): the name may hold another object now, and the object
    #: may have names we never learnt (hard links) or none.
    #: The kernel's overlayfs keeps its real inode referenced the same way,
    #: so the upper's filesystem cannot hand this inode number to a new file
    #: while the kernel still has the old one (same node id, another object).
    pin: int | None = None
    #: Its xattr names as last listed, to answer "no such xattr" without a
    #: syscall (the kernel asks for ``security.capability`` before every
    #: write, ``ls -l`` for ACLs and labels).  None: not known.  Only our own
    #: setxattr adds a name, and it resets this.
    xattrs: frozenset[bytes] | None = None

    def names(self) -> list[bytes]:
        return [self.path, *(self.aliases or ())]


@dataclass(slots=True)
class Candidate(Node):
    """A listed node that may stay resident (see :mod:`.residents`): name
    *position* of the names *listing* of a directory of lower *layer*."""

    layer: int = 0
    listing: Sequence[bytes] = ()
    position: int = 0


class InodeTable:
    """Maps inode numbers to nodes and real objects to inode numbers."""

    def __init__(self, root: Entry, devices: Sequence[int] = ()) -> None:
        # Index the layers' filesystems up front, in a fixed order, so the
        # same layers give the same numbers at every mount whatever is looked
        # up first.  A filesystem mounted inside a layer is indexed when first
        # seen: its numbers are stable only for the life of the mount.
        self._devs: dict[int, int] = {}
        for dev in devices:
            self._devs.setdefault(dev, len(self._devs))
        self._private: dict[tuple[int, int], int] = {}
        self._next_private = itertools.count(_PRIVATE_BASE)
        self._root_ident = root.ident
        self.nodes: dict[int, Node] = {ROOT_INO: Node(ROOT_INO, b"", root, 1)}
        self.residents = Residents()
        #: The entry of the object at a merged path of a lower layer, or None
        #: (set by the union): what a resident node becomes a full node with.
        self.lower_entry: Callable[[int, bytes], Entry | None] = lambda layer, path: None
        # FUSE node ids are inode numbers, and a filesystem reuses the number
        # of a deleted file; a new generation tells the kernel that a number
        # it may still hold now names another object.
        self._generations: dict[int, int] = {}

    def number(self, ident: tuple[int, int], path: bytes | None = None) -> int:
        """The inode number of the object *ident* = (st_dev, st_ino) seen at *path*.

        Only the root path gets the root's number: a layer nested in another
        (which config refuses, as the kernel does) would otherwise show the
        root's identity again below it.
        """
        if ident == self._root_ident:
            if not path:
                return ROOT_INO
            return self._private_number(ident)
        dev, real = ident
        index = self._devs.setdefault(dev, len(self._devs))
        ino = (index << _DEV_SHIFT) | real
        if real & ~_REAL_MASK or index >= 1 << (63 - _DEV_SHIFT) or ino == ROOT_INO:
            ino = self._private_number(ident)
        return ino

    def _private_number(self, ident: tuple[int, int]) -> int:
        ino = self._private.get(ident)
        if ino is None:
            ino = self._private[ident] = next(self._next_private)
        return ino

    def __getitem__(self, ino: int) -> Node:
        node = self.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

    def get(self, ino: int) -> Node | None:
        """The full node *ino* (a resident one becomes full now), or None."""
        node = self.nodes.get(ino)
        if node is None and self.residents.count:
            node = self._promote(ino)
        return node

    def __contains__(self, ino: int) -> bool:
        """Whether the kernel may name node *ino* (full or resident); nothing changes."""
        return ino in self.nodes or (self.residents.count > 0 and self.residents.find(ino) is not None)

    def holds(self, ino: int) -> bool:
        """Whether the kernel holds node *ino* by a name now (looked up, not gone)."""
        node = self.nodes.get(ino)
        if node is not None:
            return node.lookups > 0 and not node.gone
        return self.residents.count > 0 and self.residents.find(ino) is not None

    def peek(self, ino: int) -> Node | None:
        """Node *ino* to read from without making it full: a resident one
        comes as a node made now and not kept (what is set on it is lost)."""
        node = self.nodes.get(ino)
        if node is None and self.residents.count:
            found = self.residents.find(ino)
            if found is not None:
                node = self._made(*found)
        return node

    def resident(self, ino: int) -> tuple[int, bytes, Table, int] | None:
        """(lower layer, merged path, table, position) of node *ino* if it
        is resident (not a full node); None if it is not."""
        found = self.residents.find(ino) if self.residents.count and ino not in self.nodes else None
        if found is None:
            return None
        t, pos = found
        path = self._path_of(t, pos)
        return None if path is None else (t.layer, path, t, pos)

    def _path_of(self, t: Table, pos: int) -> bytes | None:
        """The merged path of the resident node at *pos* of *t*: its
        directory's path (it follows renames) and its name."""
        above = self.nodes.get(t.parent)
        return None if above is None else join(above.path, t.names[pos])

    def _made(self, t: Table, pos: int) -> Node | None:
        """A full node (not kept) for the resident node at *pos* of *t*;
        None if its name no longer holds that object (a lower layer
        changed under the mount, which it must not)."""
        ino, path = t.inos[pos], self._path_of(t, pos)
        if path is None:
            return None
        entry = self.lower_entry(t.layer, path)
        if entry is None or self.number(entry.ident, path) != ino:
            return None
        node = Node(ino, path, entry, t.lookups(pos), t.parent)
        if t.bare(pos):
            node.xattrs = NO_XATTRS
        return node

    def _promote(self, ino: int) -> Node | None:
        found = self.residents.find(ino)
        if found is None:
            return None
        node = self._made(*found)
        if node is not None:
            self.residents.remove(*found)
            self.nodes[ino] = node
        return node

    def resident_names(self) -> Iterator[tuple[int, int, bytes]]:
        """(number, directory's number, name) of every resident node."""
        for t, pos in self.residents:
            yield t.inos[pos], t.parent, t.names[pos]

    def remember(self, path: bytes, entry: Entry, parent: int = ROOT_INO, made: Node | None = None) -> Node:
        """Record that the kernel now holds one more reference to *entry* at *path*.

        *made* is a node already made for it and not in the table (a listing
        makes one per entry it gives the kernel): the table takes that one
        if it has none of the number yet, not a copy.
        """
        ino = self.number(entry.ident, path) if made is None else made.ino
        node = self.nodes.get(ino)
        # (A candidate is never resident already: a listing gives a held node bare.)
        if node is None and type(made) is not Candidate and self.residents.count and (
            found := self.residents.find(ino)
        ) is not None:
            # Looked up by name: the full node takes over the kernel's lookups so far.
            t, pos = found
            node = self.nodes[ino] = Node(ino, path, entry, self.residents.remove(t, pos), parent)
        if node is None:
            if type(made) is Candidate:
                self.residents.add(made.parent, made.layer, made.listing, made.position, ino)
                return made
            if made is None:
                made = Node(ino, path, entry, parent=parent)
            node = self.nodes[ino] = made
        else:
            if node.pin is not None and entry.real != _ident(os.fstat(node.pin)):
                os.close(node.pin)  # the number names another object now
                node.pin = None
            node.entry = entry
            if ino != ROOT_INO:
                if node.gone:
                    node.gone, node.aliases, node.xattrs = False, None, None
                elif node.path != path and not entry.is_dir:
                    if node.aliases is None:
                        node.aliases = set()
                    node.aliases.add(node.path)
                    node.aliases.discard(path)
                node.path = path
                node.parent = parent
        node.lookups += 1
        return node

    def generation(self, ino: int) -> int:
        return self._generations.get(ino, 0)

    def unlinked(self, ino: int, path: bytes, last: bool) -> None:
        """Name *path* of object *ino* was removed; *last* if it had no other name."""
        if last:
            self._generations[ino] = self._generations.get(ino, 0) + 1
        node = self.get(ino)
        if node is None:
            return
        if node.aliases:
            node.aliases.discard(path)
        if node.path == path:
            if node.aliases:
                node.path = node.aliases.pop()
            else:
                node.gone = True
        if last:
            node.gone = True

    def moved(self, renames: dict[bytes, bytes]) -> None:
        """Rewrite node paths after a rename: each key path (and everything
        below it) is now at its value.  Several keys move at once (exchange).
        A resident node's path is its directory's path and its name: it follows."""

        def remap(p: bytes) -> bytes:
            for old, new in renames.items():
                if p == old:
                    return new
                if p.startswith(old + b"/"):
                    return new + p[len(old) :]
            return p

        for node in self.nodes.values():
            if node.gone or node.ino == ROOT_INO:
                continue
            node.path = remap(node.path)
            if node.aliases:
                node.aliases = {remap(a) for a in node.aliases}

    def renamed(self, ino: int, old: bytes, new: bytes) -> None:
        """Name *old* of non-directory *ino* is now *new* (what :meth:`moved`
        does, without scanning every node: no other path can change)."""
        node = self.get(ino)
        if node is None or node.gone:
            return
        if node.path == old:
            node.path = new
        elif node.aliases and old in node.aliases:
            node.aliases.discard(old)
            node.aliases.add(new)

    def forget(self, ino: int, count: int) -> int | None:
        """The kernel dropped *count* references; drop the node at zero.

        Returns the node's pin, if it had one, for the caller to close once
        it has let go of the core's lock: the pin is often the last
        reference of an unlinked file, whose close frees it on disk (an
        orphan's eviction, a journal transaction), which must not hold up
        every other request.
        """
        node = self.nodes.get(ino)
        if node is None and self.residents.count and (found := self.residents.find(ino)) is not None:
            t, pos = found
            if t.forgot(pos, count):
                self.residents.remove(t, pos)
                if t.live and t.live * 16 < len(t.inos):
                    # The few left keep a whole listing's names and columns: full nodes cost less now.
                    for left in [i for i in t.inos if i]:
                        self._promote(left)
            return None
        if node is None or ino == ROOT_INO:
            return None
        node.lookups -= count
        if node.lookups > 0:
            return None
        del self.nodes[ino]
        pin, node.pin = node.pin, None
        return pin

    def pin(self, ino: int, fd: int) -> bool:
        """Hold *fd* (an O_PATH fd on node *ino*'s object) as its pin; False
        (and *fd* closed) if the kernel holds no such node or it has one."""
        node = self.nodes.get(ino)
        if node is None or node.pin is not None or ino == ROOT_INO:
            os.close(fd)
            return False
        node.pin = fd
        return True

    def close(self) -> None:
        """Release the pins of every node (at unmount)."""
        for node in self.nodes.values():
            if node.pin is not None:
                os.close(node.pin)
                node.pin = None


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
