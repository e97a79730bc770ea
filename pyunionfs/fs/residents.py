"""Nodes of the files of big lower directories, kept as columns, not objects.

Why: ``ls -l`` of a directory of 200,000 files makes the kernel hold 200,000
inodes (READDIRPLUS gives it one per entry), and the daemon a node for each
for as long as the kernel keeps them.  As an object (:class:`.inodes.Node`
with its path, its entry, its number and a slot in the table) a node costs
about 400 bytes.  Most of those files are plain files of one lower layer,
which cannot change under the mount: all a node of one needs to say is which
name of which listing it is and how often the kernel looked it up.  Such a
node is *resident*: a position in its listing's :class:`Table` (its number,
its lookup count and one flag: 9 bytes), found by its number through one
open-addressing hash of packed 4-byte references (at most four fifths full:
5 to 10 bytes a node), with no Python object per node.

A resident node is only ever that plain case: a file or symlink with one
link, listed by READDIRPLUS from a directory of one lower layer (see
``Directories._entries``).  :class:`.inodes.InodeTable` turns it into a full
node ("promotes" it) before anything that could change it or what it shows
(a copy-up, a rename, an unlink, a pin, an open, a lookup by name), so
everything but the kernel's reads of attributes and xattrs sees full nodes
as before; those reads are answered from the columns.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: Listings this long and longer get their nodes as residents.  A small
#: directory's nodes cost little as objects, and its files are the likelier
#: to be opened next (which makes a resident node a full one anyway).
RESIDENT_FROM = 1024

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: consecutive inode numbers spread
# A reference is (table number + 1) << _POSITION_BITS | position, in 32 bits.
_POSITION_BITS = 22
_POSITION = (1 << _POSITION_BITS) - 1
#: Positions listed from which a table's listing is taken to be read to its end.
_READ_ON = 4096
_LOOKUPS = 0x7F
_BARE = 0x80
#: Tables at once, and positions in one (past them, nodes are full ones).
MOST_TABLES = (1 << (32 - _POSITION_BITS)) - 1
MOST_POSITIONS = 1 << _POSITION_BITS


@dataclass(slots=True, eq=False)
class Table:
    """The resident nodes listed from one listing of one directory."""

    #: The directory's node number (its node is held while any of these is).
    parent: int
    #: The one lower layer the directory (and so each of these files) is in.
    layer: int
    #: The listing's names, shared with it (a listing is never changed).
    names: Sequence[bytes]
    #: Per position in the listing (up to the last one made resident so far):
    #: the node's number, 0 where none is resident.
    inos: array
    #: Per position: the kernel's lookups of that node (the low 7 bits: one,
    #: from its listing; a listing gives a held node bare, and a lookup by
    #: name makes it a full node) and _BARE where the object is known to
    #: carry no xattrs (the kernel asks every ``ls -l`` entry for its label and ACL).
    state: bytearray
    #: Its number among the tables (``Residents._tables``).
    number: int = 0
    #: How many of its positions hold a resident node.
    live: int = 0

    def lookups(self, pos: int) -> int:
        return self.state[pos] & _LOOKUPS

    def bare(self, pos: int) -> bool:
        """Whether the node at *pos* is known to carry no xattrs."""
        return bool(self.state[pos] & _BARE)

    def mark_bare(self, pos: int) -> None:
        self.state[pos] |= _BARE

    def forgot(self, pos: int, count: int) -> bool:
        """*count* lookups fewer of the node at *pos*; True if none are left."""
        if self.state[pos] & _LOOKUPS <= count:
            return True
        self.state[pos] -= count
        return False


_NO_TABLE = Table(0, 0, (), array("Q"), bytearray())


class Residents:
    """Every resident node, found by number."""

    def __init__(self) -> None:
        self._tables: list[Table | None] = []
        self._spare: list[int] = []
        #: The newest table of each directory (by its node number), and how many it has.
        self._newest: dict[int, Table] = {}
        self._count_of: dict[int, int] = {}
        # Slots of packed references ((table number + 1) << 22 | position), 0 when empty;
        # linear probing from a number's home slot, kept at most four fifths full (a miss
        # then probes about 13 slots, a hit 3: listings check their own positions, not the
        # hash, so misses are rare; half full would take twice the bytes).
        self._slots = array("I", bytes(4 * 64))
        self._shift = 64 - 6
        #: Resident nodes held.
        self.count = 0
        # The last one found: ``ls -l`` asks each entry for two xattrs, one request
        # after the other.
        self._last: tuple[int, Table, int] = (0, _NO_TABLE, 0)

    def __len__(self) -> int:
        return self.count

    def room(self, parent: int, names: Sequence[bytes]) -> bool:
        """Whether the nodes of listing *names* of directory *parent* can be resident."""
        if len(names) > MOST_POSITIONS:
            return False
        t = self._newest.get(parent)
        return (t is not None and t.names is names) or bool(self._spare) or len(self._tables) < MOST_TABLES

    def only(self, parent: int, names: Sequence[bytes]) -> Table | None:
        """The table of listing *names* of directory *parent* where no other
        table of that directory exists (an empty one if it has none): then a
        node listed at position *i* of *names* is resident exactly when
        ``i < len(t.inos) and t.inos[i]`` is its number (a file of one link
        has one name, and a rename makes it a full node), with no search of
        the hash.  None where the directory has other tables."""
        count = self._count_of.get(parent, 0)
        if not count:
            return _NO_TABLE
        t = self._newest.get(parent)
        return t if count == 1 and t is not None and t.names is names else None

    def _table(self, parent: int, layer: int, names: Sequence[bytes]) -> Table:
        """The table for listing *names* of directory *parent* in *layer*
        (made with its first resident: a table is dropped with its last)."""
        t = self._newest.get(parent)
        if t is not None and t.names is names and t.layer == layer:
            return t
        number = self._spare.pop() if self._spare else len(self._tables)
        t = Table(parent, layer, names, array("Q"), bytearray(), number)
        if number == len(self._tables):
            self._tables.append(t)
        else:
            self._tables[number] = t
        self._newest[parent] = t
        self._count_of[parent] = self._count_of.get(parent, 0) + 1
        return t

    def _home(self, ino: int) -> int:
        return ((ino * _GOLDEN) & _MASK64) >> self._shift

    def find(self, ino: int) -> tuple[Table, int] | None:
        """(table, position) of resident node *ino*, or None."""
        last = self._last
        if last[0] == ino:
            return last[1], last[2]
        slots, tables = self._slots, self._tables
        mask = len(slots) - 1
        i = ((ino * _GOLDEN) & _MASK64) >> self._shift
        while ref := slots[i]:
            t = tables[(ref >> _POSITION_BITS) - 1]
            pos = ref & _POSITION
            if t is not None and t.inos[pos] == ino:
                self._last = (ino, t, pos)
                return t, pos
            i = (i + 1) & mask
        return None

    def add(self, parent: int, layer: int, names: Sequence[bytes], pos: int, ino: int) -> None:
        """Make node *ino* resident, looked up once, as name *pos* of listing
        *names* of directory *parent* in *layer* (it is not resident yet)."""
        t = self._table(parent, layer, names)
        if pos >= len(t.inos):  # (columns grow with the positions listed: a reader may stop early)
            more = min(max(pos + 1, 2 * len(t.inos), 64), len(names)) - len(t.inos)
            t.inos.frombytes(bytes(8 * more))
            t.state += bytes(more)
            if len(t.inos) >= _READ_ON:
                # A reader this far in reads it all (ls -l): room for the rest now, not a
                # rehash of every node at each doubling (0.4 s of 200,000 nodes).
                self._room_for(self.count + len(names) - t.live)
        self._room_for(self.count + 1)
        self._place((t.number + 1) << _POSITION_BITS | pos, ino)
        t.inos[pos], t.state[pos] = ino, 1
        t.live += 1
        self.count += 1

    def _place(self, ref: int, ino: int) -> None:
        slots = self._slots
        mask = len(slots) - 1
        i = self._home(ino)
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = ref

    def _room_for(self, count: int) -> None:
        """Slots enough for *count* nodes, at most four fifths full."""
        size = len(self._slots)
        while count * 5 > size * 4:
            size *= 2
        if size != len(self._slots):
            self._resize(size)

    def _resize(self, size: int) -> None:
        old = self._slots
        self._slots = array("I", bytes(4 * size))
        self._shift = 64 - (size.bit_length() - 1)
        tables = self._tables
        for ref in old:
            if ref:
                t = tables[(ref >> _POSITION_BITS) - 1]
                assert t is not None
                self._place(ref, t.inos[ref & _POSITION])

    def remove(self, t: Table, pos: int) -> int:
        """Drop the resident node at *pos* of *t*; returns its lookups."""
        ino, lookups = t.inos[pos], t.lookups(pos)
        self._last = (0, _NO_TABLE, 0)
        slots, tables = self._slots, self._tables
        mask = len(slots) - 1
        want = (t.number + 1) << _POSITION_BITS | pos
        i = self._home(ino)
        while slots[i] != want:
            i = (i + 1) & mask
        # Backward-shift deletion: later members of the probe run move up, so
        # every number stays reachable from its home without tombstones.
        j = i
        while True:
            j = (j + 1) & mask
            ref = slots[j]
            if not ref:
                break
            other = tables[(ref >> _POSITION_BITS) - 1]
            assert other is not None
            home = self._home(other.inos[ref & _POSITION])
            if (j - home) & mask >= (j - i) & mask:
                slots[i] = ref
                i = j
        slots[i] = 0
        t.inos[pos], t.state[pos] = 0, 0
        t.live -= 1
        self.count -= 1
        if self.count * 8 < len(slots) > 64:  # (the kernel let go of most: so does the hash)
            self._resize(len(slots) // 4)
        if not t.live:
            self._tables[t.number] = None
            self._spare.append(t.number)
            if self._newest.get(t.parent) is t:
                del self._newest[t.parent]
            left = self._count_of[t.parent] - 1
            if left:
                self._count_of[t.parent] = left
            else:
                del self._count_of[t.parent]
        return lookups

    def __iter__(self) -> Iterator[tuple[Table, int]]:
        """(table, position) of every resident node."""
        for t in list(self._tables):
            if t is not None:
                for pos, ino in enumerate(t.inos):
                    if ino:
                        yield t, pos

    def forget_xattrs(self) -> None:
        """What is known of xattrs is no longer trusted (after a drop of caches)."""
        for t in self._tables:
            if t is not None:
                t.state[:] = bytes(b & _LOOKUPS for b in t.state)
