"""The compact lstat an entry keeps (:class:`pyunionfs.fs.entry.Stat`): every
field as ``os.stat_result`` gives it, for every file type and for values at
the edges of their ranges, and an entry's type read from it in place."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from pyunionfs.fs.entry import Entry, Stat, only

FIELDS = ("st_mode", "st_uid", "st_gid", "st_ino", "st_dev", "st_nlink", "st_rdev", "st_size", "st_blksize",
          "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")  # fmt: skip


def _objects(tmp_path: Path) -> list[Path]:
    (tmp_path / "f").write_bytes(b"x" * 5000)
    (tmp_path / "d").mkdir()
    os.symlink("f", tmp_path / "l")
    os.mkfifo(tmp_path / "p")
    out = [tmp_path / n for n in ("f", "d", "l", "p")]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(tmp_path / "b", stat.S_IFBLK | 0o600, os.makedev(7, 255))
        out += [tmp_path / "c", tmp_path / "b"]
    return out


def test_every_field_as_lstat_gives_it(tmp_path: Path) -> None:
    for path in _objects(tmp_path):
        st = os.lstat(path)
        packed = Stat.of(st)
        assert {f: getattr(packed, f) for f in FIELDS} == {f: getattr(st, f) for f in FIELDS}, path
        assert packed.fields() == tuple(getattr(st, f) for f in FIELDS)
        assert Stat.of(packed) is packed
        entry = Entry(only(0), packed, (st.st_dev, st.st_ino))
        assert entry.is_dir == stat.S_ISDIR(st.st_mode), path
        assert entry.real == (st.st_dev, st.st_ino)


class _Edge:
    """An lstat with every field at the edge of what the kernel can return:
    its device numbers, link counts and block sizes are 32 bits (``dev_t``,
    ``kstat.nlink``, ``kstat.blksize``), widened by stat(2)."""

    def __init__(self, **fields: Any) -> None:
        for name in FIELDS:
            setattr(self, name, fields.get(name, 0))


@pytest.mark.parametrize("fields", [
    {"st_mode": stat.S_IFDIR | 0o7777, "st_uid": 2**32 - 2, "st_gid": 2**32 - 2, "st_ino": 2**64 - 1,
     "st_dev": 2**32 - 1, "st_nlink": 2**32 - 1, "st_rdev": 2**32 - 1, "st_size": 2**63 - 1,
     "st_blksize": 2**32 - 1, "st_blocks": 2**63 - 1, "st_atime_ns": 2**63 - 1, "st_mtime_ns": 2**63 - 1,
     "st_ctime_ns": 2**63 - 1},
    {"st_mode": stat.S_IFREG, "st_atime_ns": -(2**63), "st_mtime_ns": -1, "st_ctime_ns": -10**18},
])  # fmt: skip
def test_edges_of_each_range(fields: dict[str, int]) -> None:
    packed = Stat.of(_Edge(**fields))  # type: ignore[arg-type]
    assert {f: getattr(packed, f) for f in FIELDS} == {f: fields.get(f, 0) for f in FIELDS}
    assert Entry(only(3), packed, (1, 1)).is_dir == stat.S_ISDIR(fields["st_mode"])


def test_one_layers_tuple_per_layer() -> None:
    assert only(2) == (2,) and only(2) is only(2)


def _size(entry: Entry) -> int:
    """What an entry takes with its lstat, as pymalloc allocates (16-byte steps)."""
    parts = [entry] if entry.st is entry else [entry, entry.st]
    return sum(-(-sys.getsizeof(p) // 16) * 16 for p in parts)


def test_an_entry_is_small_and_keeps_its_own_identity_in_its_stat(tmp_path: Path) -> None:
    """Most entries are their own object in one layer: one object of 128
    bytes with the lstat (an entry of four slots and its Stat took 192), the
    identity read from the lstat, no tuple of its own."""
    (tmp_path / "f").write_bytes(b"x")
    st = os.lstat(tmp_path / "f")
    own = Entry(only(1), Stat.of(st))
    assert own.ident == own.real == (st.st_dev, st.st_ino)
    assert (own.xwh, own.nlink, own.index, own.data, own.impure) == ((), None, None, None, ())
    assert own.layers == (1,) and own.layers is only(1) and own.linked_up is False and not own.merged
    assert {f: getattr(own.st, f) for f in FIELDS} == {f: getattr(st, f) for f in FIELDS}
    assert own.st.fields() == Stat.of(st).fields()
    assert _size(own) <= 128
    assert Entry.lean(1, st) == own and hash(Entry.lean(1, st)) == hash(own) and _size(Entry.lean(1, st)) <= 128
    assert Entry.lean(0, st).linked_up and Entry.lean(0, st) != own
    assert own != Stat.of(st) and Stat.of(st) != own  # an lstat is not an entry, whatever its bytes
    origin = Entry(only(0), Stat.of(st), (7, 9), nlink=3)
    assert origin.ident == (7, 9) and origin.real == (st.st_dev, st.st_ino) and origin.nlink == 3
    assert origin == Entry(only(0), Stat.of(st), (7, 9), nlink=3) != own
    assert len({origin, Entry(only(0), Stat.of(st), (7, 9), nlink=3)}) == 1
    assert "ident=(7, 9)" in repr(origin)


def test_a_fresh_lstat_keeps_the_identity_it_was_given(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    st = Stat.of(os.lstat(tmp_path / "f"))
    origin = Entry(only(0), st, (7, 9), (2,), index=b"idx", impure=(1,))
    (tmp_path / "f").write_bytes(b"longer")
    again = origin.restat(Stat.of(os.lstat(tmp_path / "f")), 5, None)
    assert again.ident == (7, 9) and again.st.st_size == 6 and again.nlink == 5
    assert (again.xwh, again.index, again.impure, again.data) == ((2,), b"idx", (1,), None)
    own = Entry(only(1), st).restat(Stat.of(os.lstat(tmp_path / "f")), None, None)
    assert own.ident == (st.st_dev, st.st_ino)


def test_both_forms_of_an_entry_answer_alike(tmp_path: Path) -> None:
    """An entry with more to say than its lstat and layer keeps slots; one
    without is its lstat.  Which one ``Entry(...)`` made must not show."""
    (tmp_path / "f").write_bytes(b"x")
    st = Stat.of(os.lstat(tmp_path / "f"))
    lean = Entry(only(2), st)
    for full in (Entry(only(2), st, (7, 9)), Entry(only(2), st, nlink=2), Entry((0, 2), st),
                 Entry(only(2), st, impure=(2,)), Entry(only(2), st, index=b"k")):  # fmt: skip
        assert full.st is st and full != lean and full.st.fields() == lean.st.fields()
    # An identity given that is the lstat's own is not kept apart from it.
    assert Entry(only(2), st, lean.ident) == lean and _size(Entry(only(2), st, lean.ident)) <= 128
    # A lean entry's lstat is itself; handing it on as an lstat keeps its fields.
    again = Entry(only(0), Stat.of(lean.st), (1, 2))
    assert again.st.fields() == st.fields() and again.layers == (0,) and again.ident == (1, 2)
    assert Entry(only(0), lean.st).real == lean.real and Entry(only(0), lean.st).layers == (0,)
    # A fresh lstat of a lean entry is lean again; with a link count it is not.
    assert lean.restat(st, None, None) == lean
    assert lean.restat(st, 3, None).nlink == 3 and lean.restat(st, 3, None).ident == lean.ident
    # Layers past what two bytes hold take the full form.
    assert Entry(only(70000), st).layers == (70000,) and Entry.lean(70000, st).layers == (70000,)
    assert Entry(only(65535), st).layers == (65535,)
    assert "layers=(2,)" in repr(lean) and "st_size=1" in repr(lean)
    assert len({lean, Entry(only(2), st), Entry.lean(2, os.lstat(tmp_path / "f"))}) == 1


def test_the_union_keeps_most_names_lean_and_a_copy_its_origin(tmp_path: Path) -> None:
    """Through the union: a lower file and a file the upper made itself are
    entries of one object (their lstat with the layer); a copied-up file keeps
    its lower original's identity (the inode number the mount showed before
    the copy), so it keeps the full form."""
    from pyunionfs.config import MountConfig
    from pyunionfs.fs.writes import WritableUnionFS

    from .conftest import b, lookup_path, mkdir, mkfile

    low, up, work = mkdir(tmp_path / "l"), mkdir(tmp_path / "u"), mkdir(tmp_path / "w")
    mkfile(low / "lower", b"l")
    mkfile(low / "copied", b"c")
    mkfile(up / "own", b"u")
    fs = WritableUnionFS(MountConfig(lowers=(b(low),), upper=b(up), mountpoint=b(tmp_path / "mnt"), workdir=b(work)))
    try:
        for name, layer in (("lower", 1), ("own", 0)):
            ino, attr = lookup_path(fs, name)
            entry = fs.node(ino).entry
            assert entry.layers == (layer,) and entry.ident == entry.real and _size(entry) <= 128, name
            assert fs.getattr(ino).ino == attr.ino and _size(fs.node(ino).entry) <= 128, name
        ino, before = lookup_path(fs, "copied")
        fs.release(fs.open_file(ino, os.O_WRONLY))  # copies it up
        entry = fs.node(ino).entry
        assert entry.layers == (0,) and entry.ident != entry.real  # its origin's, not the copy's own
        assert fs.getattr(ino).ino == before.ino and entry.st is not entry
    finally:
        fs.close()
