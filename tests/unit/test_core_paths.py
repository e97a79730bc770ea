"""Safety: symlinks in layers are never followed, deep trees, names, no writes to lowers."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.paths import DirFds, check_name, encode_names, join, proc_path, split

from .conftest import (
    errno_of,
    listdir,
    lookup_path,
    mkdir,
    mkfile,
    mklink,
    mkwhiteout,
    mkxwhiteout,
    read_file,
    readdir_all,
    set_opaque,
)

# -- small pure helpers -------------------------------------------------------------------------


def test_join_split():
    assert join(b"", b"a") == b"a"
    assert join(b"a/b", b"c") == b"a/b/c"
    assert split(b"a/b/c") == (b"a/b", b"c")
    assert split(b"a") == (b"", b"a")
    assert split(b"") == (b"", b"")


def test_check_name():
    check_name(b"x" * 255)
    check_name(b".hidden")
    check_name(b"...")
    assert errno_of(lambda: check_name(b"x" * 256)) == errno.ENAMETOOLONG
    for bad in (b"", b".", b"..", b"a/b", b"/"):
        assert errno_of(lambda bad=bad: check_name(bad)) == errno.EINVAL


def test_proc_path():
    assert proc_path(7) == b"/proc/self/fd/7"
    assert proc_path(7, b"n") == b"/proc/self/fd/7/n"


# -- symlinks in layers ------------------------------------------------------------------------


def test_symlink_to_etc_over_real_dir_is_a_symlink(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mklink(l1 / "etc", "/etc")
    mkfile(l2 / "etc/mine", b"lower")
    fs = make_fs([l1, l2])
    ino, attr = lookup_path(fs, "etc")
    assert stat.S_ISLNK(attr.mode)
    assert fs.readlink(ino) == b"/etc"
    assert errno_of(lambda: fs.opendir(ino)) == errno.ENOTDIR
    assert errno_of(lambda: fs.lookup(ino, b"passwd")) == errno.ENOTDIR
    assert errno_of(lambda: fs.lookup(ino, b"mine")) == errno.ENOTDIR
    assert [n for n in listdir(fs)] == [b"etc"]


def test_real_dir_over_symlink_to_etc_lists_only_real(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/mine", b"mine")
    mklink(l2 / "d", "/etc")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"mine"]
    d_ino, _ = lookup_path(fs, "d")
    for name in (b"passwd", b"hostname", b"os-release"):
        assert errno_of(lambda n=name: fs.lookup(d_ino, n)) == errno.ENOENT


def test_symlinked_layer_subdir_in_deeper_path(layer, make_fs):
    """l2 has a/ as a symlink to /; a/etc in l1 must not merge with /etc."""
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "a/etc/mine")
    mklink(l2 / "a", "/")
    fs = make_fs([l1, l2])
    assert listdir(fs, "a") == [b"etc"]
    assert listdir(fs, "a/etc") == [b"mine"]
    assert errno_of(lambda: lookup_path(fs, "a/etc/passwd")) == errno.ENOENT


def test_dir_swapped_for_symlink_after_lookup_not_followed(layer, make_fs):
    """Layers must not change, but if one does, we still never leave it."""
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/mine")
    mkdir(l2 / "d")
    fs = make_fs([l1, l2])
    d_ino, _ = lookup_path(fs, "d")
    os.rename(l1 / "d", l1 / "d.old")
    os.symlink("/etc", l1 / "d")
    fs.stack.fds.clear()  # no cached fd of the old directory
    assert errno_of(lambda: fs.lookup(d_ino, b"passwd")) == errno.ENOENT
    with pytest.raises(OSError) as info:
        readdir_all(fs, d_ino)
    assert info.value.errno in (errno.ENOTDIR, errno.ELOOP)


def test_dirfds_refuses_symlink_component(tmp_path):
    root = tmp_path / "root"
    mkfile(root / "real/sub/f")
    mklink(root / "link", "real")
    mklink(root / "abs", "/etc")
    mkfile(root / "file")
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    fds = DirFds([rfd])
    try:
        assert os.path.samestat(os.fstat(fds.get(0, b"real/sub")), os.stat(root / "real/sub"))
        for rel in (b"link", b"link/sub", b"abs", b"real/../abs", b"file", b"file/x"):
            with pytest.raises(OSError) as info:
                fds.get(0, rel)
            assert info.value.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT), rel
        with pytest.raises(OSError) as info:
            fds.get(0, b"abs/ssh")
        assert info.value.errno in (errno.ENOTDIR, errno.ELOOP)
        with pytest.raises(FileNotFoundError):
            fds.get(0, b"missing/x")
    finally:
        fds.clear()
        os.close(rfd)


def test_dirfds_cache_and_eviction(tmp_path):
    root = tmp_path / "root"
    for i in range(40):
        mkdir(root / f"d{i}/s")
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    fds = DirFds([rfd], capacity=16)
    try:
        assert fds.get(0, b"") == rfd
        first = fds.get(0, b"d0/s")
        assert fds.get(0, b"d0/s") == first  # cached
        for i in range(40):
            fd = fds.get(0, b"d%d/s" % i)
            assert os.path.samestat(os.fstat(fd), os.stat(root / f"d{i}/s"))
        assert len(fds._fds) <= 16
        owned = fds.dup(0, b"d3/s")
        try:
            assert os.path.samestat(os.fstat(owned), os.stat(root / "d3/s"))
        finally:
            os.close(owned)
        fds.get(0, b"d5/s")
        fds.forget_tree(0, b"d5")
        assert not any(k[1] == b"d5" or k[1].startswith(b"d5/") for k in fds._fds)
    finally:
        fds.clear()
        os.close(rfd)


# -- deep trees --------------------------------------------------------------------------------

DEPTH = 3000


def _make_chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"bottom")
    finally:
        os.close(fd)


def _remove_chain(root: Path, depth: int) -> None:
    """Remove without recursion (shutil.rmtree recurses per level)."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        os.unlink("leaf", dir_fd=fds[-1])
        for _i in range(depth, 0, -1):
            os.close(fds.pop())
            os.rmdir("d", dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def deep_layer(layer):
    l1 = layer("deep")
    _make_chain(l1, DEPTH)
    yield l1
    _remove_chain(l1, DEPTH)


def test_deep_tree_by_successive_lookups(deep_layer, make_fs):
    fs = make_fs([deep_layer])
    ino = ROOT_INO
    for _ in range(DEPTH):
        node, attr = fs.lookup(ino, b"d")
        assert stat.S_ISDIR(attr.mode)
        ino = node.ino
    names = [n for _, n, _, _ in readdir_all(fs, ino)]
    assert names == [b".", b"..", b"leaf"]
    leaf, _ = fs.lookup(ino, b"leaf")
    assert read_file(fs, leaf.ino) == b"bottom"
    assert fs.getattr(ino).ino == ino
    parent, _ = fs.lookup(ino, b"..")
    assert parent.path.count(b"/") == DEPTH - 2


def test_deep_dirfds_get_is_iterative(deep_layer):
    rfd = os.open(deep_layer, os.O_PATH | os.O_DIRECTORY)
    fds = DirFds([rfd])
    try:
        rel = b"/".join([b"d"] * DEPTH)
        fd = fds.get(0, rel)
        assert os.stat("leaf", dir_fd=fd).st_size == len(b"bottom")
        fds.clear()
        fd = fds.get(0, rel)  # again from nothing cached
        assert os.stat("leaf", dir_fd=fd).st_size == len(b"bottom")
    finally:
        fds.clear()
        os.close(rfd)


# -- lowers are never modified -------------------------------------------------------------------


def _snapshot(root: Path) -> dict:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
            snap[os.path.relpath(p, root)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_nlink,
                content,
                xattrs,
            )
    return snap


def _read_everything(fs, ino: int, depth: int = 0) -> int:
    """Walk the whole union through the core: every request a reader can make."""
    count = 0
    fs.getattr(ino)
    fs.listxattr(ino)
    for name in fs.listxattr(ino):
        fs.getxattr(ino, name)
    for _, name, _node, attr in readdir_all(fs, ino)[2:]:
        child, cattr = fs.lookup(ino, name)
        assert cattr == attr
        count += 1
        fs.access(child.ino, os.R_OK)
        for xname in fs.listxattr(child.ino):
            fs.getxattr(child.ino, xname)
        if stat.S_ISDIR(cattr.mode):
            count += _read_everything(fs, child.ino, depth + 1)
        elif stat.S_ISREG(cattr.mode):
            read_file(fs, child.ino)
        elif stat.S_ISLNK(cattr.mode):
            fs.readlink(child.ino)
        fs.forget(child.ino, 1)
    return count


def test_lowers_never_modified(layer, make_fs):
    u, l1, l2 = layer("u"), layer("l1"), layer("l2")
    mkfile(l1 / "d/a", b"a" * 5000)
    mkfile(l2 / "d/b", b"b")
    mkfile(l2 / "d/a", b"hidden")
    mkwhiteout(l1 / "gone")
    mkfile(l2 / "gone", b"g")
    mkxwhiteout(l1 / "x/xw")
    mkfile(l2 / "x/xw")
    set_opaque(l1 / "op")
    mkfile(l1 / "op/in")
    mkfile(l2 / "op/out")
    mkfile(l1 / ".wh.oci")
    mkfile(l2 / "oci")
    mkfile(l2 / "e/.wh..wh..opq")
    mklink(l1 / "ln", "/etc/passwd")
    os.mkfifo(l2 / "fifo")
    os.setxattr(l1 / "d/a", b"user.k", b"v")
    os.setxattr(l1 / "d/a", b"trusted.overlay.overlay.esc", b"e")
    mkfile(u / "d/up", b"upper")
    before = {p: _snapshot(p) for p in (u, l1, l2)}
    fs = make_fs([l1, l2], upper=u, readonly=True)
    n = _read_everything(fs, ROOT_INO)
    assert n >= 10
    after = {p: _snapshot(p) for p in (u, l1, l2)}
    assert after == before


def test_reading_does_not_change_lower_atime(layer, make_fs):
    l1 = layer("l1")
    f = mkfile(l1 / "f", b"content" * 100)
    os.utime(f, ns=(1, os.lstat(f).st_mtime_ns))
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "f")
    assert read_file(fs, ino) == b"content" * 100
    assert read_file(fs, ino) == b"content" * 100
    assert os.lstat(f).st_atime_ns == 1


def test_encode_names_gives_back_the_bytes_on_disk(tmp_path):
    """Names that are not UTF-8 come back as the bytes they are, as os.fsencode gives each."""
    raw = [b"plain", b"caf\xc3\xa9", b"bad\xff\xfe", b"\xe2\x82", b"x" * 255]
    for n in raw:
        (tmp_path / os.fsdecode(n)).touch()
    listed = os.listdir(tmp_path)
    assert encode_names(listed) == [os.fsencode(n) for n in listed]
    assert sorted(encode_names(listed)) == sorted(raw)
    assert encode_names([]) == []
    assert encode_names([""]) == [b""]
