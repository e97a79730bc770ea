"""WritableUnionFS driven directly (no FUSE): new entries, copy-up, whiteouts,
rename, links, open-unlinked files and read-only mounts.

Every test builds its layers with plain os calls under tmp_path, calls the core
by inode number and checks return values, errnos, attributes and the on-disk
upper and work directories.  The expected behaviour is the kernel's overlayfs
(``redirect_dir=off``; hard-linked lower files as with ``index=on``).  The
``env`` fixture closes every filesystem it made and then checks that no lower
layer changed (contents, mode, owner, mtime and ctime, xattrs, inode, links).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.errors import WouldBlock
from pyunionfs.fs import copyup, origin
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.locking import no_blocking
from pyunionfs.fs.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE
from pyunionfs.fs.writes import Caller, SetAttr, WritableUnionFS

from .conftest import (
    b,
    errno_of,
    listdir,
    lookup_path,
    mkdir,
    mkfile,
    mklink,
    mkwhiteout,
    read_file,
    read_path,
    set_opaque,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, mknod, trusted.overlay.* xattrs")

ALICE = Caller(1234, 5678)
OPAQUE = b"trusted.overlay.opaque"
ORIGIN = b"trusted.overlay.origin"
IMPURE = b"trusted.overlay.impure"
OLD = (1_000_000_000, 2_000_000_000)  # atime, mtime: relatime would bump such an atime on any read


# -- on-disk helpers ------------------------------------------------------------------------------


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lexists(p: Path) -> bool:
    return os.path.lexists(p)


def samefile(p: Path, q: Path) -> bool:
    return os.path.samefile(p, q)


def xattr(p: Path, name: bytes) -> bytes | None:
    try:
        return os.getxattr(p, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return None


def origin_of(p: Path) -> bytes:
    """The overlay.origin record the kernel would write for lower object *p*."""
    fd = os.open(p.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        record = origin.of(fd, os.fsencode(p.name))
    finally:
        os.close(fd)
    assert record is not None
    return record


def digest(p: str) -> str:
    fd = os.open(p, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def snapshot(root: Path, file_atime: bool = False) -> dict[str, tuple]:
    """Everything about a tree a write through the union must not change.

    Directory atimes are left out (listing a directory may touch them, and the
    walk here does); file atimes only with *file_atime* (read with O_NOATIME).
    """
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                content: object = digest(p)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            else:
                content = None
            xattrs = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)}
            atime = st.st_atime_ns if file_atime and stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_ino, st.st_nlink, st.st_rdev,
                st.st_mtime_ns, st.st_ctime_ns, atime, content, xattrs,
            )
    return out


class Env:
    """Two lowers l1 (top) and l2, an upper u and a work dir w under tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.l1, self.l2, self.u, self.w = (mkdir(tmp / n) for n in ("l1", "l2", "u", "w"))
        self.made: list[WritableUnionFS] = []
        self.frozen: dict[Path, dict[str, tuple]] | None = None

    def mount(self, readonly: bool = False, upper: bool = True, **kw) -> WritableUnionFS:
        """A WritableUnionFS over the layers; the first call freezes the lowers' state."""
        if self.frozen is None:
            self.frozen = {p: snapshot(p) for p in (self.l1, self.l2)}
        cfg = MountConfig(
            lowers=(b(self.l1), b(self.l2)),
            upper=b(self.u) if upper else None,
            mountpoint=b(self.tmp / "mnt-unused"),
            workdir=None if readonly else b(self.w),
            readonly=readonly,
            **kw,
        )
        fs = WritableUnionFS(cfg)
        self.made.append(fs)
        return fs

    def leftovers(self) -> list[str]:
        """Temporaries left in the work dir's ``work/``: none, after any request."""
        return sorted(os.listdir(self.w / "work"))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for fs in e.made:
        fs.close()
    if e.frozen is not None:
        for p, before in e.frozen.items():
            assert snapshot(p) == before, f"lower layer {p.name} was modified"


# -- driving the core -------------------------------------------------------------------------------


async def err(call: Callable[[], object]) -> int:
    """Call (and await, if async) *call*, which must raise OSError; its errno."""
    with pytest.raises(OSError) as info:
        result = call()
        if inspect.isawaitable(result):
            await result
    return info.value.errno


def ino_of(fs: WritableUnionFS, rel: str) -> int:
    return lookup_path(fs, rel)[0]


def at(fs: WritableUnionFS, rel: str) -> tuple[int, bytes]:
    """(parent inode, name) of *rel*, the parent looked up from the root."""
    parent, _, name = rel.rpartition("/")
    return ino_of(fs, parent), os.fsencode(name)


def write_at(fs: WritableUnionFS, ino: int, data: bytes, offset: int = 0) -> None:
    fh = fs.open_file(ino, os.O_WRONLY)
    try:
        assert fs.write(fh, offset, data) == len(data)
    finally:
        fs.release(fh)


def touch(fs: WritableUnionFS, rel: str, mode: int = 0o644, caller: Caller = ALICE):
    """create(2) of *rel*, handle released; returns (node, attr)."""
    pino, name = at(fs, rel)
    fh, node, attr = fs.create(pino, name, mode, os.O_WRONLY | os.O_CREAT | os.O_EXCL, caller)
    fs.release(fh)
    return node, attr


def exists(fs: WritableUnionFS, rel: str) -> bool:
    try:
        lookup_path(fs, rel)
    except FileNotFoundError:
        return False
    return True


# -- create -----------------------------------------------------------------------------------------


async def test_create_new_file_owned_by_caller(env):
    fs = env.mount()
    fh, node, attr = fs.create(ROOT_INO, b"new", 0o640, os.O_RDWR | os.O_CREAT, ALICE)
    assert fs.write(fh, 0, b"hello") == 5
    assert fs.read(fh, 0, 100) == b"hello"
    fs.release(fh)
    st = os.lstat(env.u / "new")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (ALICE.uid, ALICE.gid)
    assert (attr.uid, attr.gid, attr.mode, attr.nlink) == (ALICE.uid, ALICE.gid, stat.S_IFREG | 0o640, 1)
    assert attr.ino == node.ino == st.st_ino
    assert lookup_path(fs, "new")[1].ino == node.ino
    assert read_path(fs, "new") == b"hello"
    assert fs.getattr(node.ino).size == 5
    assert xattr(env.u / "new", ORIGIN) is None  # a new file has no origin
    assert env.leftovers() == []


async def test_create_in_lower_only_dir_copies_parent_up(env):
    mkfile(env.l1 / "d/old", b"old")
    fs = env.mount()
    node, _ = touch(fs, "d/new")
    assert sorted(os.listdir(env.u / "d")) == ["new"]
    assert listdir(fs, "d") == [b"new", b"old"]
    assert node.path == b"d/new"


@pytest.mark.parametrize("where", ["lower", "upper"])
async def test_create_excl_on_existing_eexist(env, where):
    mkfile((env.l1 if where == "lower" else env.u) / "f", b"data")
    fs = env.mount()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert await err(lambda: fs.create(ROOT_INO, b"f", 0o644, flags, ALICE)) == errno.EEXIST
    assert read_path(fs, "f") == b"data"
    if where == "lower":
        assert not lexists(env.u / "f"), "a failed O_EXCL create copied up"


async def test_create_without_excl_opens_existing_lower_file(env):
    f = mkfile(env.l1 / "f", b"lower data", mode=0o604)
    lower_ino = os.lstat(f).st_ino
    fs = env.mount()
    fh, node, attr = fs.create(ROOT_INO, b"f", 0o600, os.O_WRONLY | os.O_CREAT, ALICE)
    assert fs.write(fh, 0, b"LOWER") == 5
    fs.release(fh)
    assert node.ino == attr.ino == lower_ino
    assert (env.u / "f").read_bytes() == b"LOWER data"
    assert stat.S_IMODE(attr.mode) == 0o604 and attr.uid == 0  # existing file: mode and owner kept


async def test_create_over_upper_whiteout_replaces_it(env):
    mkfile(env.l1 / "f", b"lower")
    mkwhiteout(env.u / "f")
    fs = env.mount()
    assert not exists(fs, "f")
    node, attr = touch(fs, "f", 0o600)
    st = os.lstat(env.u / "f")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (ALICE.uid, ALICE.gid, 0o600)
    assert attr.ino == node.ino == st.st_ino != os.lstat(env.l1 / "f").st_ino
    assert read_path(fs, "f") == b""
    assert sorted(os.listdir(env.u)) == ["f"]
    assert env.leftovers() == []


