"""The union core answers every by-inode request for that inode's object, not its old name's.

Why: the kernel names objects to a FUSE daemon by node id.  Once a name is
unlinked or renamed over, a request for the node that had it (an old fd's
xattrs, a reopen through /proc/self/fd, a chmod through an O_PATH fd) must
reach the old object or fail, never the object that holds the name now.
These drive the core directly (no FUSE), with the mount-level versions
against the kernel in tests/mount/test_identity.py.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from pyunionfs.fs import acl
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.writes import Caller, SetAttr

from .conftest import lookup_path, mkfile, read_file
from .test_core_writes import Env, env, err, ino_of, touch, write_at  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, trusted.overlay.* xattrs")

ROOT = Caller(0, 0)


def _new_file(fs, name: bytes, data: bytes) -> int:
    fh, node, _ = fs.create(ROOT_INO, name, 0o644, os.O_WRONLY, ROOT)
    fs.write(fh, 0, data)
    fs.release(fh)
    return node.ino


@pytest.mark.parametrize("where", ["upper", "lower"])
@pytest.mark.parametrize("how", ["unlink", "rename"])
async def test_xattrs_of_an_old_node_reach_the_old_object(env: Env, where: str, how: str) -> None:  # noqa: F811
    if where == "lower":
        mkfile(env.l1 / "f", b"old")
    fs = env.mount()
    old = ino_of(fs, "f") if where == "lower" else _new_file(fs, b"f", b"old")
    fs.setxattr(old, b"user.before", b"1")  # (a lower file is copied up here)
    if how == "unlink":
        fs.unlink(ROOT_INO, b"f")
        new = _new_file(fs, b"f", b"new")
    else:
        new = _new_file(fs, b"g", b"new")
        fs.rename(ROOT_INO, b"g", ROOT_INO, b"f", 0)
    assert new != old
    fs.setxattr(old, b"user.x", b"old's")
    assert fs.getxattr(old, b"user.x") == b"old's"
    assert b"user.x" in fs.listxattr(old)
    assert await err(lambda: fs.getxattr(new, b"user.x")) == errno.ENODATA
    assert await err(lambda: fs.getxattr(new, b"user.before")) == errno.ENODATA
    assert os.listxattr(env.u / "f") == []
    fs.removexattr(old, b"user.x")
    assert b"user.x" not in fs.listxattr(old)


async def test_open_of_a_replaced_node_opens_the_old_object(env: Env) -> None:  # noqa: F811
    fs = env.mount()
    old = _new_file(fs, b"r", b"old data")
    _new_file(fs, b"s", b"new data")
    fs.rename(ROOT_INO, b"s", ROOT_INO, b"r", 0)
    assert read_file(fs, old) == b"old data"
    write_at(fs, old, b"OLD")
    assert read_file(fs, old) == b"OLD data"
    assert (env.u / "r").read_bytes() == b"new data"
    assert fs.getattr(old).nlink == 0


async def test_setattr_of_a_hard_link_known_by_one_name(env: Env) -> None:  # noqa: F811
    """chmod through an O_PATH fd of h1 after h1 was unlinked and made anew:
    the old object (still named h2, never looked up) changes, the new h1 not."""
    h1 = mkfile(env.l1 / "h1", b"shared", mode=0o644)
    os.link(h1, env.l1 / "h2")
    fs = env.mount()
    old = ino_of(fs, "h1")
    fs.unlink(ROOT_INO, b"h1")
    fh, node, _ = fs.create(ROOT_INO, b"h1", 0o600, os.O_WRONLY, ROOT)
    fs.release(fh)
    attr = fs.setattr(old, SetAttr(mode=0o666), None)
    assert stat.S_IMODE(attr.mode) == 0o666
    assert stat.S_IMODE(os.lstat(env.u / "h1").st_mode) == 0o600
    _, a2 = lookup_path(fs, "h2")
    assert stat.S_IMODE(a2.mode) == 0o666 and a2.ino == old


async def test_lookups_write_nothing(env: Env) -> None:  # noqa: F811
    """A name of a lower hard link whose copy is in the index resolves to the
    copy without being linked into the upper: lookups have no side effects."""
    h1 = mkfile(env.l1 / "h1", b"shared")
    os.link(h1, env.l1 / "h2")
    fs = env.mount()
    write_at(fs, ino_of(fs, "h1"), b"SH")
    assert sorted(os.listdir(env.u)) == ["h1"]
    ino, attr = lookup_path(fs, "h2")
    assert read_file(fs, ino) == b"SHared"
    assert attr.nlink == 2
    assert sorted(os.listdir(env.u)) == ["h1"]
    # Copying the name up links it (overlayfs's link-up), with the same object.
    fs.setxattr(ino, b"user.y", b"1")
    assert os.lstat(env.u / "h1").st_ino == os.lstat(env.u / "h2").st_ino


async def test_a_pinned_object_outlives_its_name_for_getattr_and_readlink(env: Env) -> None:  # noqa: F811
    fs = env.mount()
    node, _ = fs.symlink(ROOT_INO, b"l", b"target-one", ROOT)
    fs.unlink(ROOT_INO, b"l")
    fs.symlink(ROOT_INO, b"l", b"target-two", ROOT)
    assert fs.readlink(node.ino) == b"target-one"


async def test_an_upper_name_holding_another_object_is_refused(env: Env) -> None:  # noqa: F811
    """Behind the daemon's back (undefined, but never the wrong object)."""
    fs = env.mount()
    old = _new_file(fs, b"f", b"one")
    (env.u / "g").write_bytes(b"two")
    os.rename(env.u / "g", env.u / "f")
    assert await err(lambda: fs.getattr(old)) == errno.ENOENT
    assert await err(lambda: fs.open_file(old, os.O_RDONLY)) == errno.ENOENT


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return b"\x02\x00\x00\x00" + b"".join(t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
                                          for t, p, i in entries)


