"""What one lookup finds: the layers a merged name lives in, and its identity.

Its own module because both the resolver that makes entries
(:mod:`.resolve`) and the cache that keeps them (:mod:`.cache`) need it,
and the cache must not import the resolver.
"""

from __future__ import annotations

import stat
import struct
from typing import NamedTuple, Protocol

#: How :class:`Stat` packs an lstat: mode, uid, gid; ino, dev, nlink, rdev;
#: size, blksize, blocks and the three times in ns.  76 bytes: a device
#: number fits 32 bits (the kernel's dev_t is 32 bits; stat(2) widens it),
#: as do a link count and a block size (32 bits in the kernel's kstat).
#: At 76 a Stat takes 128 bytes with its headers; at 77 it would take 144.
_LAYOUT = struct.Struct("<3IQ3IqIq3q")
_U32, _U64, _S64 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<q")
#: st_ino and st_dev, side by side in the layout.
_INO_DEV = struct.Struct("<QI")
_STAT_SIZE = _LAYOUT.size
#: A lean entry: the lstat, then its layer's number (78 bytes: up to 79 take 128 allocated).
_LAYER = struct.Struct("<H")
_LEAN_LAYOUT = struct.Struct(_LAYOUT.format + "H")
_MOST_LAYER = 0xFFFF


#: One shared ``(layer,)`` per layer: most entries live in one layer, and a
#: tuple each would cost 48 bytes of every entry the kernel holds.
_ONLY: dict[int, tuple[int, ...]] = {}


def only(layer: int) -> tuple[int, ...]:
    """The layers tuple of an entry that lives in *layer* alone."""
    layers = _ONLY.get(layer)
    if layers is None:
        layers = _ONLY.setdefault(layer, (layer,))
    return layers