@pytest.mark.parametrize("kind", ["create", "mkdir", "mknod", "symlink", "link", "rename"])
async def test_oci_marker_names_refused_eperm(env, kind):
    mkfile(env.l1 / "f", b"x")
    fs = env.mount()
    f = ino_of(fs, "f")
    name = b".wh.f"
    calls = {
        "create": lambda: fs.create(ROOT_INO, name, 0o644, os.O_WRONLY | os.O_CREAT, ALICE),
        "mkdir": lambda: fs.mkdir(ROOT_INO, name, 0o755, ALICE),
        "mknod": lambda: fs.mknod(ROOT_INO, name, stat.S_IFIFO | 0o644, 0, ALICE),
        "symlink": lambda: fs.symlink(ROOT_INO, name, b"t", ALICE),
        "link": lambda: fs.link(f, ROOT_INO, name),
        "rename": lambda: fs.rename(ROOT_INO, b"f", ROOT_INO, name, 0),
    }
    assert await err(calls[kind]) == errno.EPERM
    assert os.listdir(env.u) == []
    assert read_path(fs, "f") == b"x"


async def test_oci_marker_names_allowed_when_oci_whiteouts_off(env):
    fs = env.mount(oci_whiteouts=False)
    touch(fs, ".wh.f")
    assert stat.S_ISREG(os.lstat(env.u / ".wh.f").st_mode)
    assert listdir(fs) == [b".wh.f"]


# -- mkdir, mknod, symlink --------------------------------------------------------------------------


def test_mkdir_over_whiteout_is_opaque(env):
    mkfile(env.l1 / "d/hidden", b"x")
    mkwhiteout(env.u / "d")
    fs = env.mount()
    node, attr = fs.mkdir(ROOT_INO, b"d", 0o750, ALICE)
    assert stat.S_ISDIR(attr.mode) and stat.S_IMODE(attr.mode) == 0o750
    assert (attr.uid, attr.gid) == (ALICE.uid, ALICE.gid)
    assert os.path.isdir(env.u / "d") and not os.path.islink(env.u / "d")
    assert xattr(env.u / "d", OPAQUE) == b"y"
    assert listdir(fs, "d") == []
    assert fs.lookup(node.ino, b"..")[1].ino == ROOT_INO
    assert env.leftovers() == []
    with pytest.raises(FileNotFoundError):
        fs.lookup(node.ino, b"hidden")


@pytest.mark.parametrize("parent", ["", "merged", "loweronly", "upperonly"])
def test_mkdir_opaque_only_in_merged_parent(env, parent):
    """Not over a whiteout, a new dir is opaque when its parent has lower
    parts, as the kernel marks it with index=on (checked on 6.x)."""
    mkfile(env.l1 / "merged/x")
    mkdir(env.u / "merged")
    mkfile(env.l2 / "loweronly/y")
    mkdir(env.u / "upperonly")
    fs = env.mount()
    pino = ino_of(fs, parent)
    node, attr = fs.mkdir(pino, b"new", 0o700, ALICE)
    p = env.u / parent / "new"
    st = os.lstat(p)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (ALICE.uid, ALICE.gid)
    assert xattr(p, OPAQUE) == (None if parent == "upperonly" else b"y")
    assert attr.ino == node.ino == st.st_ino
    assert listdir(fs, os.path.join(parent, "new")) == []


def test_mkdir_over_lower_whiteout(env):
    """A whiteout in a lower layer (not the upper): nothing to replace, and
    what the whiteout hid stays hidden below the new dir (opaque anyway, as
    its parent is merged once copied up)."""
    mkwhiteout(env.l1 / "d/x")
    mkfile(env.l2 / "d/x/old", b"o")
    fs = env.mount()
    assert listdir(fs, "d") == []
    fs.mkdir(ino_of(fs, "d"), b"x", 0o755, ALICE)
    assert xattr(env.u / "d/x", OPAQUE) == b"y"
    assert listdir(fs, "d/x") == []


@pytest.mark.parametrize("kind", ["mkdir", "mknod", "symlink", "link"])
@pytest.mark.parametrize("where", ["lower", "upper"])
async def test_new_name_existing_eexist(env, where, kind):
    mkdir((env.l1 if where == "lower" else env.u) / "d")
    mkfile((env.l2 if where == "lower" else env.u) / "f", b"f")
    fs = env.mount()
    f = ino_of(fs, "f")
    for name in (b"d", b"f"):
        call = {
            "mkdir": lambda n=name: fs.mkdir(ROOT_INO, n, 0o755, ALICE),
            "mknod": lambda n=name: fs.mknod(ROOT_INO, n, stat.S_IFIFO | 0o644, 0, ALICE),
            "symlink": lambda n=name: fs.symlink(ROOT_INO, n, b"t", ALICE),
            "link": lambda n=name: fs.link(f, ROOT_INO, n),
        }[kind]
        assert await err(call) == errno.EEXIST
    assert sorted(os.listdir(env.u)) == ([] if where == "lower" else ["d", "f"])


def test_stale_work_dir_temporaries_cleaned_at_mount(env):
    mkfile(env.w / "work/#pyunionfs-1-0", b"half a copy")
    mkfile(env.w / "work/#pyunionfs-1-1/deep", b"half a dir")
    fs = env.mount()
    assert env.leftovers() == []
    assert os.listdir(env.w / "index") == []
    fs.mkdir(ROOT_INO, b"d", 0o755, ALICE)


def test_mknod_whiteout_device_eperm(env):
    fs = env.mount()
    assert errno_of(lambda: fs.mknod(ROOT_INO, b"c", stat.S_IFCHR | 0o600, 0, ALICE)) == errno.EPERM
    assert os.listdir(env.u) == []


@pytest.mark.parametrize(
    "fmt, rdev", [(stat.S_IFIFO, 0), (stat.S_IFCHR, os.makedev(1, 3)), (stat.S_IFBLK, os.makedev(7, 0))]
)
def test_mknod_ok(env, fmt, rdev):
    fs = env.mount()
    node, attr = fs.mknod(ROOT_INO, b"n", fmt | 0o640, rdev, ALICE)
    st = os.lstat(env.u / "n")
    assert stat.S_IFMT(st.st_mode) == fmt and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_rdev == rdev == attr.rdev
    assert (st.st_uid, st.st_gid) == (attr.uid, attr.gid) == (ALICE.uid, ALICE.gid)
    assert attr.mode == st.st_mode and attr.ino == node.ino == st.st_ino


def test_symlink(env):
    mkfile(env.l1 / "d/x")
    fs = env.mount()
    node, attr = fs.symlink(ino_of(fs, "d"), b"ln", b"../target/of", ALICE)
    p = env.u / "d/ln"
    assert os.readlink(p) == "../target/of"
    st = os.lstat(p)
    assert (st.st_uid, st.st_gid) == (ALICE.uid, ALICE.gid)
    assert stat.S_ISLNK(attr.mode) and attr.size == len(b"../target/of")
    assert fs.readlink(node.ino) == b"../target/of"
    assert lookup_path(fs, "d/ln")[1].ino == node.ino


def test_symlink_over_whiteout(env):
    mkfile(env.l1 / "s", b"x")
    mkwhiteout(env.u / "s")
    fs = env.mount()
    node, _ = fs.symlink(ROOT_INO, b"s", b"t", ALICE)
    assert os.readlink(env.u / "s") == "t"
    assert fs.readlink(node.ino) == b"t"
    assert env.leftovers() == []


# -- set-group-ID directories -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["lower", "upper"])
async def test_setgid_parent(env, where):
    sg = mkdir((env.l1 if where == "lower" else env.u) / "sg")
    os.chown(sg, 0, 555)
    os.chmod(sg, 0o2777)
    mkdir(env.l1 / "plain")
    fs = env.mount()
    _, fattr = touch(fs, "sg/f", 0o644)
    _, dattr = fs.mkdir(ino_of(fs, "sg"), b"d", 0o755, ALICE)
    _, pattr = touch(fs, "plain/f", 0o644)
    assert (fattr.uid, fattr.gid) == (ALICE.uid, 555)
    assert (dattr.uid, dattr.gid) == (ALICE.uid, 555)
    assert dattr.mode & stat.S_ISGID and stat.S_IMODE(dattr.mode) == 0o2755
    assert not fattr.mode & stat.S_ISGID
    assert (pattr.uid, pattr.gid) == (ALICE.uid, ALICE.gid)
    st = os.lstat(env.u / "sg")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2777, 555)  # the copied-up parent kept its bits
    assert os.lstat(env.u / "sg/f").st_gid == 555
    d = os.lstat(env.u / "sg/d")
    assert d.st_gid == 555 and d.st_mode & stat.S_ISGID


# -- copy-up ------------------------------------------------------------------------------------------


