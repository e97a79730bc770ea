"""UnionFS requests: readdir offsets, attributes, xattrs, open/read, errnos."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.union import Attr, UnionFS

from .conftest import (
    errno_of,
    lookup_path,
    mkdir,
    mkfile,
    mklink,
    mkwhiteout,
    read_file,
    read_path,
    readdir_all,
    set_opaque,
)

# -- readdir ----------------------------------------------------------------------------


@pytest.fixture
def busy(layer, make_fs):
    """Three layers sharing names; d has 40 visible names, some hidden ones."""
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    for i in range(0, 40, 2):
        mkfile(l1 / f"d/e{i:02}", b"1")
    for i in range(0, 40, 3):
        mkfile(l2 / f"d/e{i:02}", b"2")
    for i in range(1, 40, 2):
        mkfile(l3 / f"d/e{i:02}", b"3")
    mkwhiteout(l1 / "d/gone1")
    mkfile(l3 / "d/gone1")
    mkfile(l1 / "d/.wh.gone2")
    mkfile(l3 / "d/gone2")
    fs = make_fs([l1, l2, l3])
    ino, _ = lookup_path(fs, "d")
    return fs, ino


EXPECTED = sorted(f"e{i:02}".encode() for i in range(40))


def test_readdir_dot_entries_first_each_name_once(busy):
    fs, ino = busy
    entries = readdir_all(fs, ino)
    names = [n for _, n, _, _ in entries]
    assert names[:2] == [b".", b".."]
    assert entries[0][2] is None and entries[1][2] is None
    rest = names[2:]
    assert len(rest) == len(set(rest))
    assert sorted(rest) == EXPECTED
    offsets = [off for off, *_ in entries]
    assert offsets == sorted(set(offsets)), "offsets must strictly increase"
    assert all(off > 0 for off in offsets)


def test_readdir_dot_attrs(busy):
    fs, ino = busy
    entries = readdir_all(fs, ino)
    assert entries[0][3].ino == ino
    assert entries[1][3].ino == ROOT_INO
    assert stat.S_ISDIR(entries[0][3].mode) and stat.S_ISDIR(entries[1][3].mode)


def test_readdir_entry_attrs_match_lookup(busy):
    fs, ino = busy
    for _, name, node, attr in readdir_all(fs, ino)[2:]:
        lnode, lattr = fs.lookup(ino, name)
        assert node.ino == lnode.ino == attr.ino
        assert attr == lattr


@pytest.mark.parametrize("cut", range(0, 45))
def test_readdir_resume_from_any_returned_offset(busy, cut):
    fs, ino = busy
    full = readdir_all(fs, ino)
    fh = fs.opendir(ino)
    try:
        first = []
        it = fs.readdir(fh, 0)
        for entry in it:
            first.append(entry)
            if len(first) == cut:
                break
        it.close()
        start = first[-1][0] if first else 0
        rest = list(fs.readdir(fh, start))
    finally:
        fs.releasedir(fh)
    names = [n for _, n, _, _ in first + rest]
    assert names == [n for _, n, _, _ in full]


def test_readdir_resume_every_step_by_one(busy):
    """Like the kernel with a tiny buffer: one entry per call."""
    fs, ino = busy
    fh = fs.opendir(ino)
    names, off = [], 0
    try:
        while True:
            batch = list(fs.readdir(fh, off))
            if not batch:
                break
            off, name = batch[0][0], batch[0][1]
            names.append(name)
    finally:
        fs.releasedir(fh)
    assert names[:2] == [b".", b".."]
    assert sorted(names[2:]) == EXPECTED
    assert len(names) == len(set(names))


def test_readdir_rewind_rereads(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "d/a")
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "d")
    fh = fs.opendir(ino)
    try:
        first = [n for _, n, _, _ in fs.readdir(fh, 0)]
        assert first == [b".", b"..", b"a"]
        again = [n for _, n, _, _ in fs.readdir(fh, 0)]
        assert again == first
        # Lowers do not change under a mount; when they do anyway, the
        # listing is stale until the caches are dropped.
        mkfile(l1 / "d/b")
        assert [n for _, n, _, _ in fs.readdir(fh, 0)] == first
        fs.drop_caches()
        after = [n for _, n, _, _ in fs.readdir(fh, 0)]
        assert sorted(after[2:]) == [b"a", b"b"]
    finally:
        fs.releasedir(fh)


def test_readdir_past_end_is_empty(busy):
    fs, ino = busy
    fh = fs.opendir(ino)
    try:
        last = list(fs.readdir(fh, 0))[-1][0]
        assert list(fs.readdir(fh, last)) == []
        assert list(fs.readdir(fh, last + 100)) == []
    finally:
        fs.releasedir(fh)


def test_readdir_bad_handle_ebadf(busy):
    fs, ino = busy
    fh = fs.opendir(ino)
    fs.releasedir(fh)
    assert errno_of(lambda: list(fs.readdir(fh, 0))) == errno.EBADF


def test_root_readdir(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "a")
    mkfile(l2 / "b")
    fs = make_fs([l1, l2])
    entries = readdir_all(fs, ROOT_INO)
    assert [n for _, n, _, _ in entries[:2]] == [b".", b".."]
    assert entries[0][3].ino == entries[1][3].ino == ROOT_INO
    assert sorted(n for _, n, _, _ in entries[2:]) == [b"a", b"b"]


def test_readdir_dotdot_of_nested_dir(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "a/b/f")
    mkdir(l2 / "a/b")
    fs = make_fs([l1, l2])
    a_ino, a_attr = lookup_path(fs, "a")
    b_ino, _ = lookup_path(fs, "a/b")
    dot, dotdot = readdir_all(fs, b_ino)[:2]
    assert (dot[1], dot[3].ino) == (b".", b_ino)
    assert (dotdot[1], dotdot[3].ino) == (b"..", a_ino)
    assert dotdot[3].nlink == a_attr.nlink == 1  # a is merged


def test_opendir_of_file_enotdir(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "f")
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "f")
    assert errno_of(lambda: fs.opendir(ino)) == errno.ENOTDIR
    assert errno_of(lambda: fs.lookup(ino, b"x")) == errno.ENOTDIR


def test_readdir_remember_takes_reference(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "f")
    fs = make_fs([l1])
    (_, _, node, attr) = readdir_all(fs, ROOT_INO)[2]
    assert fs.inodes.get(node.ino) is None  # not until the kernel accepts it
    fs.remember(node)
    assert fs.inodes[node.ino].lookups == 1
    assert fs.getattr(node.ino).ino == attr.ino


# -- attributes ---------------------------------------------------------------------------


def _assert_attr_is(attr: Attr, st: os.stat_result, nlink: int | None = None) -> None:
    assert attr.mode == st.st_mode
    assert attr.uid == st.st_uid
    assert attr.gid == st.st_gid
    assert attr.size == st.st_size
    assert attr.mtime_ns == st.st_mtime_ns
    assert attr.ctime_ns == st.st_ctime_ns
    assert attr.rdev == st.st_rdev
    assert attr.blocks == st.st_blocks
    assert attr.nlink == (st.st_nlink if nlink is None else nlink)


def test_file_attrs_from_providing_layer(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "f", b"top-data", mode=0o640)
    os.chown(l1 / "f", 1234, 5678)
    os.utime(l1 / "f", ns=(1_000_000_123, 2_000_000_456))
    mkfile(l2 / "f", b"lower data, longer", mode=0o777)
    mkfile(l2 / "g", b"g", mode=0o604)
    os.chown(l2 / "g", 42, 43)
    fs = make_fs([l1, l2])
    ino, attr = lookup_path(fs, "f")
    st = os.lstat(l1 / "f")
    _assert_attr_is(attr, st)
    assert attr.mode == stat.S_IFREG | 0o640
    assert (attr.uid, attr.gid, attr.size, attr.mtime_ns) == (1234, 5678, 8, 2_000_000_456)
    _assert_attr_is(fs.getattr(ino), st)
    _, gattr = lookup_path(fs, "g")
    _assert_attr_is(gattr, os.lstat(l2 / "g"))


def test_getattr_is_fresh(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "f", b"x")
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "f")
    os.utime(l1 / "f", ns=(5, 7))
    os.chmod(l1 / "f", 0o600)
    attr = fs.getattr(ino)
    assert attr.mtime_ns == 7
    assert stat.S_IMODE(attr.mode) == 0o600


def test_symlink_and_device_attrs(layer, make_fs):
    l1 = layer("l1")
    mklink(l1 / "ln", "target/of/link")
    os.mknod(l1 / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 9))
    os.mkfifo(l1 / "fifo")
    fs = make_fs([l1])
    for name in ("ln", "blk", "fifo"):
        _, attr = lookup_path(fs, name)
        _assert_attr_is(attr, os.lstat(l1 / name))
    assert lookup_path(fs, "ln")[1].size == len("target/of/link")


def test_merged_dir_nlink_1_single_layer_dir_real_nlink(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkdir(l1 / "m/s1")
    mkdir(l1 / "m/s2")
    mkdir(l2 / "m/s3")
    mkdir(l1 / "solo/x")
    mkdir(l1 / "solo/y")
    fs = make_fs([l1, l2])
    _, m = lookup_path(fs, "m")
    assert m.nlink == 1
    assert m.mode == os.lstat(l1 / "m").st_mode
    assert m.mtime_ns == os.lstat(l1 / "m").st_mtime_ns
    _, solo = lookup_path(fs, "solo")
    assert solo.nlink == os.lstat(l1 / "solo").st_nlink == 4
    # Root of two layers is merged; root of one is not.
    assert fs.getattr(ROOT_INO).nlink == 1
    single = make_fs([l1])
    assert single.getattr(ROOT_INO).nlink == os.lstat(l1).st_nlink


def test_merged_dir_attrs_from_top_layer(layer, make_fs):
    u, l1 = layer("u"), layer("l1")
    mkdir(u / "d")
    os.chmod(u / "d", 0o700)
    os.chown(u / "d", 11, 12)
    mkdir(l1 / "d")
    os.chmod(l1 / "d", 0o755)
    fs = make_fs([l1], upper=u)
    _, attr = lookup_path(fs, "d")
    _assert_attr_is(attr, os.lstat(u / "d"), nlink=1)


# -- inode numbers --------------------------------------------------------------------------


def test_root_is_ino_1(layer, make_fs):
    fs = make_fs([layer("l1"), layer("l2")])
    assert fs.getattr(ROOT_INO).ino == ROOT_INO
    assert fs.lookup(ROOT_INO, b"..")[1].ino == ROOT_INO


def test_inos_unique_across_layers_and_real_on_one_fs(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    provider = {}
    for i, lay in enumerate((l1, l2, l3)):
        for j in range(5):
            mkfile(lay / f"f{i}{j}", b"x")
            provider[f"f{i}{j}"] = lay
        mkfile(lay / f"d{i}/x")
        provider[f"d{i}"] = lay
    mkfile(l1 / "shared", b"1")
    mkfile(l2 / "shared", b"2")
    provider["shared"] = l1
    fs = make_fs([l1, l2, l3])
    inos = {}
    for name, lay in provider.items():
        _, attr = lookup_path(fs, name)
        inos[name] = attr.ino
        # All layers on one filesystem: the real inode number, as overlayfs.
        assert attr.ino == os.lstat(lay / name).st_ino
    assert len(set(inos.values())) == len(inos)
    assert ROOT_INO not in inos.values()


def test_hardlinks_in_one_lower_share_ino(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l2 / "a/one", b"same")
    os.link(l2 / "a/one", l2 / "b-two")
    mkdir(l1 / "a")
    fs = make_fs([l1, l2])
    one_ino, one = lookup_path(fs, "a/one")
    two_ino, two = lookup_path(fs, "b-two")
    assert one_ino == two_ino == one.ino == two.ino
    assert one.nlink == two.nlink == 2
    assert read_path(fs, "a/one") == read_path(fs, "b-two") == b"same"


def test_dir_ino_same_with_or_without_upper_copy(layer, make_fs):
    u, l1, l2 = layer("u"), layer("l1"), layer("l2")
    mkfile(l1 / "d/x")
    mkfile(l2 / "d/y")
    fs_plain = make_fs([l1, l2])
    mkdir(u / "d")
    fs_upper = make_fs([l1, l2], upper=u)
    a = lookup_path(fs_plain, "d")[1].ino
    b_ = lookup_path(fs_upper, "d")[1].ino
    assert a == b_ == os.lstat(l2 / "d").st_ino  # the lowest merged layer
    # A lower-only dir under an upper-copied parent also keeps its number.
    mkdir(l2 / "d/sub")
    assert lookup_path(fs_plain, "d/sub")[1].ino == lookup_path(fs_upper, "d/sub")[1].ino


def test_dir_ino_from_lowest_merged_layer_not_below_opaque(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    set_opaque(l1 / "d")
    mkdir(l2 / "d")
    fs = make_fs([l1, l2])
    assert lookup_path(fs, "d")[1].ino == os.lstat(l1 / "d").st_ino


def test_lookup_counts_and_forget(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "f")
    fs = make_fs([l1])
    node, _ = fs.lookup(ROOT_INO, b"f")
    fs.lookup(ROOT_INO, b"f")
    fs.lookup(ROOT_INO, b"f")
    assert fs.inodes[node.ino].lookups == 3
    fs.forget(node.ino, 2)
    assert fs.getattr(node.ino).ino == node.ino
    fs.forget(node.ino, 1)
    assert fs.inodes.get(node.ino) is None
    assert errno_of(lambda: fs.getattr(node.ino)) == errno.ESTALE
    assert errno_of(lambda: fs.open(node.ino, os.O_RDONLY)) == errno.ESTALE
    # Looking it up again brings it back, same number.
    assert fs.lookup(ROOT_INO, b"f")[0].ino == node.ino
    fs.forget(ROOT_INO, 10**6)
    assert fs.getattr(ROOT_INO).ino == ROOT_INO
    fs.forget(987654321, 1)  # unknown: ignored


# -- readlink / open / read / access / statfs -----------------------------------------------------


def test_readlink(layer, make_fs):
    l1 = layer("l1")
    mklink(l1 / "abs", "/etc/passwd")
    mklink(l1 / "rel", "../up/x")
    mkfile(l1 / "f")
    mkdir(l1 / "d")
    fs = make_fs([l1])
    assert fs.readlink(lookup_path(fs, "abs")[0]) == b"/etc/passwd"
    assert fs.readlink(lookup_path(fs, "rel")[0]) == b"../up/x"
    assert errno_of(lambda: fs.readlink(lookup_path(fs, "f")[0])) == errno.EINVAL
    assert errno_of(lambda: fs.readlink(lookup_path(fs, "d")[0])) == errno.EINVAL
    assert errno_of(lambda: fs.readlink(ROOT_INO)) == errno.EINVAL


def test_open_read(layer, make_fs):
    l1 = layer("l1")
    data = bytes(range(256)) * 1000
    mkfile(l1 / "big", data)
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "big")
    fh = fs.open(ino, os.O_RDONLY)
    try:
        assert fs.read(fh, 0, 10) == data[:10]
        assert fs.read(fh, 1000, 5000) == data[1000:6000]
        assert fs.read(fh, len(data) - 3, 100) == data[-3:]
        assert fs.read(fh, len(data) + 10, 100) == b""
    finally:
        fs.release(fh)
    assert read_file(fs, ino) == data
    fs.release(fh)  # double release is harmless


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT],
)
def test_open_for_writing_erofs(layer, make_fs, flags):
    u, l1 = layer("u"), layer("l1")
    mkfile(l1 / "f", b"keep")
    mkfile(u / "g", b"upper")
    for fs in (make_fs([l1]), make_fs([l1], upper=u, readonly=False)):
        for name in ("f", "g"):
            try:
                ino, _ = lookup_path(fs, name)
            except FileNotFoundError:
                continue
            assert errno_of(lambda fs=fs, ino=ino: fs.open(ino, flags)) == errno.EROFS
    assert (l1 / "f").read_bytes() == b"keep"
    assert (u / "g").read_bytes() == b"upper"


def test_open_dir_eisdir(layer, make_fs):
    l1 = layer("l1")
    mkdir(l1 / "d")
    fs = make_fs([l1])
    assert errno_of(lambda: fs.open(lookup_path(fs, "d")[0], os.O_RDONLY)) == errno.EISDIR
    assert errno_of(lambda: fs.open(ROOT_INO, os.O_RDONLY)) == errno.EISDIR


def test_open_symlink_not_followed(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "target", b"secret")
    mklink(l1 / "ln", str(l1 / "target"))
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "ln")
    assert errno_of(lambda: fs.open(ino, os.O_RDONLY)) == errno.ELOOP


def test_access(layer, make_fs):
    u, l1 = layer("u"), layer("l1")
    mkfile(l1 / "f")
    ro = make_fs([l1], readonly=True)
    ino, _ = lookup_path(ro, "f")
    assert errno_of(lambda: ro.access(ino, os.W_OK)) == errno.EROFS
    assert errno_of(lambda: ro.access(ROOT_INO, os.R_OK | os.W_OK)) == errno.EROFS
    assert ro.access(ino, os.R_OK) is None
    assert ro.access(ino, os.F_OK) is None
    rw = make_fs([l1], upper=u, readonly=False)
    assert rw.access(lookup_path(rw, "f")[0], os.W_OK) is None
    # upper given but readonly (as -o ro would produce without moving it)
    ro2 = make_fs([l1], upper=u, readonly=True)
    assert errno_of(lambda: ro2.access(ROOT_INO, os.W_OK)) == errno.EROFS
    assert errno_of(lambda: ro.access(999999, os.R_OK)) == errno.ESTALE


def test_statfs_is_top_layer(layer, make_fs):
    l1 = layer("l1")
    fs = make_fs([l1])
    st = fs.statfs()
    real = os.statvfs(l1)
    assert (st.f_bsize, st.f_blocks, st.f_files) == (real.f_bsize, real.f_blocks, real.f_files)


def test_unknown_inode_estale(layer, make_fs):
    fs = make_fs([layer("l1")])
    for call in (
        lambda: fs.getattr(424242),
        lambda: fs.lookup(424242, b"x"),
        lambda: fs.opendir(424242),
        lambda: fs.readlink(424242),
        lambda: fs.listxattr(424242),
        lambda: fs.getxattr(424242, b"user.x"),
    ):
        assert errno_of(call) == errno.ESTALE


def test_close_releases_open_files(layer, tmp_path):
    l1 = layer("l1")
    mkfile(l1 / "f", b"x")
    # Built by hand: the make_fs fixture would close it a second time.
    fs = UnionFS(MountConfig(lowers=(bytes(l1),), upper=None, mountpoint=b"/unused", readonly=True))
    fh = fs.open(lookup_path(fs, "f")[0], os.O_RDONLY)
    fs.close()
    with pytest.raises(OSError) as info:
        os.fstat(fh)
    assert info.value.errno == errno.EBADF


# -- xattrs -----------------------------------------------------------------------------------


def test_listxattr_hides_private_and_unescapes(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    f = mkfile(l1 / "f")
    os.setxattr(f, b"user.plain", b"p")
    os.setxattr(f, b"trusted.overlay.origin", b"o")
    os.setxattr(f, b"trusted.overlay.whiteout", b"")  # not an xwhiteout: no x parent, and not here anyway
    os.setxattr(f, b"user.overlay.impure", b"y")
    os.setxattr(f, b"trusted.overlay.overlay.foo", b"escaped-t")
    os.setxattr(f, b"user.overlay.overlay.bar", b"escaped-u")
    os.setxattr(f, b"trusted.other", b"t")
    mkfile(l2 / "f")
    fs = make_fs([l1, l2])
    ino, _ = lookup_path(fs, "f")
    names = sorted(fs.listxattr(ino))
    assert names == sorted(
        [b"user.plain", b"trusted.overlay.foo", b"user.overlay.bar", b"trusted.other"]
    )
    assert fs.getxattr(ino, b"user.plain") == b"p"
    assert fs.getxattr(ino, b"trusted.overlay.foo") == b"escaped-t"
    assert fs.getxattr(ino, b"user.overlay.bar") == b"escaped-u"
    assert fs.getxattr(ino, b"trusted.other") == b"t"
    # The private ones cannot be read through the mount.
    for private in (b"trusted.overlay.origin", b"trusted.overlay.whiteout", b"user.overlay.impure"):
        assert errno_of(lambda p=private: fs.getxattr(ino, p)) == errno.ENODATA
    assert errno_of(lambda: fs.getxattr(ino, b"user.missing")) == errno.ENODATA


def test_xattrs_of_opaque_dir_hide_marker(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    set_opaque(l1 / "d")
    os.setxattr(l1 / "d", b"user.mine", b"1")
    mkdir(l2 / "d")
    fs = make_fs([l1, l2])
    ino, _ = lookup_path(fs, "d")
    assert fs.listxattr(ino) == [b"user.mine"]
    assert errno_of(lambda: fs.getxattr(ino, b"trusted.overlay.opaque")) == errno.ENODATA


def test_merged_dir_xattrs_are_top_layers(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkdir(l1 / "d")
    mkdir(l2 / "d")
    os.setxattr(l1 / "d", b"user.top", b"T")
    os.setxattr(l2 / "d", b"user.low", b"L")
    os.setxattr(l2 / "d", b"user.both", b"low")
    os.setxattr(l1 / "d", b"user.both", b"top")
    fs = make_fs([l1, l2])
    ino, _ = lookup_path(fs, "d")
    assert sorted(fs.listxattr(ino)) == [b"user.both", b"user.top"]
    assert fs.getxattr(ino, b"user.both") == b"top"
    assert errno_of(lambda: fs.getxattr(ino, b"user.low")) == errno.ENODATA


def test_root_xattrs(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    os.setxattr(l1, b"user.rootattr", b"r")
    os.setxattr(l1, b"trusted.overlay.opaque", b"x")
    os.setxattr(l2, b"user.lowroot", b"l")
    fs = make_fs([l1, l2])
    assert fs.listxattr(ROOT_INO) == [b"user.rootattr"]
    assert fs.getxattr(ROOT_INO, b"user.rootattr") == b"r"


def test_userxattr_mode_xattr_names(layer, make_fs):
    l1 = layer("l1")
    f = mkfile(l1 / "f")
    os.setxattr(f, b"user.overlay.origin", b"o")
    os.setxattr(f, b"user.overlay.overlay.x", b"esc")
    os.setxattr(f, b"user.ok", b"1")
    fs = make_fs([l1], userxattr=True)
    ino, _ = lookup_path(fs, "f")
    names = fs.listxattr(ino)
    assert b"user.overlay.origin" not in names
    assert sorted(n for n in names if n.startswith(b"user.")) == [b"user.ok", b"user.overlay.x"]
    assert fs.getxattr(ino, b"user.overlay.x") == b"esc"


def test_symlink_xattrs_not_followed(layer, make_fs):
    l1 = layer("l1")
    target = mkdir(l1 / "target")
    os.setxattr(target, b"user.secret", b"s")
    mklink(l1 / "ln", str(target))
    fs = make_fs([l1])
    ino, _ = lookup_path(fs, "ln")
    assert b"user.secret" not in fs.listxattr(ino)
    assert errno_of(lambda: fs.getxattr(ino, b"user.secret")) == errno.ENODATA
