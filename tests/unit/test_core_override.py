"""Owner/mode records of fuse-overlayfs's ``xattr_permissions=`` (pyunionfs/fs/override.py), without FUSE.

The values and answers here are fuse-overlayfs 1.10's (``override_mode``
reads with ``sscanf("%d:%d:%o")``, ``write_permission_xattr`` writes with
``"%d:%d:%o"``); tests/mount/test_idmap.py compares whole mounts with it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.errors import MountError
from pyunionfs.fs import override
from pyunionfs.fs.override import CONTAINERS, PRIVILEGED, USER, Record, format_record, parse
from pyunionfs.fs.writes import Caller, SetAttr, WritableUnionFS

from .conftest import b, errno_of, lookup_path, mkdir, mkfile

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: security.* xattrs, chown")


@pytest.mark.parametrize("value, record", [
    (b"1000:1000:0644", Record(1000, 1000, 0o644)),
    (b"0:0:40755", Record(0, 0, 0o40755)),  # the type may be part of it (the upper root's, at mount)
    (b"5:6:100711", Record(5, 6, 0o100711)),
    (b" 12: +13:0644junk", Record(12, 13, 0o644)),  # sscanf: blanks, signs, anything after
    (b"-1:1247:100644", Record(0xFFFFFFFF, 1247, 0o100644)),  # chown of the owner only writes the group as -1
    (b"1:2:3\0ignored", Record(1, 2, 3)),
    (b"1:2:9", None), (b"1:2", None), (b"garbage", None), (b"", None), (b"1:2:-", None),
])
def test_records_parse_as_fuse_overlayfs_scans_them(value: bytes, record: Record | None) -> None:
    if record is None:
        assert errno_of(lambda: parse(value)) == errno.EINVAL
    else:
        assert parse(value) == record


def test_a_record_longer_than_fuse_overlayfs_reads_is_erange() -> None:
    assert errno_of(lambda: parse(b"1:2:0" + b"1" * 70)) == errno.ERANGE


def test_records_are_written_as_c_prints_them() -> None:
    assert format_record(1000, 100, 0o100644) == b"1000:100:100644"
    assert format_record(0xFFFFFFFF, -1, 0o755) == b"-1:-1:755"
    assert parse(format_record(0xFFFFFFFE, 7, 0o4755)) == Record(0xFFFFFFFE, 7, 0o4755)


def test_the_record_mode_is_or_ed_into_the_real_type() -> None:
    assert override.apply(stat.S_IFREG | 0o644, Record(0, 0, 0o600)) == stat.S_IFREG | 0o600
    assert override.apply(stat.S_IFDIR | 0o755, Record(0, 0, 0o40700)) == stat.S_IFDIR | 0o700


def test_the_option_costs_nothing_where_no_layer_has_records(tmp_path: Path) -> None:
    fd = os.open(mkdir(tmp_path / "l"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert override.overrides(0, [fd], writable=False) is None
        os.setxattr(tmp_path / "l", CONTAINERS, b"0:0:755")
        over = override.overrides(0, [fd], writable=False)
        assert over is not None and over.names == (CONTAINERS,) and over.written is None
    finally:
        os.close(fd)


def test_an_upper_that_cannot_hold_the_record_is_one_line_mount_error() -> None:
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)  # no xattrs at all
    try:
        with pytest.raises(MountError, match=r"^xattr_permissions: the upper's root cannot hold "
                                             r"user.fuseoverlayfs.override_stat: "):
            override.overrides(2, [fd], writable=True)
    finally:
        os.close(fd)


# -- a whole union, driven directly -----------------------------------------------------------------

MakeFS = Callable[..., WritableUnionFS]


@pytest.fixture
def make_wfs(tmp_path: Path) -> Iterator[MakeFS]:
    made: list[WritableUnionFS] = []

    def make(lower: Path, upper: Path, **kw: object) -> WritableUnionFS:
        work = mkdir(tmp_path / "work")
        fs = WritableUnionFS(MountConfig(lowers=(b(lower),), upper=b(upper), workdir=b(work),
                                         mountpoint=b(tmp_path / "mnt"), **kw))  # type: ignore[arg-type]
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


@needs_root
@pytest.mark.parametrize("option, name", [(1, PRIVILEGED), (2, USER)])
def test_chown_chmod_and_new_files_go_to_the_record(tmp_path: Path, make_wfs: MakeFS, option: int,
                                                    name: bytes) -> None:
    lower, upper = mkdir(tmp_path / "lower"), mkdir(tmp_path / "upper")
    mkfile(lower / "f", b"x", mode=0o644)
    fs = make_wfs(lower, upper, xattr_permissions=option)
    assert os.getxattr(upper, name) == b"0:0:%o" % os.stat(upper).st_mode  # the root's, at mount
    ino, attr = lookup_path(fs, "f")
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (0, 0, 0o644)
    attr = fs.setattr(ino, SetAttr(uid=1234, gid=5678), None)
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (1234, 5678, 0o644)
    assert os.getxattr(upper / "f", name) == b"1234:5678:100644"
    st = os.lstat(upper / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)  # the daemon's, 0755 added
    attr = fs.setattr(ino, SetAttr(mode=stat.S_IFREG | 0o600), None)
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (1234, 5678, 0o600)  # (the owner kept: see override.py)
    attr = fs.setattr(ino, SetAttr(gid=9), None)
    assert os.getxattr(upper / "f", name) == b"-1:9:100600"  # the owner not given: -1, as fuse-overlayfs
    _, attr = fs.mkdir(1, b"d", 0o700, Caller(42, 43, umask=0o022))
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (42, 43, 0o755)  # 0755 added to what is asked
    assert os.getxattr(upper / "d", name) == b"42:43:755"
    fd, node, attr = fs.tmpfile(1, 0o600, os.O_RDWR, Caller(3, 4))  # (fuse-overlayfs has no O_TMPFILE: as a create)
    assert (attr.uid, attr.gid, oct(attr.mode)) == (3, 4, oct(0o100755))
    assert os.getxattr(f"/proc/self/fd/{fd}", name) == b"3:4:100755"
    fs.release(fd)
    assert fs.listxattr(ino) == ([name] if name == PRIVILEGED else [])  # user.fuseoverlayfs.* is hidden
    assert errno_of(lambda: fs.setxattr(ino, CONTAINERS, b"1:1:777")) == errno.EPERM


@needs_root
def test_a_layer_with_a_root_record_shows_its_files_from_theirs(tmp_path: Path, make_wfs: MakeFS) -> None:
    lower, upper = mkdir(tmp_path / "lower"), mkdir(tmp_path / "upper")
    os.setxattr(lower, CONTAINERS, b"0:0:755")
    mkfile(lower / "rec", b"x", mode=0o644)
    os.setxattr(lower / "rec", CONTAINERS, b"7:8:0600")
    mkfile(lower / "none", b"x", mode=0o644)
    mkfile(lower / "bad", b"x", mode=0o644)
    os.setxattr(lower / "bad", CONTAINERS, b"7:8")
    fs = make_wfs(lower, upper)  # xattr_permissions=0: the lower's records count all the same
    ino, attr = lookup_path(fs, "rec")
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (7, 8, 0o600)
    _, attr = lookup_path(fs, "none")
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (0, 0, 0o644)  # no record: as stored
    assert errno_of(lambda: lookup_path(fs, "bad")) == errno.EINVAL  # as fuse-overlayfs answers
    fs.setattr(ino, SetAttr(atime_ns=0, mtime_ns=0), None)  # copy-up: the copy is owned as it showed
    st = os.lstat(upper / "rec")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 8, 0o600)