@pytest.fixture
def deep(env):
    """l1/a/b/f with distinctive metadata everywhere; l2/a too (a is merged)."""
    a = mkdir(env.l1 / "a")
    os.chown(a, 7, 8)
    os.chmod(a, 0o750)
    bdir = mkdir(a / "b")
    os.chown(bdir, 9, 10)
    os.chmod(bdir, 0o711)
    os.setxattr(bdir, b"user.dir", b"D")
    f = mkfile(bdir / "f", b"payload" * 1000, mode=0o640)
    os.chown(f, 11, 22)
    os.chmod(f, 0o640)
    os.setxattr(f, b"user.color", b"blue")
    os.setxattr(f, b"trusted.note", b"t")
    os.setxattr(f, b"trusted.overlay.overlay.esc", b"e")  # escaped: a user-visible trusted.overlay.esc
    os.setxattr(f, ORIGIN, b"stale record of an older overlay")  # private: never copied
    os.utime(f, ns=OLD)
    mkfile(env.l2 / "a/other", b"o")
    for d in (bdir, a):
        os.utime(d, ns=OLD)
    return f


def _open_for_write(fs, ino):
    fs.release(fs.open_file(ino, os.O_WRONLY))


def _setattr_atime(fs, ino):
    fs.setattr(ino, SetAttr(atime_ns=5_000_000_000), None)


def _setxattr(fs, ino):
    fs.setxattr(ino, b"user.added", b"1")


def _removexattr(fs, ino):
    fs.removexattr(ino, b"trusted.note")


COPY_UP_TRIGGERS = {
    "open": _open_for_write,
    "setattr": _setattr_atime,
    "setxattr": _setxattr,
    "removexattr": _removexattr,
}


@pytest.mark.parametrize("trigger", sorted(COPY_UP_TRIGGERS))
async def test_copy_up_keeps_everything(env, deep, trigger):
    os.utime(env.u, ns=(3_000_000_000, 4_000_000_000))
    fs = env.mount()
    lower = os.lstat(deep)
    ino, before = lookup_path(fs, "a/b/f")
    assert ino == before.ino == lower.st_ino
    times = {rel: (os.lstat(env.l1 / rel).st_atime_ns, os.lstat(env.l1 / rel).st_mtime_ns) for rel in ("a", "a/b")}
    COPY_UP_TRIGGERS[trigger](fs, ino)
    # Copy-up is invisible: the directories keep their times (checked before
    # anything lists them), the upper root too.
    for rel in ("a", "a/b"):
        dst = os.lstat(env.u / rel)
        assert (dst.st_atime_ns, dst.st_mtime_ns) == times[rel], rel
        assert dst.st_mtime_ns == OLD[1]
    assert os.lstat(env.u).st_mtime_ns == 4_000_000_000

    up = env.u / "a/b/f"
    st = os.lstat(up)
    assert up.read_bytes() == b"payload" * 1000
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 11, 22)
    assert st.st_mtime_ns == lower.st_mtime_ns
    assert xattr(up, b"user.color") == b"blue"
    assert xattr(up, b"trusted.note") == (None if trigger == "removexattr" else b"t")
    assert xattr(up, b"user.added") == (b"1" if trigger == "setxattr" else None)
    if trigger == "setattr":
        assert st.st_atime_ns == 5_000_000_000
    assert xattr(up, ORIGIN) == origin_of(deep)
    assert xattr(up, b"trusted.overlay.overlay.esc") == b"e"
    assert sorted(fs.listxattr(ino)) == sorted(
        [b"user.color", b"trusted.overlay.esc"]
        + ([b"trusted.note"] if trigger != "removexattr" else [])
        + ([b"user.added"] if trigger == "setxattr" else [])
    )
    # The parents came first, with their own metadata and origin; the
    # directories holding copies with an origin are marked impure.
    for rel, mode, owner in (("a", 0o750, (7, 8)), ("a/b", 0o711, (9, 10))):
        dst = os.lstat(env.u / rel)
        assert (stat.S_IMODE(dst.st_mode), dst.st_uid, dst.st_gid) == (mode, *owner)
        assert xattr(env.u / rel, ORIGIN) == origin_of(env.l1 / rel)
        assert xattr(env.u / rel, IMPURE) == b"y"
    assert xattr(env.u / "a/b", b"user.dir") == b"D"
    assert sorted(os.listdir(env.u / "a")) == ["b"]  # l2's "other" stays below
    assert sorted(os.listdir(env.u / "a/b")) == ["f"]
    # Same inode number, now read from the upper.
    after = fs.getattr(ino)
    assert after.ino == ino
    assert (after.uid, after.gid, after.size, after.mtime_ns) == (11, 22, 7000, lower.st_mtime_ns)
    assert lookup_path(fs, "a/b/f")[0] == ino
    assert read_path(fs, "a/b/f") == b"payload" * 1000
    assert fs.getattr(ino_of(fs, "a/b")).mtime_ns == OLD[1]
    assert listdir(fs, "a") == [b"b", b"other"]
    assert env.leftovers() == []
    # A remount finds the copy's lower origin again: the same number.
    again = env.mount()
    assert lookup_path(again, "a/b/f")[1].ino == ino
    assert lookup_path(again, "a")[1].ino == lookup_path(fs, "a")[1].ino


async def test_copy_up_then_write_leaves_lower_alone(env, deep):
    fs = env.mount()
    ino = ino_of(fs, "a/b/f")
    fh = fs.open_file(ino, os.O_RDWR)
    assert fs.write(fh, 0, b"PAY") == 3
    assert fs.read(fh, 0, 7) == b"PAYload"
    fs.release(fh)
    assert read_path(fs, "a/b/f").startswith(b"PAYloadpayload")
    assert deep.read_bytes() == b"payload" * 1000


async def test_copy_up_open_trunc(env, deep):
    fs = env.mount()
    ino = ino_of(fs, "a/b/f")
    fs.release(fs.open_file(ino, os.O_WRONLY | os.O_TRUNC))
    assert fs.getattr(ino).size == 0
    assert (env.u / "a/b/f").read_bytes() == b""


