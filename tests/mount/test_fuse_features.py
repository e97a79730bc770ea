"""What the native engine asks of the kernel: fallocate(2), and listings the kernel caches.

fallocate is checked against the kernel's overlayfs doing the same calls on the same layers;
listing caching is checked by what it makes visible: a change made behind the mount's back
stays unseen while the kernel holds a listing (and is seen at once with ``timeout=0``), while
every change made through the mount shows in the next listing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pyunionfs.fs.syscalls import birth_time_ns
from pyunionfs.fuse import control
from tests.support.mounting import Daemon
from tests.support.writecheck import on_kernel_and_ours, put

Mount = Callable[..., Daemon]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
MiB = 1 << 20


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """The raw syscall (posix_fallocate would fall back to writing): 0 or the errno."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def _fallocate_story(mnt: Path) -> list[tuple]:
    """The same calls on a lower file and a new one; what each returned and left behind."""
    seen: list[tuple] = []
    for name in ("lowerfile", "newfile"):
        path = mnt / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for mode, off, length in [
                (0, 0, 3 * MiB),  # grow, allocated
                (KEEP_SIZE, 3 * MiB, MiB),  # allocate past EOF, size unchanged
                (PUNCH_HOLE | KEEP_SIZE, 4096, 8192),  # punch: zeroes, blocks freed
                (ZERO_RANGE, MiB, 4096),
                (PUNCH_HOLE, 0, 4096),  # punch without KEEP_SIZE is invalid
            ]:
                rc = fallocate(fd, mode, off, length)
                st = os.fstat(fd)
                seen.append((name, mode, rc, st.st_size, st.st_blocks))
            os.lseek(fd, 0, os.SEEK_SET)
            seen.append((name, "data", os.read(fd, 4 * 4096)))
        finally:
            os.close(fd)
        ro = os.open(path, os.O_RDONLY)
        try:
            seen.append((name, "read-only fd", fallocate(ro, 0, 0, 4096)))
        finally:
            os.close(ro)
    return seen


def test_fallocate_works_like_the_kernel_overlay_and_copies_up(tmp_path: Path, mount: Mount) -> None:
    results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "lowerfile", b"x" * 20000), _fallocate_story)
    for side in results:
        assert (tmp_path / side / "low/lowerfile").read_bytes() == b"x" * 20000, "a lower file was written"
        assert (tmp_path / side / "up/lowerfile").stat().st_size == 3 * MiB
    assert results["pyunionfs"] == results["kernel"]
    # the calls did something: the story must not be all errors
    assert ("lowerfile", 0, 0, 3 * MiB) == results["pyunionfs"][0][:4]
    assert ("newfile", "read-only fd", errno.EBADF) in results["pyunionfs"]


def listings(d: Daemon) -> int:
    """How many listing requests the daemon has had (its --debug trace)."""
    return len(re.findall(r"\bREADDIR(?:PLUS)? #", d.log_text()))


def test_listings_stay_cached_until_changed_through_the_mount(tmp_path: Path, mount: Mount) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "d/a", "a")
    put(lower / "d/b", "b")
    upper.mkdir()
    d = mount([lower], upper, extra_args=["--debug"])
    m = d.mnt
    assert sorted(os.listdir(m / "d")) == ["a", "b"]
    asked = listings(d)
    assert asked > 0
    assert sorted(os.listdir(m / "d")) == ["a", "b"]
    assert sorted(os.listdir(m / "d")) == ["a", "b"]
    assert listings(d) == asked, "the kernel asked again for a listing it could keep"
    # Every change through the mount shows in the next listing.
    (m / "d/c").write_text("c")
    assert sorted(os.listdir(m / "d")) == ["a", "b", "c"]
    assert listings(d) > asked
    os.unlink(m / "d/a")
    assert sorted(os.listdir(m / "d")) == ["b", "c"]
    os.mkdir(m / "e")
    assert os.listdir(m / "e") == []
    os.rename(m / "d/b", m / "e/b")
    assert os.listdir(m / "d") == ["c"]
    assert os.listdir(m / "e") == ["b"]
    os.link(m / "e/b", m / "d/b2")
    os.symlink("x", m / "d/s")
    os.mkfifo(m / "d/f")
    assert sorted(os.listdir(m / "d")) == ["b2", "c", "f", "s"]
    os.rename(m / "d/c", m / "d/c2")
    assert sorted(os.listdir(m / "d")) == ["b2", "c2", "f", "s"]
    for n in ("b2", "c2", "f", "s"):
        os.unlink(m / "d" / n)
    assert os.listdir(m / "d") == []
    os.rmdir(m / "d")
    assert sorted(os.listdir(m)) == ["e"]
    os.mkdir(m / "d")
    assert os.listdir(m / "d") == []  # opaque now: the lower's a and b stay hidden
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"