def test_default_acl_shapes_the_mode() -> None:
    base = _acl((acl.USER_OBJ, 7, 0), (acl.GROUP_OBJ, 7, 0), (acl.OTHER, 7, 0))
    assert acl.create_mode(base, stat.S_IFREG | 0o666) == (stat.S_IFREG | 0o666, None)
    narrow = _acl((acl.USER_OBJ, 6, 0), (acl.GROUP_OBJ, 4, 0), (acl.OTHER, 0, 0))
    assert acl.create_mode(narrow, 0o777) == (0o640, None)
    named = _acl((acl.USER_OBJ, 7, 0), (acl.USER, 5, 1000), (acl.GROUP_OBJ, 7, 0), (acl.MASK, 7, 0), (acl.OTHER, 5, 0))
    mode, access = acl.create_mode(named, 0o640)
    assert mode == 0o640
    assert access == _acl((acl.USER_OBJ, 6, 0), (acl.USER, 5, 1000), (acl.GROUP_OBJ, 7, 0), (acl.MASK, 4, 0),
                          (acl.OTHER, 0, 0))


async def test_create_applies_umask_or_the_default_acl(env: Env) -> None:  # noqa: F811
    fs = env.mount()
    node, _ = touch(fs, "plain", 0o666, Caller(0, 0, 0o022))
    assert stat.S_IMODE(os.lstat(env.u / "plain").st_mode) == 0o644
    d, _ = fs.mkdir(ROOT_INO, b"d", 0o777, Caller(0, 0, 0o022))
    os.setxattr(env.u / "d", acl.DEFAULT, _acl((acl.USER_OBJ, 7, 0), (acl.GROUP_OBJ, 7, 0), (acl.OTHER, 7, 0)))
    fh, _, _ = fs.create(d.ino, b"f", 0o666, os.O_WRONLY, Caller(0, 0, 0o022))
    fs.release(fh)
    sub, _ = fs.mkdir(d.ino, b"sub", 0o777, Caller(0, 0, 0o022))
    assert stat.S_IMODE(os.lstat(env.u / "d/f").st_mode) == 0o666
    assert stat.S_IMODE(os.lstat(env.u / "d/sub").st_mode) == 0o777
    assert os.getxattr(env.u / "d/sub", acl.DEFAULT) == os.getxattr(env.u / "d", acl.DEFAULT)


async def test_a_removed_directory_holds_nothing_though_its_path_does(env: Env) -> None:  # noqa: F811
    """An open directory removed and made anew at the same path: the old node
    lists nothing and finds nothing; the new one is a different directory."""
    mkfile(env.u / "d/old", b"x")
    fs = env.mount()
    d = ino_of(fs, "d")
    handle = fs.opendir(d)
    fs.unlink(d, b"old")
    fs.rmdir(ROOT_INO, b"d")
    new, _ = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    touch(fs, "d/fresh")
    assert new.ino != d
    assert [n for _, n, _, _ in fs.readdir(handle, 0)] == [b".", b".."]
    assert [n for _, n, _, _ in fs.readdir_at(d, 0)] == [b".", b".."]  # (without a handle too)
    assert await err(lambda: fs.lookup(d, b"fresh")) == errno.ENOENT
    assert await err(lambda: fs.opendir(d)) == errno.ENOENT
    fs.releasedir(handle)


def test_a_hard_link_known_by_a_lower_only_name_after_its_copied_name_goes(env: Env) -> None:  # noqa: F811
    """Unlinking one name of a lower hard link copies it to the index first;
    the node is then known by its other name, which is still only in the
    lower (served from the index copy): requests reach the copy through the
    pin taken when the first name went, not a lookup of the upper."""
    a = mkfile(env.l1 / "a", b"x")
    (env.l1 / "ovl").mkdir()
    os.link(a, env.l1 / "ovl/hl")
    fs = env.mount()
    ino, ovl = ino_of(fs, "a"), ino_of(fs, "ovl")
    assert ino_of(fs, "ovl/hl") == ino
    fs.unlink(ROOT_INO, b"a")
    assert fs.getattr(ino).nlink == 1
    assert read_file(fs, ino) == b"x"
    fs.unlink(ovl, b"hl")
    assert sorted(os.listdir(env.u / "ovl")) == ["hl"]  # its whiteout