async def test_setattr_changes_after_copy_up(env, deep):
    fs = env.mount()
    ino = ino_of(fs, "a/b/f")
    attr = fs.setattr(ino, SetAttr(mode=0o600, uid=1, gid=2, size=3, mtime_ns=9_000_000_000), None)
    assert (stat.S_IMODE(attr.mode), attr.uid, attr.gid, attr.size, attr.mtime_ns) == (0o600, 1, 2, 3, 9_000_000_000)
    assert attr.ino == ino
    st = os.lstat(env.u / "a/b/f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 1, 2, 3)
    assert read_path(fs, "a/b/f") == b"pay"


async def test_copy_up_does_not_touch_lower_atime(env, deep):
    """The kernel reads the lower file with O_NOATIME for the copy (relatime would bump an atime this old)."""
    fs = env.mount()
    before = snapshot(env.l1, file_atime=True)
    _open_for_write(fs, ino_of(fs, "a/b/f"))
    assert read_path(fs, "a/b/f") == b"payload" * 1000
    assert snapshot(env.l1, file_atime=True) == before


async def test_read_only_handle_follows_copy_up(env, deep):
    """As the kernel since 4.19: an fd opened before a copy-up sees later writes."""
    fs = env.mount()
    ino = ino_of(fs, "a/b/f")
    ro = fs.open_file(ino, os.O_RDONLY)
    write_at(fs, ino, b"NEW")
    assert fs.read(ro, 0, 7) == b"NEWload"
    fs.release(ro)


async def test_setattr_on_lower_symlink_changes_the_link_only(env):
    target = mkfile(env.l1 / "target", b"t")
    mklink(env.l1 / "ln", "target")
    fs = env.mount()
    ino = ino_of(fs, "ln")
    attr = fs.setattr(ino, SetAttr(uid=5, gid=6, mtime_ns=7_000_000_000), None)
    assert (attr.uid, attr.gid, attr.mtime_ns) == (5, 6, 7_000_000_000) and stat.S_ISLNK(attr.mode)
    st = os.lstat(env.u / "ln")
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (5, 6, 7_000_000_000)
    assert os.readlink(env.u / "ln") == "target"
    assert not lexists(env.u / "target")  # the target was not copied up (nor changed: see env)
    assert os.lstat(target).st_uid == 0


async def test_copy_up_of_symlink_and_fifo(env):
    mklink(env.l1 / "ln", "some/target")
    os.mkfifo(env.l1 / "fifo")
    os.chmod(env.l1 / "fifo", 0o620)
    fs = env.mount()
    for name in ("ln", "fifo"):
        ino = ino_of(fs, name)
        fs.setxattr(ino, b"trusted.mine", b"v")
        assert fs.getattr(ino).ino == ino
        assert xattr(env.u / name, b"trusted.mine") == b"v"
    assert os.readlink(env.u / "ln") == "some/target"
    assert stat.S_ISFIFO(os.lstat(env.u / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(env.u / "fifo").st_mode) == 0o620


async def test_change_root(env):
    mkfile(env.l1 / "f", b"f")
    fs = env.mount()
    fs.setxattr(ROOT_INO, b"user.root", b"r")
    attr = fs.setattr(ROOT_INO, SetAttr(mode=0o711), None)
    assert stat.S_IMODE(attr.mode) == 0o711 and attr.ino == ROOT_INO
    assert xattr(env.u, b"user.root") == b"r"
    assert stat.S_IMODE(os.lstat(env.u).st_mode) == 0o711
    assert fs.getxattr(ROOT_INO, b"user.root") == b"r"
    fs.removexattr(ROOT_INO, b"user.root")
    assert xattr(env.u, b"user.root") is None
    assert listdir(fs) == [b"f"]


@pytest.mark.parametrize("how", ["setxattr", "setattr"])
async def test_change_merged_dir_copies_it_up_empty(env, how):
    mkfile(env.l1 / "d/x", b"x")
    mkfile(env.l2 / "d/y", b"y")
    fs = env.mount()
    ino = ino_of(fs, "d")
    if how == "setxattr":
        fs.setxattr(ino, b"user.k", b"v")
        assert xattr(env.u / "d", b"user.k") == b"v"
        assert fs.getxattr(ino, b"user.k") == b"v"
    else:
        attr = fs.setattr(ino, SetAttr(mode=0o700, uid=3), None)
        assert (stat.S_IMODE(attr.mode), attr.uid, attr.nlink) == (0o700, 3, 1)
        st = os.lstat(env.u / "d")
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 3)
    assert os.listdir(env.u / "d") == []
    assert xattr(env.u / "d", OPAQUE) is None
    assert listdir(fs, "d") == [b"x", b"y"]
    assert fs.getattr(ino).ino == ino


async def test_removexattr_missing_on_lower_file_enodata_without_copy_up(env):
    f = mkfile(env.l1 / "d/f", b"x")
    os.setxattr(f, b"user.present", b"p")
    fs = env.mount()
    ino = ino_of(fs, "d/f")
    assert await err(lambda: fs.removexattr(ino, b"user.missing")) == errno.ENODATA
    assert os.listdir(env.u) == []
    fs.removexattr(ino, b"user.present")
    assert xattr(env.u / "d/f", b"user.present") is None
    assert fs.listxattr(ino) == []


async def test_escaped_overlay_xattrs_set_and_removed(env):
    f = mkfile(env.l1 / "f", b"x")
    os.setxattr(f, b"trusted.overlay.overlay.old", b"o")
    fs = env.mount()
    ino = ino_of(fs, "f")
    fs.setxattr(ino, b"trusted.overlay.new", b"n")
    up = env.u / "f"
    assert xattr(up, b"trusted.overlay.overlay.new") == b"n"
    assert xattr(up, b"trusted.overlay.new") is None
    assert fs.getxattr(ino, b"trusted.overlay.new") == b"n"
    fs.removexattr(ino, b"trusted.overlay.old")
    assert xattr(up, b"trusted.overlay.overlay.old") is None
    assert sorted(fs.listxattr(ino)) == [b"trusted.overlay.new"]
    assert xattr(up, ORIGIN) == origin_of(f)


def _in_threads(fs: WritableUnionFS, *calls: Callable[[], object]) -> list[object]:
    """Run each call in its own thread holding the core's lock, as an engine's
    workers do; their results in order (an exception is re-raised here)."""
    results: list[object] = [None] * len(calls)

    def run(i: int, call: Callable[[], object]) -> None:
        try:
            with fs.lock:
                results[i] = call()
        except BaseException as exc:  # noqa: BLE001  (handed to the test's thread)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_concurrent_copy_ups_of_one_big_file(env):
    """Copies of 64 KiB and more run without the core's lock; requests on the
    same file wait for it and then share the one copy."""
    data = bytes(range(256)) * 4096
    mkfile(env.l1 / "d/big", data)
    mkfile(env.l1 / "d/small", b"s")
    fs = env.mount()
    ino, small = ino_of(fs, "d/big"), ino_of(fs, "d/small")
    got = _in_threads(
        fs,
        *[lambda: fs.open_file(ino, os.O_RDWR)] * 3,
        lambda: fs.setxattr(ino, b"user.k", b"v"),
        lambda: fs.setxattr(small, b"user.k", b"v"),
    )
    fhs = [fh for fh in got[:3] if isinstance(fh, int)]
    real = os.lstat(env.u / "d/big")
    assert {os.fstat(fh).st_ino for fh in fhs} == {real.st_ino}
    assert real.st_nlink == 1 and real.st_size == len(data)
    fs.write(fhs[0], 0, b"FIRST")
    assert fs.read(fhs[2], 0, 5) == b"FIRST"
    for fh in fhs:
        fs.release(fh)
    assert xattr(env.u / "d/big", b"user.k") == b"v"
    assert xattr(env.u / "d/small", b"user.k") == b"v"
    assert read_path(fs, "d/big") == b"FIRST" + data[5:]
    assert fs.getattr(ino).ino == ino
    assert env.leftovers() == []


def test_unlink_waits_for_copy_up_in_flight(env, monkeypatch):
    """An unlink of a file being copied up waits for the copy (the core's lock
    is let go meanwhile, so the unlink can start), then whites it out."""
    mkfile(env.l1 / "big", b"x" * (1 << 20))
    fs = env.mount()
    ino = ino_of(fs, "big")
    started, gate = threading.Event(), threading.Event()
    real_copy_up = copyup.copy_up

    def held_copy_up(*args, **kw):
        started.set()
        assert gate.wait(30)
        return real_copy_up(*args, **kw)

    monkeypatch.setattr(copyup, "copy_up", held_copy_up)
    fhs: list[int] = []

    def opener() -> None:
        with fs.lock:
            fhs.append(fs.open_file(ino, os.O_RDWR))

    def unlinker() -> None:
        with fs.lock:
            fs.unlink(ROOT_INO, b"big")

    copying = threading.Thread(target=opener)
    copying.start()
    assert started.wait(30)
    unlinking = threading.Thread(target=unlinker)
    unlinking.start()
    unlinking.join(0.3)
    assert unlinking.is_alive(), "unlink did not wait for the copy-up in flight"
    assert not lexists(env.u / "big")
    gate.set()
    copying.join(30)
    unlinking.join(30)
    assert is_whiteout(env.u / "big")
    assert not exists(fs, "big")
    assert fs.write(fhs[0], 0, b"y") == 1
    assert fs.getattr(ino).nlink == 0
    fs.release(fhs[0])
    assert env.leftovers() == []


def test_a_thread_that_may_not_block_is_told_before_anything_changes(env):
    """The pyfuse3 engine's event loop: a long copy-up raises WouldBlock with
    nothing done (it is run again in a worker thread); a short one is done."""
    mkfile(env.l1 / "d/big", b"x" * (1 << 20))
    mkfile(env.l1 / "d/small", b"s")
    fs = env.mount()
    big, small = ino_of(fs, "d/big"), ino_of(fs, "d/small")
    with fs.lock, no_blocking():
        with pytest.raises(WouldBlock):
            fs.open_file(big, os.O_WRONLY)
        fs.setxattr(small, b"user.k", b"v")
    assert not lexists(env.u / "d/big")
    assert xattr(env.u / "d/small", b"user.k") == b"v"
    fs.release(fs.open_file(big, os.O_WRONLY))
    assert lexists(env.u / "d/big")


async def test_userxattr_mount_writes_user_overlay_records(env):
    mkfile(env.l1 / "d/f", b"x")
    mkfile(env.l1 / "w/x", b"x")
    fs = env.mount(userxattr=True)
    fs.setxattr(ino_of(fs, "d/f"), b"user.k", b"1")
    fs.unlink(ino_of(fs, "w"), b"x")
    fs.rmdir(ROOT_INO, b"w")
    fs.mkdir(ROOT_INO, b"w", 0o755, ALICE)
    assert os.getxattr(env.u / "d/f", b"user.overlay.origin") == origin_of(env.l1 / "d/f")
    assert os.getxattr(env.u / "d", b"user.overlay.origin") == origin_of(env.l1 / "d")
    assert os.getxattr(env.u / "d", b"user.overlay.impure") == b"y"
    assert os.getxattr(env.u / "w", b"user.overlay.opaque") == b"y"
    for dirpath, dirnames, filenames in os.walk(env.u):
        for n in [*dirnames, *filenames]:
            names = os.listxattr(os.path.join(dirpath, n), follow_symlinks=False)
            assert not [x for x in names if x.startswith("trusted.overlay.")], n
    assert sorted(fs.listxattr(ino_of(fs, "d/f"))) == [b"user.k"]


# -- unlink / rmdir -----------------------------------------------------------------------------------


@pytest.fixture
def removable(env):
    mkfile(env.l1 / "lowfile", b"l")
    mkfile(env.u / "upfile", b"u")
    mkfile(env.l2 / "both", b"2")
    mkfile(env.u / "both", b"u")
    mkdir(env.l1 / "lowdir")
    mkdir(env.u / "updir")
    mkdir(env.l2 / "bothdir")
    mkdir(env.u / "bothdir")
    return env


@pytest.mark.parametrize(
    "name, is_dir, leaves_whiteout",
    [
        ("lowfile", False, True),
        ("upfile", False, False),
        ("both", False, True),
        ("lowdir", True, True),
        ("updir", True, False),
        ("bothdir", True, True),
    ],
)
async def test_remove(removable, name, is_dir, leaves_whiteout):
    env = removable
    fs = env.mount()
    ino = ino_of(fs, name)
    (fs.rmdir if is_dir else fs.unlink)(ROOT_INO, name.encode())
    p = env.u / name
    if leaves_whiteout:
        assert is_whiteout(p)
    else:
        assert not lexists(p)
    assert not exists(fs, name)
    assert name.encode() not in listdir(fs)
    assert fs.inodes[ino].gone
    assert env.leftovers() == []
    # The name can be used again at once; a directory made there is opaque
    # (over a whiteout it must be; in the merged root the kernel marks it too).
    fs.mkdir(ROOT_INO, name.encode(), 0o755, ALICE)
    assert xattr(p, OPAQUE) == b"y"


async def test_remove_errors(removable):
    env = removable
    fs = env.mount()
    assert await err(lambda: fs.unlink(ROOT_INO, b"lowdir")) == errno.EISDIR
    assert await err(lambda: fs.unlink(ROOT_INO, b"updir")) == errno.EISDIR
    assert await err(lambda: fs.rmdir(ROOT_INO, b"lowfile")) == errno.ENOTDIR
    assert await err(lambda: fs.rmdir(ROOT_INO, b"upfile")) == errno.ENOTDIR
    assert await err(lambda: fs.unlink(ROOT_INO, b"missing")) == errno.ENOENT
    assert await err(lambda: fs.rmdir(ROOT_INO, b"missing")) == errno.ENOENT
    assert await err(lambda: fs.unlink(ino_of(fs, "upfile"), b"x")) == errno.ENOTDIR
    assert sorted(os.listdir(env.u)) == ["both", "bothdir", "updir", "upfile"]


@pytest.mark.parametrize("lower", ["whiteout", "opaque", "stale"])
async def test_rmdir_merged_dir_with_empty_view(env, lower):
    if lower == "whiteout":  # the lower's only entry is whited out in the upper
        mkfile(env.l1 / "e/gone", b"x")
        mkwhiteout(env.u / "e/gone")
    elif lower == "opaque":  # an opaque upper dir hides the lower's entries
        mkfile(env.l1 / "e/hidden", b"x")
        set_opaque(env.u / "e")
    else:  # an upper-only dir holding nothing but a stale whiteout
        mkwhiteout(env.u / "e/stale")
    fs = env.mount()
    assert listdir(fs, "e") == []
    fs.rmdir(ROOT_INO, b"e")
    if lower == "stale":
        assert not lexists(env.u / "e")
    else:
        assert is_whiteout(env.u / "e")
    assert not exists(fs, "e")
    assert env.leftovers() == []


@pytest.mark.parametrize("where", ["lower", "upper", "lower-under-upper"])
async def test_rmdir_not_empty(env, where):
    if where == "lower":
        mkfile(env.l2 / "e/x")
    elif where == "upper":
        mkfile(env.u / "e/x")
    else:
        mkdir(env.u / "e")
        mkfile(env.l1 / "e/x")
    fs = env.mount()
    assert await err(lambda: fs.rmdir(ROOT_INO, b"e")) == errno.ENOTEMPTY
    assert listdir(fs, "e") == [b"x"]
    assert where != "lower" or os.listdir(env.u) == []


async def test_rmdir_upper_dir_over_lower_whiteout_leaves_nothing(env):
    mkdir(env.u / "d")
    mkwhiteout(env.l1 / "d")
    mkfile(env.l2 / "d/x", b"x")
    fs = env.mount()
    fs.rmdir(ROOT_INO, b"d")
    assert not lexists(env.u / "d")  # the lower whiteout still hides l2's d
    assert not exists(fs, "d")


@pytest.mark.parametrize("where", ["lower", "upper"])
async def test_no_new_entries_in_removed_dir(env, where):
    mkdir((env.l1 if where == "lower" else env.u) / "d")
    fs = env.mount()
    d = ino_of(fs, "d")
    fs.rmdir(ROOT_INO, b"d")
    assert fs.inodes[d].gone
    assert errno_of(lambda: fs.mkdir(d, b"x", 0o755, ALICE)) == errno.ENOENT
    assert await err(lambda: fs.create(d, b"f", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)) == errno.ENOENT
    assert errno_of(lambda: fs.symlink(d, b"l", b"t", ALICE)) == errno.ENOENT
    assert not exists(fs, "d")
    assert os.listdir(env.u) == (["d"] if where == "lower" else [])
    assert where == "upper" or is_whiteout(env.u / "d")


async def test_link_of_unlinked_file_enoent(env):
    fs = env.mount()
    fh, node, _ = fs.create(ROOT_INO, b"t", 0o644, os.O_RDWR | os.O_CREAT, ALICE)
    fs.unlink(ROOT_INO, b"t")
    assert await err(lambda: fs.link(node.ino, ROOT_INO, b"t2")) == errno.ENOENT
    fs.release(fh)
    assert os.listdir(env.u) == []


async def test_unlink_one_of_two_upper_names(env):
    mkfile(env.u / "a", b"x")
    os.link(env.u / "a", env.u / "b")
    fs = env.mount()
    ino = ino_of(fs, "a")
    assert ino_of(fs, "b") == ino
    fs.unlink(ROOT_INO, b"a")
    assert not lexists(env.u / "a")
    assert not fs.inodes[ino].gone
    attr = fs.getattr(ino)
    assert attr.nlink == 1
    assert read_file(fs, ino) == b"x"


# -- rename ---------------------------------------------------------------------------------------------


async def test_rename_file_over_file_leaves_whiteout(env):
    mkfile(env.l1 / "a", b"A")
    mkfile(env.l1 / "b", b"B")
    fs = env.mount()
    a_ino, b_ino = ino_of(fs, "a"), ino_of(fs, "b")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert is_whiteout(env.u / "a")
    assert (env.u / "b").read_bytes() == b"A"
    assert xattr(env.u / "b", ORIGIN) == origin_of(env.l1 / "a")
    assert not exists(fs, "a")
    assert read_path(fs, "b") == b"A"
    assert lookup_path(fs, "b")[1].ino == a_ino
    assert fs.inodes[b_ino].gone
    assert fs.inodes[a_ino].path == b"b"
    assert listdir(fs) == [b"b"]
    assert env.leftovers() == []


@pytest.mark.parametrize("dst", ["none", "lower", "upper", "whiteout"])
async def test_rename_upper_only_file_leaves_nothing(env, dst):
    mkfile(env.u / "src", b"S")
    if dst == "lower":
        mkfile(env.l1 / "dst", b"D")
    elif dst == "upper":
        mkfile(env.u / "dst", b"D")
    elif dst == "whiteout":
        mkfile(env.l1 / "dst", b"D")
        mkwhiteout(env.u / "dst")
    fs = env.mount()
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0)
    assert sorted(os.listdir(env.u)) == ["dst"]
    assert (env.u / "dst").read_bytes() == b"S"
    assert read_path(fs, "dst") == b"S"
    assert not exists(fs, "src")
    assert env.leftovers() == []


