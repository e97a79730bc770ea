"""The union rules (overlayfs semantics, topmost layer first), through UnionFS.

Layers are real directories; the core is driven by lookup/readdir/open.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from pyunionfs.fs.inodes import ROOT_INO

from .conftest import (
    errno_of,
    listdir,
    lookup_path,
    mkdir,
    mkfile,
    mklink,
    mkwhiteout,
    mkxwhiteout,
    read_path,
    set_opaque,
)


def enoent(fs, rel):
    return errno_of(lambda: lookup_path(fs, rel)) == errno.ENOENT


# -- basic precedence ---------------------------------------------------------------


def test_top_name_hides_lower(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "f", b"top")
    mkfile(l2 / "f", b"bottom")
    mkfile(l2 / "only-low", b"low")
    fs = make_fs([l1, l2])
    assert read_path(fs, "f") == b"top"
    assert read_path(fs, "only-low") == b"low"
    assert listdir(fs) == [b"f", b"only-low"]


def test_upper_hides_lowers(layer, make_fs):
    u, l1 = layer("u"), layer("l1")
    mkfile(u / "f", b"upper")
    mkfile(l1 / "f", b"lower")
    fs = make_fs([l1], upper=u)
    assert read_path(fs, "f") == b"upper"


def test_nondir_hides_dir_below(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "x", b"file")
    mkfile(l2 / "x" / "inner", b"hidden")
    fs = make_fs([l1, l2])
    _, attr = lookup_path(fs, "x")
    assert stat.S_ISREG(attr.mode)
    assert read_path(fs, "x") == b"file"
    assert errno_of(lambda: lookup_path(fs, "x/inner")) == errno.ENOTDIR


def test_symlink_hides_dir_below(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mklink(l1 / "x", "somewhere")
    mkfile(l2 / "x" / "inner")
    fs = make_fs([l1, l2])
    ino, attr = lookup_path(fs, "x")
    assert stat.S_ISLNK(attr.mode)
    assert fs.readlink(ino) == b"somewhere"


def test_dir_hides_nondir_below(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "x" / "a")
    mkfile(l2 / "x", b"file")
    fs = make_fs([l1, l2])
    _, attr = lookup_path(fs, "x")
    assert stat.S_ISDIR(attr.mode)
    assert listdir(fs, "x") == [b"a"]


def test_dir_over_dir_merges_deep_across_three_layers(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "a/b/c/x", b"1")
    mkfile(l2 / "a/b/c/y", b"2")
    mkfile(l3 / "a/b/c/z", b"3")
    mkfile(l3 / "a/b/c/x", b"3x")  # hidden by l1's x
    mkfile(l2 / "a/b/mid", b"m")
    mkfile(l3 / "a/low", b"l")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs) == [b"a"]
    assert listdir(fs, "a") == [b"b", b"low"]
    assert listdir(fs, "a/b") == [b"c", b"mid"]
    assert listdir(fs, "a/b/c") == [b"x", b"y", b"z"]
    assert read_path(fs, "a/b/c/x") == b"1"
    assert read_path(fs, "a/b/c/y") == b"2"
    assert read_path(fs, "a/b/c/z") == b"3"
    assert read_path(fs, "a/b/mid") == b"m"
    assert read_path(fs, "a/low") == b"l"


def test_merge_skips_layers_without_the_dir(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "d/x")
    mkfile(l2 / "other")  # l2 has no d at all
    mkfile(l3 / "d/z")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"x", b"z"]


def test_nondir_below_dir_ends_merge(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "d/a", b"a")
    mkfile(l2 / "d", b"i am a file")
    mkfile(l3 / "d/b", b"b")  # below the file: not merged either
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"a"]
    assert enoent(fs, "d/b")


def test_symlink_below_dir_ends_merge(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "d/a")
    mklink(l2 / "d", "/")
    mkfile(l3 / "d/b")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"a"]


def test_missing_name_enoent(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "f")
    fs = make_fs([l1])
    assert enoent(fs, "nope")
    assert errno_of(lambda: lookup_path(fs, "f/x")) == errno.ENOTDIR


# -- kernel whiteouts ------------------------------------------------------------------


def test_device_whiteout_hides_and_is_invisible(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkwhiteout(l1 / "gone")
    mkwhiteout(l1 / "never-existed")
    mkfile(l2 / "gone", b"old")
    mkfile(l2 / "kept")
    fs = make_fs([l1, l2])
    assert enoent(fs, "gone")
    assert enoent(fs, "never-existed")
    assert listdir(fs) == [b"kept"]


def test_device_whiteout_hides_dir(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkwhiteout(l1 / "d")
    mkfile(l2 / "d/x")
    fs = make_fs([l1, l2])
    assert enoent(fs, "d")
    assert listdir(fs) == []


def test_whiteout_below_dir_ends_merge(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "d/a")
    mkwhiteout(l2 / "d")
    mkfile(l3 / "d/b")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"a"]


def test_nested_whiteout_in_merged_dir(layer, make_fs):
    u, l1 = layer("u"), layer("l1")
    mkwhiteout(u / "d/x")
    mkfile(l1 / "d/x")
    mkfile(l1 / "d/y")
    fs = make_fs([l1], upper=u)
    assert listdir(fs, "d") == [b"y"]
    assert enoent(fs, "d/x")


def test_nonzero_chardev_is_not_whiteout(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    os.mknod(l1 / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    mkfile(l2 / "null", b"hidden")
    fs = make_fs([l1, l2])
    _, attr = lookup_path(fs, "null")
    assert stat.S_ISCHR(attr.mode)
    assert attr.rdev == os.makedev(1, 3)


# -- opaque directories -------------------------------------------------------------------


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_opaque_dir_hides_lower_contents(layer, make_fs, ns):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/top")
    set_opaque(l1 / "d", b"y", ns)
    mkfile(l2 / "d/low")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"top"]
    assert enoent(fs, "d/low")
    # The opaque dir is a single-layer dir: its real nlink.
    assert lookup_path(fs, "d")[1].nlink == os.lstat(l1 / "d").st_nlink


def test_opaque_in_middle_layer_stops_merge_below(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "d/a")
    mkfile(l2 / "d/b")
    set_opaque(l2 / "d")
    mkfile(l3 / "d/c")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"a", b"b"]
    assert enoent(fs, "d/c")


def test_opaque_value_other_than_y_is_not_opaque(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/a")
    set_opaque(l1 / "d", b"n")
    mkfile(l2 / "d/b")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"a", b"b"]


def test_root_opacity_ignored(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    set_opaque(l1)
    mkfile(l1 / "a")
    mkfile(l2 / "b")
    fs = make_fs([l1, l2])
    assert listdir(fs) == [b"a", b"b"]


# -- xattr whiteouts (opaque=x) ----------------------------------------------------------------


def test_xattr_whiteout_in_x_dir(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkxwhiteout(l1 / "d/gone")  # sets trusted.overlay.opaque=x on l1/d
    mkfile(l1 / "d/top")
    mkfile(l2 / "d/gone", b"old")
    mkfile(l2 / "d/low")  # opaque=x is not opaque: merged
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"low", b"top"]
    assert enoent(fs, "d/gone")
    assert read_path(fs, "d/low") == b""


def test_xattr_whiteout_without_lower_is_invisible(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkxwhiteout(l1 / "d/gone")
    mkdir(l2 / "d")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == []
    assert enoent(fs, "d/gone")


def test_xattr_whiteout_at_root(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkxwhiteout(l1 / "gone")  # root of l1 gets opaque=x
    mkfile(l2 / "gone", b"old")
    mkfile(l2 / "kept")
    fs = make_fs([l1, l2])
    assert listdir(fs) == [b"kept"]
    assert enoent(fs, "gone")


def test_xattr_whiteout_user_namespace(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkxwhiteout(l1 / "d/gone", ns="user")
    mkfile(l2 / "d/gone")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == []


def test_xattr_whiteout_shape_without_x_parent_is_a_file(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkxwhiteout(l1 / "d/f", parent_x=False)
    mkfile(l2 / "d/f", b"lower")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"f"]
    _, attr = lookup_path(fs, "d/f")
    assert stat.S_ISREG(attr.mode)
    assert attr.size == 0
    assert read_path(fs, "d/f") == b""


def test_nonempty_file_with_whiteout_xattr_is_a_file(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkxwhiteout(l1 / "d/f")
    (l1 / "d/f").write_bytes(b"data")
    mkfile(l2 / "d/f", b"lower")
    fs = make_fs([l1, l2])
    assert read_path(fs, "d/f") == b"data"


def test_xattr_whiteout_in_upper_x_dir(layer, make_fs):
    u, l1 = layer("u"), layer("l1")
    mkxwhiteout(u / "d/gone")
    mkfile(l1 / "d/gone")
    mkfile(l1 / "d/kept")
    fs = make_fs([l1], upper=u)
    assert listdir(fs, "d") == [b"kept"]


def test_x_dir_merges_below_across_three_layers(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkxwhiteout(l2 / "d/b")
    mkfile(l1 / "d/a")
    mkfile(l3 / "d/b")
    mkfile(l3 / "d/c")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"a", b"c"]


# -- OCI whiteouts ------------------------------------------------------------------------------


def test_oci_whiteout_hides_lower(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / ".wh.f")
    mkfile(l1 / ".wh.d")
    mkfile(l2 / "f", b"old")
    mkfile(l2 / "d/x")
    mkfile(l2 / "g")
    fs = make_fs([l1, l2])
    assert listdir(fs) == [b"g"]
    assert enoent(fs, "f")
    assert enoent(fs, "d")


def test_oci_whiteout_same_layer_name_stays_visible(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "f", b"new")
    mkfile(l1 / ".wh.f")
    mkfile(l2 / "f", b"old")
    fs = make_fs([l1, l2])
    assert listdir(fs) == [b"f"]
    assert read_path(fs, "f") == b"new"


def test_oci_whiteout_beside_dir_makes_it_opaque(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/a")
    mkfile(l1 / ".wh.d")
    mkfile(l2 / "d/b")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"a"]


def test_oci_whiteout_in_middle_layer(layer, make_fs):
    l1, l2, l3 = layer("l1"), layer("l2"), layer("l3")
    mkfile(l1 / "d/a")
    mkfile(l2 / "d/.wh.b")
    mkfile(l3 / "d/b")
    mkfile(l3 / "d/c")
    fs = make_fs([l1, l2, l3])
    assert listdir(fs, "d") == [b"a", b"c"]


def test_a_missing_name_asks_each_layer_once_and_the_last_for_no_whiteout(layer, make_fs):
    """A .wh.NAME in the bottom layer hides nothing, so a name missing
    everywhere costs one lstat per layer and a .wh. lstat per layer but the last."""
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/a")
    mkfile(l2 / "d/b")
    mkfile(l2 / "d/.wh.gone")  # in the bottom layer: hides nothing, is no entry
    fs = make_fs([l1, l2])
    d, _ = lookup_path(fs, "d")
    asked: list[tuple[int, bytes]] = []
    real = fs.stack.lstat_real

    def counted(k: int, rel: bytes, name: bytes) -> os.stat_result | None:
        asked.append((k, name))
        return real(k, rel, name)

    fs.stack.lstat_real = counted  # type: ignore[method-assign]
    assert errno_of(lambda: fs.lookup(d, b"missing")) == errno.ENOENT
    assert errno_of(lambda: fs.lookup(d, b"gone")) == errno.ENOENT
    top, bottom = 0, len(fs.stack.layers) - 1
    assert asked == [(top, b"missing"), (top, b".wh.missing"), (bottom, b"missing"),
                     (top, b"gone"), (top, b".wh.gone"), (bottom, b"gone")]  # fmt: skip


def test_oci_opaque_marker(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "d/a")
    mkfile(l1 / "d/.wh..wh..opq")
    mkfile(l2 / "d/b")
    fs = make_fs([l1, l2])
    assert listdir(fs, "d") == [b"a"]
    assert enoent(fs, "d/b")


def test_oci_marker_names_never_visible(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / ".wh.f")
    mkfile(l1 / ".wh..wh..opq")
    mkfile(l1 / "d/.wh..wh..opq")
    mkfile(l2 / ".wh.orphan")  # in the bottom layer too
    fs = make_fs([l1, l2])
    assert listdir(fs) == [b"d"]
    assert listdir(fs, "d") == []
    for name in (".wh.f", ".wh..wh..opq", ".wh.orphan", "d/.wh..wh..opq", ".wh.nothing"):
        assert enoent(fs, name), name


def test_oci_off_markers_are_ordinary_files(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / ".wh.f", b"marker")
    mkfile(l1 / "d/.wh..wh..opq")
    mkfile(l1 / "d/a")
    mkfile(l2 / "f", b"old")
    mkfile(l2 / "d/b")
    fs = make_fs([l1, l2], oci_whiteouts=False)
    assert listdir(fs) == [b".wh.f", b"d", b"f"]
    assert read_path(fs, ".wh.f") == b"marker"
    assert read_path(fs, "f") == b"old"
    assert listdir(fs, "d") == [b".wh..wh..opq", b"a", b"b"]


def test_oci_whiteout_name_too_long_for_marker(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    long = "L" * 255
    w251 = "W" * 251
    mkfile(l1 / f".wh.{w251}")
    mkfile(l2 / long, b"long")
    mkfile(l2 / w251, b"w")
    fs = make_fs([l1, l2])
    assert listdir(fs) == [long.encode()]
    assert enoent(fs, w251)


# -- userxattr ----------------------------------------------------------------------------------


def test_userxattr_ignores_trusted_markers(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "t/a")
    set_opaque(l1 / "t", b"y", "trusted")
    mkfile(l2 / "t/b")
    mkfile(l1 / "u/a")
    set_opaque(l1 / "u", b"y", "user")
    mkfile(l2 / "u/b")
    mkxwhiteout(l1 / "tx/gone", ns="trusted")
    mkfile(l2 / "tx/gone", b"low")
    mkxwhiteout(l1 / "ux/gone", ns="user")
    mkfile(l2 / "ux/gone")
    fs = make_fs([l1, l2], userxattr=True)
    assert listdir(fs, "t") == [b"a", b"b"]  # trusted opaque ignored
    assert listdir(fs, "u") == [b"a"]  # user opaque honoured
    assert listdir(fs, "tx") == [b"gone"]  # trusted xattr whiteout is a plain file
    assert read_path(fs, "tx/gone") == b""  # l1's empty file, not l2's
    assert listdir(fs, "ux") == []  # user xattr whiteout honoured


def test_userxattr_still_honours_device_and_oci_whiteouts(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkwhiteout(l1 / "a")
    mkfile(l1 / ".wh.b")
    mkfile(l2 / "a")
    mkfile(l2 / "b")
    mkfile(l2 / "c")
    fs = make_fs([l1, l2], userxattr=True)
    assert listdir(fs) == [b"c"]


def test_default_reads_both_namespaces(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    mkfile(l1 / "t/a")
    set_opaque(l1 / "t", b"y", "trusted")
    mkfile(l2 / "t/b")
    mkfile(l1 / "u/a")
    set_opaque(l1 / "u", b"y", "user")
    mkfile(l2 / "u/b")
    fs = make_fs([l1, l2])
    assert listdir(fs, "t") == [b"a"]
    assert listdir(fs, "u") == [b"a"]


# -- names ----------------------------------------------------------------------------------------


def test_name_length_limits(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / ("n" * 255), b"ok")
    fs = make_fs([l1])
    node, attr = fs.lookup(ROOT_INO, b"n" * 255)
    assert stat.S_ISREG(attr.mode)
    assert errno_of(lambda: fs.lookup(ROOT_INO, b"n" * 256)) == errno.ENAMETOOLONG
    assert errno_of(lambda: fs.lookup(ROOT_INO, b"x" * 256)) == errno.ENAMETOOLONG


def test_odd_names(layer, make_fs):
    l1, l2 = layer("l1"), layer("l2")
    names = [b"with space", b"new\nline", b"caf\xe9", b"-dash", b"a:b", b"back\\slash"]
    for n in names:
        with open(os.path.join(os.fsencode(l2), n), "wb") as f:
            f.write(n)
    fs = make_fs([l1, l2])
    assert listdir(fs) == sorted(names)
    for n in names:
        node, _ = fs.lookup(ROOT_INO, n)
        assert read_path(fs, n) == n


@pytest.mark.parametrize("name", [b"", b"a/b"])
def test_invalid_names_einval(layer, make_fs, name):
    fs = make_fs([layer("l1")])
    assert errno_of(lambda: fs.lookup(ROOT_INO, name)) == errno.EINVAL


def test_dot_and_dotdot_lookup(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "a/b/f")
    fs = make_fs([l1])
    b_ino, _ = lookup_path(fs, "a/b")
    a_ino, _ = lookup_path(fs, "a")
    assert fs.lookup(b_ino, b".")[0].ino == b_ino
    assert fs.lookup(b_ino, b"..")[0].ino == a_ino
    assert fs.lookup(a_ino, b"..")[0].ino == ROOT_INO
    assert fs.lookup(ROOT_INO, b"..")[0].ino == ROOT_INO
    assert fs.lookup(ROOT_INO, b".")[0].ino == ROOT_INO


def test_overlapping_lowers_do_not_corrupt_root(layer, make_fs):
    l1 = layer("l1")
    mkfile(l1 / "top")
    mkfile(l1 / "sub/insub")
    fs = make_fs([l1, l1 / "sub"])
    assert listdir(fs) == [b"insub", b"sub", b"top"]
    node, attr = fs.lookup(ROOT_INO, b"sub")
    try:
        assert node.ino != ROOT_INO
        assert listdir(fs) == [b"insub", b"sub", b"top"]
    finally:
        fs.forget(node.ino, 1)
