"""The resolution cache: exact invalidation by our own changes, bounded memory.

The write-path tests (test_core_writes.py) all run with the cache on; these
check the cache's own promises: a cached answer never outlives a change made
through the mount, hits cost no resolution, and memory per entry is small.
"""

from __future__ import annotations

import errno
import os
import stat
import tracemalloc

import pytest

from pyunionfs.fs.cache import ResolutionCache
from pyunionfs.fs.inodes import ROOT_INO

from .conftest import listdir, lookup_path, mkdir, mkfile
from .test_core_writes import ALICE, env, ino_of  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, trusted.overlay.* xattrs")


def test_cache_bookkeeping() -> None:
    c = ResolutionCache(max_entries=5)
    assert c.lookup((1, 1), b"a") == (False, None)
    c.store((1, 1), b"a", None)
    assert c.lookup((1, 1), b"a") == (True, None)
    c.store_names((1, 1), [b"a", b"b"])
    assert len(c) == 3 and c.names((1, 1)) == [b"a", b"b"]
    c.changed((1, 1), b"a")
    assert c.lookup((1, 1), b"a") == (False, None) and c.names((1, 1)) is None and len(c) == 0
    for i in range(4):
        c.store((2, i), b"x", None)
    c.store((3, 0), b"y", None)
    c.store((3, 0), b"z", None)  # over the bound: the least recently used directories go
    assert len(c) <= 5
    assert c.lookup((2, 0), b"x") == (False, None)
    assert c.lookup((3, 0), b"z") == (True, None)
    c.dropped((3, 0))
    assert c.lookup((3, 0), b"y") == (False, None)


async def test_negative_entry_replaced_by_create(env):  # noqa: F811
    mkfile(env.l1 / "d/f", b"lower")
    fs = env.mount()
    d = ino_of(fs, "d")
    with pytest.raises(FileNotFoundError):
        fs.lookup(d, b"new")
    fh, _, _ = fs.create(d, b"new", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
    fs.release(fh)
    assert fs.lookup(d, b"new")[1].size == 0
    assert sorted(listdir(fs, "d")) == [b"f", b"new"]


async def test_hits_see_fresh_attributes_and_copy_up(env):  # noqa: F811
    mkfile(env.l1 / "d/f", b"lower")
    fs = env.mount()
    d = ino_of(fs, "d")
    node, attr = fs.lookup(d, b"f")
    assert attr.size == 5
    hits = fs.resolver.cache.hits
    fh = fs.open_file(node.ino, os.O_WRONLY)  # copies up: the cached answer changes layer
    fs.write(fh, 0, b"upper and longer")
    fs.release(fh)
    assert fs.lookup(d, b"f")[1].size == 16
    assert os.lstat(env.u / "d/f").st_size == 16
    assert fs.lookup(d, b"f")[1].size == 16
    assert fs.resolver.cache.hits > hits


async def test_removed_and_remade_directory_starts_empty(env):  # noqa: F811
    mkfile(env.l1 / "d/a")
    fs = env.mount()
    assert listdir(fs, "d") == [b"a"]
    fs.unlink(ino_of(fs, "d"), b"a")
    fs.rmdir(ROOT_INO, b"d")
    assert b"d" not in listdir(fs)
    fs.mkdir(ROOT_INO, b"d", 0o755, ALICE)
    assert listdir(fs, "d") == []
    with pytest.raises(FileNotFoundError):
        lookup_path(fs, "d/a")


async def test_renamed_directory_keeps_its_contents(env):  # noqa: F811
    fs = env.mount()
    node, _ = fs.mkdir(ROOT_INO, b"up", 0o755, ALICE)
    fh, _, _ = fs.create(node.ino, b"x", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
    fs.release(fh)
    assert listdir(fs, "up") == [b"x"]
    fs.rename(ROOT_INO, b"up", ROOT_INO, b"moved", 0)
    assert listdir(fs, "moved") == [b"x"]
    assert stat.S_ISREG(lookup_path(fs, "moved/x")[1].mode)
    with pytest.raises(FileNotFoundError):
        lookup_path(fs, "up")


def _big_dir_traced(env, n: int = 2000):  # noqa: F811
    """A mount over a lower directory of *n* empty files, its cache empty,
    memory tracing started: (fs, the directory's inode, the first snapshot)."""
    mkdir(env.l1 / "big")
    for i in range(n):
        (env.l1 / "big" / f"file-{i:05d}").write_bytes(b"")
    fs = env.mount()
    big = ino_of(fs, "big")
    fs.resolver.cache.clear()
    tracemalloc.start()
    return fs, big, tracemalloc.take_snapshot()


def test_bytes_per_cached_entry(env, capsys):  # noqa: F811
    """Memory stays bounded: report what one cached name costs."""
    n = 2000
    fs, big, before = _big_dir_traced(env, n)
    for name in listdir(fs, "big"):
        fs.forget(fs.lookup(big, name)[0].ino, 1)  # node table back to where it was
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per_entry = grown / len(fs.resolver.cache)
    with capsys.disabled():
        print(f"\nresolution cache: {per_entry:.0f} bytes per cached name ({len(fs.resolver.cache)} names)")
    assert len(fs.resolver.cache) >= n
    assert per_entry < 200  # 650 with an os.stat_result per entry, 232 with an entry of eight fields


def test_bytes_per_entry_the_kernel_holds(env, capsys):  # noqa: F811
    """What ``ls -l`` of a big directory leaves in memory per entry: its
    cached resolution, the node the kernel holds after readdirplus, and the
    answer "no xattrs" (the kernel asks each entry for its label and ACL).
    Entries with no xattrs share one empty set."""
    n = 2000
    fs, big, before = _big_dir_traced(env, n)
    handle = fs.opendir(big)
    inos = []
    for _, _, node, _ in fs.readdir(handle, 0):
        if node is not None:
            fs.remember(node)
            inos.append(node.ino)
    fs.releasedir(handle)
    for ino in inos:
        with pytest.raises(OSError) as info:
            fs.getxattr(ino, b"security.selinux")
        assert info.value.errno == errno.ENODATA
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(inos) == n
    assert len({id(fs.inodes[ino].xattrs) for ino in inos}) == 1 and not fs.inodes[inos[0]].xattrs
    per_entry = sum(s.size_diff for s in after.compare_to(before, "filename")) / n
    with capsys.disabled():
        print(f"\nlisted, held and asked for xattrs: {per_entry:.0f} bytes per entry")
    assert per_entry < 650  # 1,350 with an os.stat_result and a set of no xattrs per entry; 719 with 8-field entries


async def test_missing_xattrs_answered_from_memory_until_set(env):  # noqa: F811
    mkfile(env.l1 / "f", b"lower")
    os.setxattr(env.l1 / "f", b"user.a", b"1")
    fs = env.mount()
    ino = ino_of(fs, "f")
    assert fs.getxattr(ino, b"user.a") == b"1"
    assert fs.inodes[ino].xattrs == {b"user.a"}
    with pytest.raises(OSError) as info:
        fs.getxattr(ino, b"security.capability")
    assert info.value.errno == errno.ENODATA
    fs.setxattr(ino, b"user.b", b"2")  # copies up, and the name now exists
    assert fs.getxattr(ino, b"user.b") == b"2"
    assert sorted(fs.listxattr(ino)) == [b"user.a", b"user.b"]
    fs.removexattr(ino, b"user.a")
    with pytest.raises(OSError) as info:
        fs.getxattr(ino, b"user.a")
    assert info.value.errno == errno.ENODATA
    assert os.getxattr(env.u / "f", b"user.b") == b"2"