async def test_rename_lower_file_over_upper_whiteout(env):
    mkfile(env.l1 / "a", b"A")
    mkfile(env.l1 / "w", b"W")
    mkwhiteout(env.u / "w")
    fs = env.mount()
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"w", 0)
    assert is_whiteout(env.u / "a")
    assert (env.u / "w").read_bytes() == b"A"
    assert listdir(fs) == [b"w"]
    assert env.leftovers() == []


async def test_rename_across_lower_dirs(env):
    mkfile(env.l1 / "x/f", b"F")
    mkfile(env.l2 / "y/g", b"G")
    fs = env.mount()
    ino = ino_of(fs, "x/f")
    fs.rename(ino_of(fs, "x"), b"f", ino_of(fs, "y"), b"f", 0)
    assert is_whiteout(env.u / "x/f")
    assert (env.u / "y/f").read_bytes() == b"F"
    assert listdir(fs, "x") == []
    assert listdir(fs, "y") == [b"f", b"g"]
    assert lookup_path(fs, "y/f")[1].ino == ino
    assert fs.inodes[ino].parent == ino_of(fs, "y")


async def test_rename_noreplace_eexist(env):
    mkfile(env.l1 / "a", b"A")
    mkfile(env.l1 / "b", b"B")
    mkfile(env.u / "c", b"C")
    fs = env.mount()
    for src, dst in ((b"a", b"b"), (b"c", b"a"), (b"a", b"c")):
        assert await err(lambda s=src, d=dst: fs.rename(ROOT_INO, s, ROOT_INO, d, RENAME_NOREPLACE)) == errno.EEXIST
    assert os.listdir(env.u) == ["c"]
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"new", RENAME_NOREPLACE)
    assert read_path(fs, "new") == b"A"


