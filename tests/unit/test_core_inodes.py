"""Inode numbering (xino-style) and the kernel reference counts."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyunionfs.fs.entry import Entry, Stat
from pyunionfs.fs.inodes import ROOT_INO, InodeTable, Node

from .conftest import lookup_path, mkfile

SHIFT = 48
ROOT_IDENT = (77, 2)


def make_table(root_ident=ROOT_IDENT, devices=()) -> InodeTable:
    st = os.stat("/")
    return InodeTable(Entry((0,), Stat.of(st), root_ident), devices)


def entry(ident, is_dir=False) -> Entry:
    st = os.stat("/" if is_dir else "/proc/self/exe")
    return Entry((0,), Stat.of(st), ident)


def test_root_ident_is_1():
    t = make_table()
    assert t.number(ROOT_IDENT) == ROOT_INO == 1
    assert t[ROOT_INO].path == b""
    assert t[ROOT_INO].lookups == 1


def test_same_ident_same_number():
    t = make_table()
    assert t.number((5, 100)) == t.number((5, 100))
    assert t.number((5, 100)) != t.number((5, 101))


def test_first_device_keeps_real_number():
    t = make_table()
    assert t.number((5, 12345)) == 12345


def test_different_dev_different_high_bits():
    t = make_table()
    a = t.number((5, 1000))
    b = t.number((6, 1000))
    c = t.number((7, 1000))
    assert a != b != c != a
    assert len({a >> SHIFT, b >> SHIFT, c >> SHIFT}) == 3
    assert a & ((1 << SHIFT) - 1) == b & ((1 << SHIFT) - 1) == c & ((1 << SHIFT) - 1) == 1000
    assert max(a, b, c) < 1 << 63
    assert t.number((6, 2000)) >> SHIFT == b >> SHIFT  # one index per device


def test_huge_real_inode_gets_private_number():
    t = make_table()
    big = (5, 1 << SHIFT)
    bigger = (5, (1 << 64) - 1)
    n1 = t.number(big)
    n2 = t.number(bigger)
    assert n1 >= 1 << 63 and n2 >= 1 << 63
    assert n1 != n2
    assert n1 < 1 << 64 and n2 < 1 << 64
    assert t.number(big) == n1  # stable on repeat
    assert t.number(bigger) == n2
    assert t.number((5, 7)) == 7  # a small one on that device is still real


def test_real_number_1_does_not_alias_root():
    t = make_table()
    n = t.number((5, 1))  # device index 0, real inode 1 would read as the root
    assert n != ROOT_INO
    assert n >= 1 << 63
    assert t.number((5, 1)) == n


def test_too_many_devices_fall_back_to_private():
    t = make_table()
    limit = 1 << (63 - SHIFT)
    numbers = [t.number((dev, 9)) for dev in range(1000, 1000 + limit + 3)]
    assert len(set(numbers)) == len(numbers)
    assert all(n < 1 << 63 for n in numbers[:limit])
    assert all(n >= 1 << 63 for n in numbers[limit:])


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(2, (1 << 50))), min_size=1, max_size=60))
def test_numbers_injective_and_stable(idents):
    t = make_table((999, 1))
    first = {i: t.number(i) for i in idents}
    assert {i: t.number(i) for i in idents} == first
    assert len(set(first.values())) == len(first)
    assert ROOT_INO not in first.values()
    assert 0 not in first.values()


def test_numbers_independent_of_lookup_order():
    """The layers' filesystems are indexed up front, in layer order."""
    t1, t2 = make_table(devices=(10, 20)), make_table(devices=(10, 20))
    a, b = (10, 5), (20, 5)
    n1 = (t1.number(a), t1.number(b))
    n2 = (t2.number(b), t2.number(a))[::-1]
    assert n1 == n2