class StatLike(Protocol):
    """The lstat fields the union reads: an ``os.stat_result`` or a :class:`Stat`."""

    @property
    def st_mode(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_dev(self) -> int: ...
    @property
    def st_nlink(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_blksize(self) -> int: ...
    @property
    def st_blocks(self) -> int: ...
    @property
    def st_atime_ns(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...


class Stat(bytes):
    """An lstat kept compactly: the fields a stat reply needs, packed in
    76 bytes (128 allocated with its headers, against 600 for an ``os.stat_result`` with the
    int and float objects it holds), and not tracked by the cyclic garbage
    collector.  Every entry the kernel holds keeps one, so a directory of a
    million files keeps a million.  Read a field as on ``os.stat_result``,
    or all of them at once with :meth:`fields` where many are needed."""

    __slots__ = ()

    @classmethod
    def of(cls, st: StatLike) -> Stat:
        if isinstance(st, Stat):
            return st
        return cls(_LAYOUT.pack(st.st_mode, st.st_uid, st.st_gid, st.st_ino, st.st_dev, st.st_nlink, st.st_rdev,
                                st.st_size, st.st_blksize, st.st_blocks,
                                st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns))  # fmt: skip

    def fields(self) -> tuple[int, ...]:
        """(mode, uid, gid, ino, dev, nlink, rdev, size, blksize, blocks, atime_ns, mtime_ns, ctime_ns)."""
        return _LAYOUT.unpack_from(self)

    @property
    def st_mode(self) -> int:
        return int(_U32.unpack_from(self, 0)[0])

    @property
    def st_uid(self) -> int:
        return int(_U32.unpack_from(self, 4)[0])

    @property
    def st_gid(self) -> int:
        return int(_U32.unpack_from(self, 8)[0])

    @property
    def st_ino(self) -> int:
        return int(_U64.unpack_from(self, 12)[0])

    @property
    def st_dev(self) -> int:
        return int(_U32.unpack_from(self, 20)[0])

    @property
    def st_nlink(self) -> int:
        return int(_U32.unpack_from(self, 24)[0])

    @property
    def st_rdev(self) -> int:
        return int(_U32.unpack_from(self, 28)[0])

    @property
    def st_size(self) -> int:
        return int(_S64.unpack_from(self, 32)[0])

    @property
    def st_blksize(self) -> int:
        return int(_U32.unpack_from(self, 40)[0])

    @property
    def st_blocks(self) -> int:
        return int(_S64.unpack_from(self, 44)[0])

    @property
    def st_atime_ns(self) -> int:
        return int(_S64.unpack_from(self, 52)[0])

    @property
    def st_mtime_ns(self) -> int:
        return int(_S64.unpack_from(self, 60)[0])

    @property
    def st_ctime_ns(self) -> int:
        return int(_S64.unpack_from(self, 68)[0])

    def __repr__(self) -> str:
        names = ("mode", "uid", "gid", "ino", "dev", "nlink", "rdev", "size", "blksize", "blocks",
                 "atime_ns", "mtime_ns", "ctime_ns")  # fmt: skip
        return "Stat(" + ", ".join(f"st_{n}={v}" for n, v in zip(names, self.fields(), strict=True)) + ")"

    __str__ = __repr__


class DataRef(NamedTuple):
    """Where a metadata-only copy finds its data (the kernel's "lowerdata"):
    a regular file at *path* (its own path in that layer, not a merged one)
    of lower *layer*, with *blocks* its st_blocks, which the copy shows."""

    layer: int
    path: bytes
    blocks: int


class _Rare:
    """The fields of an :class:`Entry` that only a few entries need."""

    __slots__ = ("xwh", "nlink", "index", "data", "impure")

    def __init__(
        self, xwh: tuple[int, ...], nlink: int | None, index: bytes | None, data: DataRef | None,
        impure: tuple[int, ...],
    ) -> None:
        self.xwh, self.nlink, self.index, self.data, self.impure = xwh, nlink, index, data, impure


class Entry:
    """Where a merged name lives, as found by one lookup.

    Never changed once made: the resolution cache and the nodes share
    entries, and a change makes a new one.  Every name the kernel holds
    keeps one, so it is kept small, in one of two forms that ``Entry(...)``
    picks and nobody else needs to know about:

    - most names are their own object in one layer, with nothing more to
      say: such an entry is its packed lstat with the layer's number after
      it (:class:`_Lean`, one object of 128 bytes, where an entry object
      and its :class:`Stat` took 192: a directory of a million files the
      kernel holds keeps a million);
    - the rest (merged directories, hard links, copies, metadata-only
      copies) keep four slots, the fields only they need in one shared
      object (:class:`_Full`).

    A frozen dataclass of all eight fields with its identity tuple cost 212
    bytes an entry, and three times as long to make.
    """

    __slots__ = ()

    #: Layers that make up the entry, topmost first.  A non-directory has one;
    #: a merged directory has every layer whose directory it merges.
    layers: tuple[int, ...]
    #: lstat of the entry in ``layers[0]``: what the mount shows.
    st: Stat

    def __new__(
        cls,
        layers: tuple[int, ...],
        st: Stat,
        ident: tuple[int, int] | None = None,
        xwh: tuple[int, ...] = (),
        nlink: int | None = None,
        index: bytes | None = None,
        data: DataRef | None = None,
        impure: tuple[int, ...] = (),
    ) -> Entry:
        if ident is not None and ident == _own_ident(st):
            ident = None  # (an identity that is the lstat's own is not kept apart from it)
        if (
            ident is None and len(layers) == 1 and layers[0] <= _MOST_LAYER and not xwh and not impure
            and nlink is None and index is None and data is None
        ):  # fmt: skip
            return _Lean(bytes(st)[:_STAT_SIZE] + _LAYER.pack(layers[0]))
        full = object.__new__(_Full)
        full.layers, full.st, full._ident = layers, st, ident
        full._rare = (
            _Rare(xwh, nlink, index, data, impure)
            if xwh or impure or nlink is not None or index is not None or data is not None
            else None
        )
        return full

    @staticmethod
    def lean(layer: int, st: StatLike) -> Entry:
        """``Entry(only(layer), Stat.of(st))`` for an ``os.stat_result``
        *st*, packed at once (the lookup of every lower file comes here)."""
        if layer > _MOST_LAYER or isinstance(st, Stat):
            return Entry(only(layer), Stat.of(st))
        return _Lean(_LEAN_LAYOUT.pack(st.st_mode, st.st_uid, st.st_gid, st.st_ino, st.st_dev, st.st_nlink,
                                       st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
                                       st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, layer))  # fmt: skip

    @property
    def ident(self) -> tuple[int, int]:
        """(st_dev, st_ino) that names the object for inode numbering:
        the object's own (*ident* None when made), or another's: for a
        directory the lowest merged layer's, so it does not change when a
        lower directory later gets a copy in the upper; for a copied-up
        file its lower original's."""
        raise NotImplementedError

    @property
    def xwh(self) -> tuple[int, ...]:
        """Layers in which this directory holds xattr whiteouts (opaque=x)."""
        return ()

    @property
    def nlink(self) -> int | None:
        """The merged link count of an indexed hard-linked file (its
        ``overlay.nlink`` record); None means st_nlink."""
        return None

    @property
    def index(self) -> bytes | None:
        """The name in the work dir's ``index/`` of the object this entry shows,
        when the merged name itself is still only in a lower layer: a lower
        hard link whose copy-up was made through another of its names.  The
        object is that index copy (``layers == (0,)``, ``st`` is its lstat),
        but this name has no upper link yet.  None: the object is at the name."""
        return None

    @property
    def data(self) -> DataRef | None:
        """The data of a metadata-only copy (an ``overlay.metacopy`` record on
        the object in ``layers[0]``, whose own content is a hole): reads go
        there until the first write copies it in.  None: the object holds its data."""
        return None

    @property
    def impure(self) -> tuple[int, ...]:
        """Layers in which this directory carries the overlay's ``impure``
        record (entries in it were copied up or moved there by an overlay):
        only there can a file be a metadata-only copy the kernel made."""
        return ()

    def restat(self, st: StatLike, nlink: int | None, data: DataRef | None) -> Entry:
        """This entry with a fresh lstat *st* of its object (and *nlink*,
        *data* as they are now); its identity stays as it was given."""
        raise NotImplementedError

    def _key(self) -> tuple[object, ...]:
        # (The lstat's own bytes: a lean entry's lstat is itself, its layer after it.)
        return (self.layers, bytes(self.st)[:_STAT_SIZE], self.ident, self.xwh, self.nlink, self.index, self.data,
                self.impure)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        names = ("layers", "st", "ident", "xwh", "nlink", "index", "data", "impure")
        values = (self.layers, Stat(bytes(self.st)[:_STAT_SIZE]), *self._key()[2:])
        return "Entry(" + ", ".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True)) + ")"

    def plain_in(self, layer: int) -> bool:
        """Whether this is a file or symlink of one link that is its own
        object in *layer* with nothing more to say (what a resident node
        can be, see :mod:`.residents`): only a lean entry is."""
        return False

    @property
    def real(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the object in ``layers[0]``: what a path
        found for this entry must lead to (``ident`` may be an origin's)."""
        return _own_ident(self.st)

    @property
    def linked_up(self) -> bool:
        """Whether the upper holds this object under this very name."""
        return self.layers[0] == 0 and self.index is None

    @property
    def is_dir(self) -> bool:
        return (self.st[1] & 0xF0) << 8 == stat.S_IFDIR  # the type bits of st_mode, read in place

    @property
    def merged(self) -> bool:
        """A directory that unions more than one layer (overlayfs reports nlink 1)."""
        return len(self.layers) > 1


class _Lean(Stat, Entry):
    """An entry that is its own object in one layer, with nothing else to
    say: its packed lstat with the layer's number after it (78 bytes, 128
    allocated).  It is its own ``st``.  Made by ``Entry(...)`` alone."""

    __slots__ = ()

    @property
    def layers(self) -> tuple[int, ...]:  # type: ignore[override]
        layer = _layer_of(self)
        layers = _ONLY.get(layer)
        return layers if layers is not None else only(layer)

    @property
    def st(self) -> Stat:  # type: ignore[override]
        return self

    @property
    def ident(self) -> tuple[int, int]:
        return _own_ident(self)

    real = ident

    @property
    def index(self) -> bytes | None:  # type: ignore[override]
        return None  # (else bytes.index, found first)

    def restat(self, st: StatLike, nlink: int | None, data: DataRef | None) -> Entry:
        if nlink is None and data is None:  # (every GETATTR of a file of one layer: packed once)
            return Entry.lean(_layer_of(self), st)
        return Entry(self.layers, Stat.of(st), None, (), nlink, None, data)

    @property
    def linked_up(self) -> bool:
        return _layer_of(self) == 0

    def plain_in(self, layer: int) -> bool:
        return _layer_of(self) == layer and not self.is_dir and self.st_nlink == 1

    @property
    def merged(self) -> bool:
        return False

    # (bytes comes before Entry in the order methods are looked up in.)
    __eq__ = Entry.__eq__
    __hash__ = Entry.__hash__
    __repr__ = __str__ = Entry.__repr__


def _layer_of(lean: _Lean) -> int:
    """The layer number a lean entry keeps after its lstat (little-endian, two bytes)."""
    return lean[_STAT_SIZE] | lean[_STAT_SIZE + 1] << 8


def _own_ident(st: Stat) -> tuple[int, int]:
    """(st_dev, st_ino) as packed in *st*."""
    ino, dev = _INO_DEV.unpack_from(st, 12)
    return dev, ino


class _Full(Entry):
    """An entry with something more than an lstat and a layer to say:
    four slots, the fields a few entries need in one shared object."""

    __slots__ = ("layers", "st", "_ident", "_rare")

    _ident: tuple[int, int] | None
    _rare: _Rare | None

    @property
    def ident(self) -> tuple[int, int]:
        ident = self._ident
        return _own_ident(self.st) if ident is None else ident

    @property
    def xwh(self) -> tuple[int, ...]:
        return () if self._rare is None else self._rare.xwh

    @property
    def nlink(self) -> int | None:
        return None if self._rare is None else self._rare.nlink

    @property
    def index(self) -> bytes | None:
        return None if self._rare is None else self._rare.index

    @property
    def data(self) -> DataRef | None:
        return None if self._rare is None else self._rare.data

    @property
    def impure(self) -> tuple[int, ...]:
        return () if self._rare is None else self._rare.impure

    def restat(self, st: StatLike, nlink: int | None, data: DataRef | None) -> Entry:
        return Entry(self.layers, Stat.of(st), self._ident, self.xwh, nlink, self.index, data, self.impure)

    @property
    def linked_up(self) -> bool:
        return self.layers[0] == 0 and (self._rare is None or self._rare.index is None)