@pytest.mark.parametrize("kinds", ["lower-lower", "lower-upper", "upper-upper"])
async def test_rename_exchange_files(env, kinds):
    ka, kb = kinds.split("-")
    mkfile((env.l1 if ka == "lower" else env.u) / "a", b"A")
    mkfile((env.l2 if kb == "lower" else env.u) / "d/b", b"B")
    mkdir(env.l2 / "d")  # a merged dir (an upper-only one: see test_copy_keeps_ino_wherever_its_name_goes)
    fs = env.mount()
    a_ino, b_ino = ino_of(fs, "a"), ino_of(fs, "d/b")
    fs.rename(ROOT_INO, b"a", ino_of(fs, "d"), b"b", RENAME_EXCHANGE)
    assert read_path(fs, "a") == b"B"
    assert read_path(fs, "d/b") == b"A"
    assert ino_of(fs, "a") == b_ino and ino_of(fs, "d/b") == a_ino
    assert (env.u / "a").read_bytes() == b"B" and (env.u / "d/b").read_bytes() == b"A"
    assert fs.inodes[a_ino].path == b"d/b" and fs.inodes[b_ino].path == b"a"
    assert not fs.inodes[a_ino].gone and not fs.inodes[b_ino].gone
    assert env.leftovers() == []


async def test_rename_exchange_missing_target_enoent(env):
    mkfile(env.l1 / "a", b"A")
    fs = env.mount()
    assert await err(lambda: fs.rename(ROOT_INO, b"a", ROOT_INO, b"zz", RENAME_EXCHANGE)) == errno.ENOENT
    assert await err(lambda: fs.rename(ROOT_INO, b"zz", ROOT_INO, b"a", 0)) == errno.ENOENT
    assert os.listdir(env.u) == []


@pytest.mark.parametrize("src", ["lowerdir", "mergeddir"])
async def test_rename_dir_with_lower_parts_exdev(env, src):
    mkfile(env.l1 / "lowerdir/x")
    mkfile(env.l1 / "mergeddir/x")
    mkdir(env.u / "mergeddir")
    fs = env.mount()
    assert await err(lambda: fs.rename(ROOT_INO, src.encode(), ROOT_INO, b"moved", 0)) == errno.EXDEV
    assert await err(lambda: fs.rename(ROOT_INO, src.encode(), ROOT_INO, b"moved", RENAME_NOREPLACE)) == errno.EXDEV
    assert listdir(fs, src) == [b"x"]
    assert not exists(fs, "moved")


@pytest.mark.parametrize("dst", ["merged/ud", "loweronly/ud", "ud2", "upperonly/ud", "whited", "emptymerged"])
async def test_rename_upper_only_dir_opaque_in_merged_parent(env, dst):
    mkfile(env.u / "ud/inner", b"i")
    mkfile(env.l1 / "whited/old", b"o")  # hidden by an upper whiteout
    mkwhiteout(env.u / "whited")
    mkfile(env.l1 / "emptymerged/old", b"o")  # a merged dir whose view is empty
    mkwhiteout(env.u / "emptymerged/old")
    mkfile(env.l1 / "merged/m", b"m")
    mkdir(env.u / "merged")
    mkfile(env.l2 / "loweronly/l", b"l")
    mkdir(env.u / "upperonly")
    fs = env.mount()
    ud = ino_of(fs, "ud")
    inner = ino_of(fs, "ud/inner")
    pino, name = at(fs, dst)
    fs.rename(ROOT_INO, b"ud", pino, name, 0)
    p = env.u / dst
    assert (p / "inner").read_bytes() == b"i"
    assert sorted(os.listdir(p)) == ["inner"]
    assert not lexists(env.u / "ud")  # no lower had "ud": nothing left behind
    assert xattr(p, OPAQUE) == (None if dst.startswith("upperonly") else b"y")
    assert listdir(fs, dst) == [b"inner"]
    assert lookup_path(fs, dst)[1].ino == ud
    assert fs.lookup(ud, b"..")[1].ino == pino
    assert fs.lookup(ud, b"inner")[0].ino == inner
    assert read_file(fs, inner) == b"i"


@pytest.mark.parametrize("src", ["updir", "merged"])
async def test_rename_dir_into_own_subdir_einval(env, src):
    mkdir(env.u / "updir/sub")
    mkdir(env.l1 / "merged/sub")
    mkdir(env.u / "merged/sub")
    fs = env.mount()
    sub = ino_of(fs, f"{src}/sub")
    assert await err(lambda: fs.rename(ROOT_INO, src.encode(), sub, b"x", 0)) == errno.EINVAL
    assert exists(fs, f"{src}/sub")


async def test_rename_kind_mismatch(env):
    mkfile(env.u / "f", b"f")
    mkdir(env.u / "d")
    mkfile(env.u / "full/x")
    mkdir(env.u / "e")
    fs = env.mount()
    assert await err(lambda: fs.rename(ROOT_INO, b"f", ROOT_INO, b"d", 0)) == errno.EISDIR
    assert await err(lambda: fs.rename(ROOT_INO, b"d", ROOT_INO, b"f", 0)) == errno.ENOTDIR
    assert await err(lambda: fs.rename(ROOT_INO, b"e", ROOT_INO, b"full", 0)) == errno.ENOTEMPTY
    fs.rename(ROOT_INO, b"e", ROOT_INO, b"d", 0)  # over an empty dir
    assert sorted(os.listdir(env.u)) == ["d", "f", "full"]


async def test_rename_over_full_upper_dir_in_merged_parent(env):
    """The kernel's order: a directory moving in a merged parent is marked
    opaque first, and an upper-only target's emptiness is rename(2)'s to
    check, so the failed rename leaves the marker (checked on 6.18)."""
    mkfile(env.l1 / "m/x")
    mkdir(env.u / "m/src")
    mkfile(env.u / "m/full/y")
    fs = env.mount()
    m = ino_of(fs, "m")
    assert await err(lambda: fs.rename(m, b"src", m, b"full", 0)) == errno.ENOTEMPTY
    assert xattr(env.u / "m/src", OPAQUE) == b"y"
    assert sorted(os.listdir(env.u / "m/full")) == ["y"]
    assert sorted(listdir(fs, "m")) == [b"full", b"src", b"x"]


async def test_rename_hard_links_of_one_file_noop(env):
    mkfile(env.u / "a", b"x")
    os.link(env.u / "a", env.u / "b")
    fs = env.mount()
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert sorted(os.listdir(env.u)) == ["a", "b"]
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"a", 0)
    assert sorted(os.listdir(env.u)) == ["a", "b"]


async def test_open_nodes_follow_dir_rename(env):
    mkfile(env.u / "d/sub/f", b"data")
    mkdir(env.u / "other")
    fs = env.mount()
    d, sub, f = ino_of(fs, "d"), ino_of(fs, "d/sub"), ino_of(fs, "d/sub/f")
    handle = fs.opendir(sub)
    fs.rename(ROOT_INO, b"d", ino_of(fs, "other"), b"e", 0)
    assert fs.inodes[f].path == b"other/e/sub/f"
    assert fs.lookup(d, b"sub")[0].ino == sub
    assert fs.lookup(sub, b"f")[0].ino == f
    assert fs.getattr(f).ino == f
    assert read_file(fs, f) == b"data"
    write_at(fs, f, b"DATA")
    assert (env.u / "other/e/sub/f").read_bytes() == b"DATA"
    assert [n for _, n, _, _ in fs.readdir(handle, 0)] == [b".", b"..", b"f"]
    fs.releasedir(handle)
    touch(fs, "other/e/sub/g")  # by path, and by the old nodes:
    fs.mkdir(sub, b"h", 0o755, ALICE)
    assert sorted(os.listdir(env.u / "other/e/sub")) == ["f", "g", "h"]


async def test_open_node_follows_file_rename(env):
    mkfile(env.l1 / "p/f", b"lower")
    fs = env.mount()
    p, f = ino_of(fs, "p"), ino_of(fs, "p/f")
    fs.rename(p, b"f", p, b"g", 0)
    assert fs.getattr(f).ino == f
    write_at(fs, f, b"LOWER")
    assert (env.u / "p/g").read_bytes() == b"LOWER"
    fs.setattr(f, SetAttr(mode=0o600), None)
    assert stat.S_IMODE(os.lstat(env.u / "p/g").st_mode) == 0o600
    assert is_whiteout(env.u / "p/f")
    assert fs.lookup(p, b"g")[0].ino == f


# -- links -------------------------------------------------------------------------------------------