def test_remember_counts_and_forget():
    t = make_table()
    e = entry((5, 300))
    n = t.remember(b"a/f", e)
    assert n.ino == 300 and n.lookups == 1 and n.path == b"a/f"
    n2 = t.remember(b"b/hardlink", e)
    assert n2 is n and n.lookups == 2 and n.path == b"b/hardlink"
    t.forget(300, 1)
    assert t.get(300) is n
    t.forget(300, 1)
    assert t.get(300) is None
    with pytest.raises(KeyError):
        t[300]
    t.forget(300, 1)  # already gone: ignored


def test_remember_takes_a_listed_node_not_a_copy():
    """A listing makes a node per entry; the table keeps that very node when
    it has none of the number, and counts into its own one when it has."""
    t = make_table()
    e = entry((5, 300))
    listed = Node(300, b"a/f", e, parent=7)
    n = t.remember(b"a/f", e, 7, made=listed)
    assert n is listed and t[300] is listed and n.lookups == 1 and n.parent == 7
    again = Node(300, b"a/link", e, parent=8)  # the same file under a second name of the listing
    n2 = t.remember(b"a/link", e, 8, made=again)
    assert n2 is listed and t[300] is listed and n.lookups == 2
    assert n.path == b"a/link" and n.parent == 8 and n.aliases == {b"a/f"}


def test_forgetting_a_pinned_node_hands_its_pin_to_the_caller(tmp_path):
    """The caller closes the pin once it let go of the core lock (its close may free a file)."""
    t = make_table()
    t.remember(b"p", entry((5, 302)))
    (tmp_path / "f").write_bytes(b"")
    fd = os.open(tmp_path / "f", os.O_PATH)
    assert t.pin(302, fd)
    assert t.forget(302, 1) == fd
    os.fstat(fd)  # still open: the table did not close it
    os.close(fd)
    assert t.get(302) is None
    assert t.forget(302, 1) is None


def test_forget_over_count_drops():
    t = make_table()
    t.remember(b"x", entry((5, 301)))
    t.forget(301, 50)
    assert t.get(301) is None


def test_root_never_forgotten():
    t = make_table()
    root_entry = t[ROOT_INO].entry
    t.remember(b"", root_entry)
    t.forget(ROOT_INO, 1000)
    assert t.get(ROOT_INO) is not None
    # Remembering the root under another path does not move it.
    t.remember(b"elsewhere", root_entry)
    assert t[ROOT_INO].path == b""


# -- across real filesystems (tmp_path on one, /dev/shm tmpfs on another) ---------------------------


@pytest.fixture
def other_fs_dir(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="pyunionfs-test-")
    if os.stat(d).st_dev == os.stat(tmp_path).st_dev:
        shutil.rmtree(d)
        pytest.skip("/dev/shm is on the same filesystem as tmp_path")
    yield d
    shutil.rmtree(d)


def test_cross_fs_inos_unique(layer, make_fs, other_fs_dir):
    l1 = layer("l1")
    names = [f"f{i}" for i in range(20)]
    for n in names:
        mkfile(l1 / n)
        mkfile(os.path.join(other_fs_dir, "o" + n))
    fs = make_fs([l1, other_fs_dir])
    inos = [lookup_path(fs, n)[1].ino for n in names] + [lookup_path(fs, "o" + n)[1].ino for n in names]
    assert len(set(inos)) == len(inos)
    assert len({i >> SHIFT for i in inos}) == 2
    assert ROOT_INO not in inos


def test_cross_fs_inos_stable_across_remount(layer, make_fs, other_fs_dir):
    l1 = layer("l1")
    mkfile(l1 / "on-ext4")
    mkfile(os.path.join(other_fs_dir, "on-tmpfs"))
    first = make_fs([l1, other_fs_dir])
    a1 = lookup_path(first, "on-ext4")[1].ino
    b1 = lookup_path(first, "on-tmpfs")[1].ino
    second = make_fs([l1, other_fs_dir])  # "remount", then look up in the other order
    b2 = lookup_path(second, "on-tmpfs")[1].ino
    a2 = lookup_path(second, "on-ext4")[1].ino
    assert (a1, b1) == (a2, b2)