class _Dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


def _offsets(path: Path) -> dict[bytes, int]:
    """Each name of directory *path* and the offset readdir gives after it (``d_off``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir64.argtypes = libc.closedir.argtypes = [ctypes.c_void_p]
    libc.readdir64.restype = ctypes.POINTER(_Dirent64)
    d = libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())
    out = {}
    try:
        while ent := libc.readdir64(d):
            out[ent.contents.d_name] = ent.contents.d_off
    finally:
        libc.closedir(d)
    return out


def test_listing_offsets_fit_a_32_bit_reader(tmp_path: Path, mount: Mount) -> None:
    """A 32-bit program's readdir fails with EOVERFLOW on an offset past 2**31 (glibc), so ext4
    gives such programs 31-bit offsets: ours fit, in a lower directory, a merged one and one
    changed while it was read."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for i in range(3_000):
        put(lower / f"d/entry-{i:05d}", "")
    put(upper / "d/upper-only", "")
    d = mount([lower], upper)
    first = _offsets(d.mnt / "d")
    (d.mnt / "d/new").write_text("")
    second = _offsets(d.mnt / "d")
    assert len(first) == 3_003 and len(second) == 3_004
    assert all(0 < off < 1 << 31 for off in [*first.values(), *second.values()])


def test_timeout_zero_lists_afresh_every_time(tmp_path: Path, mount: Mount) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "d/a", "a")
    upper.mkdir()
    d = mount([lower], upper, "timeout=0", extra_args=["--debug"])
    assert os.listdir(d.mnt / "d") == ["a"]
    asked = listings(d)
    assert os.listdir(d.mnt / "d") == ["a"]
    assert listings(d) > asked


def test_fallocate_on_a_read_only_mount_is_refused(tmp_path: Path, mount: Mount) -> None:
    lower = tmp_path / "lower"
    put(lower / "f", "data")
    m = mount([lower], None).mnt
    with pytest.raises(OSError) as info:
        os.open(m / "f", os.O_RDWR)
    assert info.value.errno == errno.EROFS
    assert (lower / "f").read_text() == "data"


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_copy_file_range_over_cached_pages_reads_back_exactly(tmp_path: Path, mount: Mount, passthrough: str) -> None:
    """COPY_FILE_RANGE is answered on the backing fds and the destination's cached pages are
    dropped: a copy into a file whose pages the kernel holds, at unaligned offsets and past its
    end, reads back as the bytes copied (fsx without -E found a stale byte here on fuse-overlayfs)."""
    (tmp_path / "lower").mkdir()
    (tmp_path / "upper").mkdir()
    m = mount([tmp_path / "lower"], tmp_path / "upper", f"passthrough={passthrough}").mnt
    rnd = random.Random(5)
    for trial in range(60):
        da, db = rnd.randbytes(rnd.randint(1, 300_000)), rnd.randbytes(rnd.randint(1, 300_000))
        (m / "a").write_bytes(da)
        (m / "b").write_bytes(db)
        fa, fb = os.open(m / "a", os.O_RDONLY), os.open(m / "b", os.O_RDWR)
        try:
            os.pread(fb, len(db), 0)  # the destination's pages are cached now
            off_in, off_out = rnd.randrange(len(da)), rnd.randint(0, len(db) + 5000)
            n = os.copy_file_range(fa, fb, rnd.randint(1, 70_000), off_in, off_out)
            assert n > 0
            expected = bytearray(db.ljust(off_out, b"\0"))
            expected[off_out : off_out + n] = da[off_in : off_in + n]
            assert os.pread(fb, len(expected) + 10, 0) == bytes(expected), f"trial {trial}"
        finally:
            os.close(fa)
            os.close(fb)
    assert control.stats(os.fsencode(m)).get("COPY_FILE_RANGE_64", 0) >= 60


def test_statx_shows_the_objects_birth_time_as_the_kernel_overlay_does(tmp_path: Path, mount: Mount) -> None:
    """STATX is answered (GETATTR cannot carry a birth time): the btime through the mount is the
    one of the object in its layer, lower or upper, as statx(2) on the kernel's overlayfs shows."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "f", b"lower")
    put(lower / "d" / "g", b"g")
    upper.mkdir()
    d = mount([lower], upper)
    m = d.mnt
    (m / "new").write_bytes(b"new")
    (m / "d" / "g").write_bytes(b"changed")  # copied up: a new object, a new birth
    for through, real in ((m / "f", lower / "f"), (m / "new", upper / "new"), (m / "d" / "g", upper / "d" / "g")):
        seen = birth_time_ns(os.fsencode(through), False)
        assert seen is not None and seen == birth_time_ns(os.fsencode(real), False), through
    assert control.stats(os.fsencode(m)).get("STATX", 0) >= 3