async def test_link_to_lower_file(env):
    f = mkfile(env.l1 / "d/f", b"data")
    fs = env.mount()
    ino = ino_of(fs, "d/f")
    node, attr = fs.link(ino, ROOT_INO, b"g")
    assert node.ino == attr.ino == ino == os.lstat(f).st_ino
    assert attr.nlink == 2
    assert samefile(env.u / "d/f", env.u / "g")
    assert os.lstat(env.u / "g").st_nlink == 2
    assert xattr(env.u / "d/f", ORIGIN) == origin_of(f)
    _, g = lookup_path(fs, "g")
    _, df = lookup_path(fs, "d/f")
    assert g.ino == df.ino == ino and g.nlink == df.nlink == 2
    write_at(fs, ino_of(fs, "g"), b"DATA")
    assert read_path(fs, "d/f") == b"DATA"
    assert f.read_bytes() == b"data"


async def test_link_errors(env):
    mkfile(env.l1 / "f", b"x")
    mkfile(env.l1 / "g", b"y")
    mkdir(env.l1 / "d")
    fs = env.mount()
    f = ino_of(fs, "f")
    assert await err(lambda: fs.link(f, ROOT_INO, b"g")) == errno.EEXIST
    assert await err(lambda: fs.link(ino_of(fs, "d"), ROOT_INO, b"d2")) == errno.EPERM
    assert await err(lambda: fs.link(f, f, b"x")) == errno.ENOTDIR
    assert os.listdir(env.u) == []


async def test_link_over_whiteout(env):
    mkfile(env.u / "f", b"x")
    mkfile(env.l1 / "w", b"old")
    mkwhiteout(env.u / "w")
    fs = env.mount()
    fs.link(ino_of(fs, "f"), ROOT_INO, b"w")
    assert samefile(env.u / "f", env.u / "w")
    assert read_path(fs, "w") == b"x"
    assert env.leftovers() == []


@pytest.fixture
def hardlinked(env):
    """A lower file with two names (h1 and sub/h2) of one inode."""
    h1 = mkfile(env.l1 / "h1", b"original")
    mkdir(env.l1 / "sub")
    os.link(h1, env.l1 / "sub/h2")
    return h1


@pytest.mark.parametrize("seen_first", ["both", "h1"])
async def test_lower_hardlink_copied_up_once_via_index(env, hardlinked, seen_first):
    fs = env.mount()
    lower = os.lstat(hardlinked)
    h1, a1 = lookup_path(fs, "h1")
    if seen_first == "both":
        h2, a2 = lookup_path(fs, "sub/h2")
        assert h1 == h2 and a1.nlink == a2.nlink == 2
    write_at(fs, h1, b"CHANGED")
    _, a2 = lookup_path(fs, "sub/h2")
    a1 = fs.getattr(h1)
    assert a1.ino == a2.ino == h1 == lower.st_ino
    assert a1.nlink == a2.nlink == 2
    assert read_path(fs, "sub/h2") == b"CHANGEDl"
    assert read_path(fs, "h1") == b"CHANGEDl"
    # The one copy lives in the index, named after the origin record.
    key = origin.index_name(origin_of(hardlinked)).decode()
    assert origin.index_name(origin_of(env.l1 / "sub/h2")).decode() == key
    assert os.listdir(env.w / "index") == [key]
    idx = env.w / "index" / key
    # FUSE names the file written by inode only: the name linked to the copy
    # is the one the node was last looked up by (the kernel links the name
    # the caller used); lookups of the other name link nothing.
    linked = [n for n in ("h1", "sub/h2") if (env.u / n).exists() and samefile(idx, env.u / n)]
    assert linked == (["sub/h2"] if seen_first == "both" else ["h1"])
    assert xattr(idx, ORIGIN) == origin_of(hardlinked)
    # Writing through the other name changes the same file.
    write_at(fs, ino_of(fs, "sub/h2"), b"AGAIN")
    assert read_path(fs, "h1") == b"AGAINEDl"
    assert hardlinked.read_bytes() == b"original"
    assert env.leftovers() == []


@pytest.mark.parametrize("first", ["h1", "sub/h2"])
async def test_lower_hardlink_after_remount(env, hardlinked, first):
    fs = env.mount()
    write_at(fs, ino_of(fs, "h1"), b"CHANGED")
    fs.close()
    again = env.mount()
    second = "sub/h2" if first == "h1" else "h1"
    i1, a1 = lookup_path(again, first)
    i2, a2 = lookup_path(again, second)
    assert i1 == i2 == a1.ino == a2.ino == os.lstat(hardlinked).st_ino
    assert a1.nlink == a2.nlink == 2
    assert read_path(again, first) == read_path(again, second) == b"CHANGEDl"


async def test_unlink_one_name_of_lower_hardlink(env, hardlinked):
    fs = env.mount()
    ino = ino_of(fs, "h1")
    write_at(fs, ino, b"CHANGED")
    fs.unlink(ROOT_INO, b"h1")
    assert is_whiteout(env.u / "h1")
    i2, a2 = lookup_path(fs, "sub/h2")
    assert i2 == ino and a2.nlink == 1
    assert read_path(fs, "sub/h2") == b"CHANGEDl"


@pytest.mark.parametrize("seen_h2", [False, True])
async def test_link_to_lower_hardlink(env, hardlinked, seen_h2):
    fs = env.mount()
    h1 = ino_of(fs, "h1")
    if seen_h2:
        ino_of(fs, "sub/h2")
    node, attr = fs.link(h1, ROOT_INO, b"h3")
    assert node.ino == attr.ino == h1 and attr.nlink == 3
    write_at(fs, ino_of(fs, "h3"), b"THREE")
    for name in ("h1", "sub/h2", "h3"):
        ino, a = lookup_path(fs, name)
        assert (ino, a.nlink) == (h1, 3), name
        assert read_path(fs, name) == b"THREEnal"
    again = env.mount()
    for name in ("sub/h2", "h3", "h1"):
        assert lookup_path(again, name)[1].nlink == 3, name


async def test_unlink_never_copied_lower_hardlink_drops_nlink(env, hardlinked):
    """As overlayfs with index=on: the name is copied up to the index first, so
    the merged link count can drop."""
    fs = env.mount()
    fs.unlink(ROOT_INO, b"h1")
    assert is_whiteout(env.u / "h1")
    assert lookup_path(fs, "sub/h2")[1].nlink == 1


@pytest.mark.parametrize(
    "case, remount",
    [
        ("rename", False),
        ("rename", True),
        ("rename-into-lower-dir", False),
        ("rename-into-lower-dir", True),
        ("rename-into-upper-only-dir", False),
        ("rename-into-upper-only-dir", True),
        ("exchange-into-upper-only-dir", False),
        ("link", False),
        ("link", True),
        ("copied-in-place", True),
    ],
)
async def test_copy_keeps_ino_wherever_its_name_goes(env, case, remount):
    f = mkfile(env.l1 / "f", b"F")
    mkfile(env.u / "up/other", b"O")
    mkfile(env.l2 / "low/other", b"O")
    fs = env.mount()
    ino = ino_of(fs, "f")
    assert ino == os.lstat(f).st_ino
    new = {
        "rename": "g",
        "rename-into-lower-dir": "low/g",
        "rename-into-upper-only-dir": "up/g",
        "exchange-into-upper-only-dir": "up/other",
        "link": "g",
        "copied-in-place": "f",
    }[case]
    pino, name = at(fs, new)
    if case == "link":
        fs.link(ino, pino, name)
    elif case == "copied-in-place":
        fs.setxattr(ino, b"user.x", b"1")
    else:
        fs.rename(ROOT_INO, b"f", pino, name, RENAME_EXCHANGE if case.startswith("exchange") else 0)
    assert xattr(env.u / new, ORIGIN) == origin_of(f)
    view = env.mount() if remount else fs
    assert lookup_path(view, new)[1].ino == ino
    assert read_path(view, new) == b"F"


async def test_rename_never_copied_lower_hardlink(env, hardlinked):
    fs = env.mount()
    ino = ino_of(fs, "h1")
    fs.rename(ROOT_INO, b"h1", ino_of(fs, "sub"), b"h9", 0)
    assert is_whiteout(env.u / "h1")
    for name in ("sub/h9", "sub/h2"):
        i, a = lookup_path(fs, name)
        assert (i, a.nlink) == (ino, 2), name
    write_at(fs, ino_of(fs, "sub/h9"), b"NINE")
    assert read_path(fs, "sub/h2") == b"NINEinal"


# -- open directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        "create",
        "unlink",
        "create-merged",
        "unlink-merged",
    ],
)
async def test_open_dir_rewind_sees_changes(env, change):
    mkfile(env.l1 / "d/old", b"o")
    if change.endswith("merged"):
        mkdir(env.u / "d")
    fs = env.mount()
    d = ino_of(fs, "d")
    handle = fs.opendir(d)
    assert [n for _, n, _, _ in fs.readdir(handle, 0)] == [b".", b"..", b"old"]
    if change.startswith("create"):
        touch(fs, "d/new")
        want = [b".", b"..", b"new", b"old"]
    else:
        fs.unlink(d, b"old")
        want = [b".", b".."]
    assert sorted(n for _, n, _, _ in fs.readdir(handle, 0)) == want
    fs.releasedir(handle)
    assert listdir(fs, "d") == want[2:]


