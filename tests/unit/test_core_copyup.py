"""Copy-up builds a complete copy in the work dir and renames it into place."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from pyunionfs.fs.copyup import TMP_PREFIX, clean_workdir, copy_up

# struct vfs_cap_data, revision 2: CAP_NET_BIND_SERVICE (10) permitted, effective flag set.
CAPABILITY = struct.pack("<IIIII", 0x02000000 | 1, 1 << 10, 0, 0, 0)


@pytest.fixture
def dirs(tmp_path: Path):
    low, up, work = (tmp_path / n for n in ("low", "up", "work"))
    for d in (low, up, work):
        d.mkdir()
    fds = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in (low, up, work)]
    yield low, up, work, fds
    for fd in fds:
        os.close(fd)


def keep_all(name: bytes) -> bool:
    return not name.startswith((b"trusted.overlay.", b"user.overlay."))


def test_regular_file_keeps_data_holes_and_metadata(dirs) -> None:
    low, up, work, (lfd, ufd, wfd) = dirs
    f = low / "f"
    with open(f, "wb") as out:
        out.write(b"head")
        out.seek(64 << 20)
        out.write(b"tail")
        out.truncate(100 << 20)  # a trailing hole too
    os.chown(f, 1234, 4321)
    os.chmod(f, 0o4755)
    os.setxattr(f, b"user.color", b"blue")
    os.setxattr(f, b"security.capability", CAPABILITY)
    os.setxattr(f, b"trusted.overlay.origin", b"private")
    os.utime(f, ns=(1_111_111_111_123, 2_222_222_222_456))
    before = os.lstat(f)
    st = copy_up(lfd, b"f", wfd, ufd, keep_all)
    g = up / "f"
    assert st.st_ino == os.lstat(g).st_ino
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o4755)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (1_111_111_111_123, 2_222_222_222_456, 100 << 20)
    assert st.st_blocks * 512 < 1 << 20, "holes were filled in"
    with open(g, "rb") as data:
        assert data.read(4) == b"head"
        data.seek(64 << 20)
        assert data.read(4) == b"tail"
    assert os.getxattr(g, b"user.color") == b"blue"
    assert os.getxattr(g, b"security.capability") == CAPABILITY
    assert b"trusted.overlay.origin" not in [os.fsencode(n) for n in os.listxattr(g)]
    assert os.listdir(work) == []
    after = os.lstat(f)
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ctime_ns,
                                                                     before.st_ino)


def test_symlink_fifo_device_and_directory(dirs) -> None:
    low, up, work, (lfd, ufd, wfd) = dirs
    os.symlink("/etc/passwd", low / "link")
    os.lchown(low / "link", 7, 8)
    os.mkfifo(low / "fifo", 0o640)
    os.mknod(low / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (low / "d").mkdir(mode=0o1750)
    (low / "d/inner").write_text("stays below")
    os.chmod(low / "d", 0o1750)
    os.setxattr(low / "d", b"user.tag", b"t")
    for name in (b"link", b"fifo", b"null", b"d"):
        copy_up(lfd, name, wfd, ufd, keep_all)
    assert os.readlink(up / "link") == "/etc/passwd"
    assert (os.lstat(up / "link").st_uid, os.lstat(up / "link").st_gid) == (7, 8)
    assert stat.S_ISFIFO(os.lstat(up / "fifo").st_mode) and stat.S_IMODE(os.lstat(up / "fifo").st_mode) == 0o640
    assert os.lstat(up / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(os.lstat(up / "d").st_mode) == 0o1750
    assert os.listdir(up / "d") == [], "a directory is copied up empty"
    assert os.getxattr(up / "d", b"user.tag") == b"t"
    assert os.listdir(work) == []


def test_replaces_a_whiteout_atomically(dirs) -> None:
    low, up, work, (lfd, ufd, wfd) = dirs
    (low / "f").write_text("lower")
    os.mknod(up / "f", stat.S_IFCHR, os.makedev(0, 0))
    copy_up(lfd, b"f", wfd, ufd, keep_all)
    assert (up / "f").read_text() == "lower"


def test_a_failed_copy_leaves_nothing(dirs) -> None:
    low, up, work, (lfd, ufd, wfd) = dirs
    (low / "f").write_bytes(os.urandom(100_000))
    os.setxattr(low / "f", b"user.x", b"1")

    def explode(name: bytes) -> bool:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        copy_up(lfd, b"f", wfd, ufd, explode)
    assert os.listdir(up) == [] and os.listdir(work) == []
    with pytest.raises(FileNotFoundError):
        copy_up(lfd, b"missing", wfd, ufd, keep_all)


def test_clean_workdir_removes_leftovers_only(dirs) -> None:
    low, up, work, _ = dirs
    (work / os.fsdecode(TMP_PREFIX + b"1-0")).write_text("partial")
    (work / os.fsdecode(TMP_PREFIX + b"1-1")).mkdir()
    (work / "unrelated").write_text("keep")
    assert clean_workdir(os.fsencode(work)) == 2
    assert os.listdir(work) == ["unrelated"]


def test_copy_up_refuses_to_follow_a_symlinked_name(dirs) -> None:
    low, up, work, (lfd, ufd, wfd) = dirs
    os.symlink("/etc/hostname", low / "h")
    copy_up(lfd, b"h", wfd, ufd, keep_all)
    assert stat.S_ISLNK(os.lstat(up / "h").st_mode), "the link itself is copied, never its target"


@pytest.mark.parametrize("fsync", [True, False])
def test_one_fsync_of_the_whole_copy_before_it_takes_the_name(dirs, monkeypatch, fsync: bool) -> None:
    """As the kernel's copy-up (copy_up.c, "fsync metadata before moving it
    into upper dir"): a single fsync, of the copy with its data, owner, mode,
    times and xattrs all in place, made before the rename; none of the
    directory.  ``fsync=False`` (a metadata-only copy) syncs nothing."""
    low, up, work, (lfd, ufd, wfd) = dirs
    f = low / "f"
    f.write_bytes(b"data" * 1000)
    os.chown(f, 1234, 4321)
    os.chmod(f, 0o640)
    os.setxattr(f, b"user.color", b"blue")
    os.utime(f, ns=(1_111_111_111_123, 2_222_222_222_456))
    synced = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((
            stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, st.st_size,
            os.getxattr(f"/proc/self/fd/{fd}", b"user.color"), os.path.lexists(up / "f"),
        ))  # fmt: skip
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    copy_up(lfd, b"f", wfd, ufd, keep_all, fsync=fsync)
    want = [(stat.S_IFREG, 0o640, 1234, 2_222_222_222_456, 4000, b"blue", False)]
    assert synced == (want if fsync else [])
    assert (up / "f").read_bytes() == b"data" * 1000