# -- open, then unlinked ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["new", "lower"])
async def test_open_unlinked_file_still_works(env, where):
    if where == "lower":
        mkfile(env.l1 / "t", b"lower")
        fs = env.mount()
        ino = ino_of(fs, "t")
        fh = fs.open_file(ino, os.O_RDWR)
    else:
        fs = env.mount()
        fh, node, _ = fs.create(ROOT_INO, b"t", 0o644, os.O_RDWR | os.O_CREAT, ALICE)
        ino = node.ino
    fs.unlink(ROOT_INO, b"t")
    assert not exists(fs, "t")
    assert lexists(env.u / "t") == (where == "lower")
    attr = fs.getattr(ino)
    assert attr.ino == ino and attr.nlink == 0
    assert fs.write(fh, 0, b"still here") == 10
    assert fs.read(fh, 0, 100) == b"still here"
    assert fs.getattr(ino).size == 10
    attr = fs.setattr(ino, SetAttr(size=5), fh)
    assert attr.size == 5 and attr.nlink == 0
    fs.release(fh)
    # The kernel still holds the node: it keeps answering (from the pin),
    # and the number is not handed to a new file meanwhile.
    assert fs.getattr(ino).nlink == 0
    _, node, _ = fs.create(ROOT_INO, b"n", 0o644, os.O_RDWR | os.O_CREAT, ALICE)
    assert node.ino != ino
    fs.forget(ino, fs.inodes[ino].lookups)
    assert await err(lambda: fs.getattr(ino)) == errno.ESTALE


async def test_open_hard_link_counts_down_to_zero(env):
    """An open, copied-up lower hard link keeps its index name when its merged
    names go; fstat counts only the merged names, down to 0 (as the kernel)."""
    mkfile(env.l1 / "f", b"lower")
    os.link(env.l1 / "f", env.l1 / "g")
    fs = env.mount()
    ino = ino_of(fs, "f")
    fh = fs.open_file(ino, os.O_RDWR)
    assert fs.getattr(ino).nlink == 2
    fs.unlink(ROOT_INO, b"f")
    assert fs.getattr(ino).nlink == 1
    fs.unlink(ROOT_INO, b"g")
    assert fs.getattr(ino).nlink == 0
    assert fs.write(fh, 0, b"still") == 5
    fs.release(fh)


async def test_removed_copy_leaves_no_origin_behind(env):
    """The origin learnt for an upper copy is keyed by its inode number, which
    the upper's filesystem hands out again once the copy is gone: a new file
    with that number must not take the old file's identity."""
    mkfile(env.l1 / "f", b"lower")
    fs = env.mount()
    ino = ino_of(fs, "f")
    fs.setattr(ino, SetAttr(mode=0o600), None)
    st = os.lstat(env.u / "f")
    assert fs.resolver.origins.get((st.st_dev, st.st_ino)) is not None
    fs.unlink(ROOT_INO, b"f")
    assert (st.st_dev, st.st_ino) not in fs.resolver.origins


@pytest.mark.parametrize("how", ["open-write", "setattr", "setxattr"])
async def test_unlinked_lower_file_not_resurrected(env, how):
    """A request on a lower file whose only name was unlinked must not copy it
    up over the new whiteout and bring the name back (overlayfs: EEXIST)."""
    mkfile(env.l1 / "f", b"lower")
    fs = env.mount()
    ino = ino_of(fs, "f")
    fh = fs.open_file(ino, os.O_RDONLY)
    fs.unlink(ROOT_INO, b"f")
    calls = {
        "open-write": lambda: fs.open_file(ino, os.O_WRONLY),
        "setattr": lambda: fs.setattr(ino, SetAttr(mode=0o600), fh),
        "setxattr": lambda: fs.setxattr(ino, b"user.x", b"1"),
    }
    try:
        assert await err(calls[how]) == errno.EEXIST
        assert not exists(fs, "f")
        assert listdir(fs) == []
        assert is_whiteout(env.u / "f")
    finally:
        fs.release(fh)


async def test_open_read_only_lower_file_then_unlinked(env):
    """Never copied up: the handle reads the lower file, whose stat the kernel
    keeps showing (st_nlink 1, the real file's) after the unlink."""
    mkfile(env.l1 / "t", b"lower")
    fs = env.mount()
    ino = ino_of(fs, "t")
    fh = fs.open_file(ino, os.O_RDONLY)
    fs.unlink(ROOT_INO, b"t")
    assert is_whiteout(env.u / "t")
    attr = fs.getattr(ino)
    assert attr.ino == ino and attr.nlink == 1 and attr.size == 5
    assert fs.read(fh, 0, 100) == b"lower"
    fs.release(fh)


# -- read-only mounts -------------------------------------------------------------------------------


def _ro_calls(fs: WritableUnionFS) -> dict[str, Callable[[], object]]:
    f, d = ino_of(fs, "f"), ino_of(fs, "d")
    return {
        "create": lambda: fs.create(ROOT_INO, b"n", 0o644, os.O_WRONLY | os.O_CREAT, ALICE),
        "create-existing": lambda: fs.create(ROOT_INO, b"f", 0o644, os.O_WRONLY | os.O_CREAT, ALICE),
        "mkdir": lambda: fs.mkdir(ROOT_INO, b"n", 0o755, ALICE),
        "mknod": lambda: fs.mknod(ROOT_INO, b"n", stat.S_IFIFO | 0o644, 0, ALICE),
        "symlink": lambda: fs.symlink(ROOT_INO, b"n", b"t", ALICE),
        "link": lambda: fs.link(f, ROOT_INO, b"n"),
        "unlink": lambda: fs.unlink(ROOT_INO, b"f"),
        "rmdir": lambda: fs.rmdir(ROOT_INO, b"d"),
        "rename": lambda: fs.rename(ROOT_INO, b"f", ROOT_INO, b"n", 0),
        "rename-exchange": lambda: fs.rename(ROOT_INO, b"f", ROOT_INO, b"d", RENAME_EXCHANGE),
        "open-write": lambda: fs.open_file(f, os.O_WRONLY),
        "open-rdwr": lambda: fs.open_file(f, os.O_RDWR),
        "open-trunc": lambda: fs.open_file(f, os.O_RDONLY | os.O_TRUNC),
        "setattr": lambda: fs.setattr(f, SetAttr(mode=0o600), None),
        "setattr-dir": lambda: fs.setattr(d, SetAttr(mtime_ns=5), None),
        "setxattr": lambda: fs.setxattr(f, b"user.x", b"1"),
        "removexattr": lambda: fs.removexattr(f, b"user.here"),
        "access": lambda: fs.access(f, os.W_OK),
    }


RO_OPS = sorted(
    [
        "create", "create-existing", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename",
        "rename-exchange", "open-write", "open-rdwr", "open-trunc", "setattr", "setattr-dir", "setxattr",
        "removexattr", "access",
    ]
)


@pytest.mark.parametrize("where, upper", [("lower", "upper"), ("upper", "upper"), ("lower", "no-upper")])
@pytest.mark.parametrize("op", RO_OPS)
async def test_readonly_erofs(env, op, where, upper):
    top = env.l1 if where == "lower" else env.u
    f = mkfile(top / "f", b"x")
    os.setxattr(f, b"user.here", b"h")
    mkdir(top / "d")
    before = snapshot(env.u)
    fs = env.mount(readonly=True, upper=upper == "upper")
    assert await err(_ro_calls(fs)[op]) == errno.EROFS
    assert snapshot(env.u) == before
    assert not lexists(env.w / "work")
    assert read_path(fs, "f") == b"x"
    assert fs.listxattr(ino_of(fs, "f")) == [b"user.here"]


def test_readonly_reads_still_work(env):
    mkfile(env.u / "f", b"up")
    mkfile(env.l1 / "g", b"low")
    fs = env.mount(readonly=True)
    assert listdir(fs) == [b"f", b"g"]
    fh = fs.open(ino_of(fs, "f"), os.O_RDONLY)
    assert fs.read(fh, 0, 10) == b"up"
    fs.release(fh)


def test_whiteout_in_a_set_group_id_directory_is_roots(env):
    """The kernel builds whiteouts in the work dir (root:root) and renames them
    in; made in place, a set-group-ID directory would give it its group."""
    mkfile(env.l1 / "d/f", b"x")
    fs = env.mount()
    d = ino_of(fs, "d")
    fs.setattr(d, SetAttr(uid=1000, gid=1000), None)
    fs.setattr(d, SetAttr(mode=0o2775), None)
    fs.unlink(d, b"f")
    st = os.lstat(env.u / "d/f")
    assert is_whiteout(env.u / "d/f") and (st.st_uid, st.st_gid) == (0, 0)
    assert env.leftovers() == []
