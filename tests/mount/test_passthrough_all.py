"""``-o passthrough=all``: lower files served by the kernel itself, through real mounts.

What is checked (design: pyunionfs/fuse/backing.py and nodeids.py):

* a lower file of 64 KiB or more opened to read goes passthrough on the
  lower file: the daemon sees no READ, the data is right, nothing is copied
  up; a smaller one is served by the daemon as by default;
* a write open, a truncate, or any open after a copy-up, while the inode is
  pinned to the lower file by a read-only open, works as on the kernel's
  overlayfs: the kernel's path walk retries on a new inode (ESTALE once) and
  reaches the copy, whose inode number is the file's own;
* the one documented difference: a descriptor opened before the copy-up
  keeps reading the lower file's data (the kernel shows the copy's), and
  reopening such a descriptor through /proc/self/fd for writing fails with
  ESTALE;
* a chmod (a copy-up of metadata) leaves the pinned inode as it is.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyunionfs.fuse import control
from tests.support.mounting import Daemon
from tests.support.writecheck import on_kernel_and_ours, put

Mount = Callable[..., Daemon]

BIG = bytes(range(256)) * 1024  # 256 KiB: above the 64 KiB threshold


def counts(mnt: Path) -> dict[str, int]:
    return control.stats(os.fsencode(str(mnt)))


def all_mount(mount: Mount) -> Mount:
    return lambda lowers, upper, *options, **kw: mount(lowers, upper, "passthrough=all", *options, **kw)


def big_file_mount(tmp_path: Path, mount: Mount, *options: str) -> tuple[Path, Path, Path]:
    """A ``passthrough=all`` mount over a lower with one big file ``f``: (mountpoint, lower, upper)."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "f", BIG)
    upper.mkdir()
    return all_mount(mount)([lower], upper, *options).mnt, lower, upper


def test_big_lower_files_are_read_by_the_kernel_small_ones_by_the_daemon(tmp_path: Path, mount: Mount) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "big", BIG)
    put(lower / "small", b"small data")
    os.utime(lower / "big", ns=(10**18, 10**18))  # atime at mtime: relatime would update it
    upper.mkdir()
    m = all_mount(mount)([lower], upper).mnt
    if not _passthrough_possible(m):
        pytest.skip("the kernel refused passthrough here")
    before = counts(m)
    assert (m / "big").read_bytes() == BIG
    with open(m / "big", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert mm[1000:1010] == BIG[1000:1010]
        mm.close()
    after = counts(m)
    assert after.get("READ", 0) == before.get("READ", 0), "the daemon served reads of a big lower file"
    assert after["passthrough_opens"] == before["passthrough_opens"] + 2
    assert (m / "small").read_bytes() == b"small data"
    assert counts(m).get("READ", 0) >= 1 + after.get("READ", 0)
    assert sorted(os.listdir(upper)) == [], "a read copied a file up"
    assert os.stat(lower / "big").st_atime_ns == 10**18, "reading through the mount wrote the lower's atime"
    assert (lower / "big").read_bytes() == BIG


def _passthrough_possible(m: Path) -> bool:
    """Whether an upper file goes passthrough on this mount (root in the initial namespace)."""
    (m / "probe").write_bytes(b"p")
    (m / "probe").unlink()
    return counts(m)["passthrough_opens"] > 0


def _pinned_then_written(m: Path) -> list[object]:
    """A read-only fd pins a big lower file; then a write open, new opens, old fd reads."""
    seen: list[object] = []
    ino = os.stat(m / "f").st_ino
    r = os.open(m / "f", os.O_RDONLY)
    try:
        seen.append(os.pread(r, 8, 0))
        w = os.open(m / "f", os.O_WRONLY)
        try:
            os.pwrite(w, b"NEW", 0)
            r2 = os.open(m / "f", os.O_RDONLY)
            seen.append(os.pread(r2, 8, 0))
            seen.append(os.fstat(r2).st_ino == ino)
            os.close(r2)
            seen.append(("old fd", os.pread(r, 8, 0)))
        finally:
            os.close(w)
        os.truncate(m / "f", 5)  # a path truncate while the old fd lasts
        seen.append(os.stat(m / "f").st_size)
        seen.append(("old fd", os.pread(r, 8, 0)))
    finally:
        os.close(r)
    seen.append((m / "f").read_bytes())
    seen.append(os.stat(m / "f").st_ino == ino)
    return seen


def test_a_copy_up_while_pinned_matches_the_kernel_but_for_the_old_fd(tmp_path: Path, mount: Mount) -> None:
    results = on_kernel_and_ours(tmp_path, all_mount(mount), lambda low: put(low / "f", BIG), _pinned_then_written)
    kernel, ours = results["kernel"], results["pyunionfs"]
    assert kernel == [BIG[:8], b"NEW" + BIG[3:8], True, ("old fd", b"NEW" + BIG[3:8]), 5,
                      ("old fd", b"NEW" + BIG[3:5]), b"NEW" + BIG[3:5], True]
    # The documented difference: the fd opened before the copy-up reads the lower file.
    assert ours == [*kernel[:3], ("old fd", BIG[:8]), 5, ("old fd", BIG[:8]), *kernel[6:]]
    assert (tmp_path / "pyunionfs/up/f").read_bytes() == b"NEW" + BIG[3:5]
    assert (tmp_path / "pyunionfs/low/f").read_bytes() == BIG


def test_a_chmod_while_pinned_keeps_the_inode(tmp_path: Path, mount: Mount) -> None:
    m, lower, upper = big_file_mount(tmp_path, mount)
    r = os.open(m / "f", os.O_RDONLY)
    try:
        os.chmod(m / "f", 0o600)
        assert os.stat(m / "f").st_mode & 0o777 == 0o600
        assert os.fstat(r).st_mode & 0o777 == 0o600
        assert (m / "f").read_bytes() == BIG  # a new open of the copy (same bytes)
        assert os.pread(r, 4, 4) == BIG[4:8]
        with open(m / "f", "r+b") as w:
            w.write(b"W")
        assert (m / "f").read_bytes()[:2] == b"W" + BIG[1:2]
    finally:
        os.close(r)
    assert (upper / "f").read_bytes()[:2] == b"W" + BIG[1:2]


def test_reopening_a_pinned_fd_for_writing_through_proc_is_refused(tmp_path: Path, mount: Mount) -> None:
    """The kernel's retry walks the magic link back to the pinned inode: ESTALE (documented)."""
    m, lower, upper = big_file_mount(tmp_path, mount)
    if not _passthrough_possible(m):
        pytest.skip("the kernel refused passthrough here")
    r = os.open(m / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.open(f"/proc/self/fd/{r}", os.O_RDWR)
        assert exc.value.errno == errno.ESTALE
        # Through its name it works, and reaches the copy.
        fd = os.open(m / "f", os.O_RDWR)
        os.pwrite(fd, b"Z", 0)
        os.close(fd)
    finally:
        os.close(r)
    assert (m / "f").read_bytes()[:1] == b"Z"
    assert (upper / "f").read_bytes()[:1] == b"Z"


def test_readers_and_writers_racing_on_a_pinned_file_never_see_estale(tmp_path: Path, mount: Mount) -> None:
    """Opens by name from several threads while others hold the file pinned: every call succeeds."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for i in range(4):
        put(lower / f"f{i}", BIG)
    upper.mkdir()
    m = all_mount(mount)([lower], upper).mnt
    errors: list[BaseException] = []
    pinned = [os.open(m / f"f{i}", os.O_RDONLY) for i in range(4)]

    def reader(i: int) -> None:
        for _ in range(60):
            fd = os.open(m / f"f{i % 4}", os.O_RDONLY)
            try:
                head = os.pread(fd, 4, 0)
                assert head in (BIG[:4], b"W%03d" % (i % 4)), head
            finally:
                os.close(fd)

    def writer(i: int) -> None:
        for n in range(20):
            fd = os.open(m / f"f{i}", os.O_RDWR)
            try:
                os.pwrite(fd, b"W%03d" % i, 0)
            finally:
                os.close(fd)
            if n % 5 == 4:
                os.truncate(m / f"f{i}", len(BIG))

    def guarded(fn: Callable[[int], None], i: int) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(i)
            except BaseException as exc:  # reported below, with the thread's failure
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(reader, i)) for i in range(6)]
    threads += [threading.Thread(target=guarded(writer, i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for fd in pinned:
        os.close(fd)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []
    for i in range(4):
        data = (m / f"f{i}").read_bytes()
        assert data == b"W%03d" % i + BIG[4:]
        assert (upper / f"f{i}").read_bytes() == data
        assert (lower / f"f{i}").read_bytes() == BIG


def test_a_read_only_mount_reads_big_lower_files_by_passthrough_by_default(tmp_path: Path, mount: Mount) -> None:
    """Nothing is copied up on a read-only mount, so lower passthrough changes nothing one can see."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "big", BIG)
    put(upper / "up", BIG)
    m = mount([lower], upper, "ro").mnt
    before = counts(m)
    assert (m / "big").read_bytes() == BIG
    assert (m / "up").read_bytes() == BIG
    with pytest.raises(OSError) as exc:
        os.open(m / "big", os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    after = counts(m)
    assert after.get("READ", 0) == before.get("READ", 0)
    assert after["passthrough_opens"] == before["passthrough_opens"] + 2
    off = mount([lower], upper, "ro", "passthrough=off").mnt
    assert (off / "big").read_bytes() == BIG
    assert counts(off)["passthrough_opens"] == 0


def test_a_metadata_only_copy_reads_its_lower_data_by_passthrough(tmp_path: Path, mount: Mount) -> None:
    m, lower, upper = big_file_mount(tmp_path, mount, "metacopy=on")
    os.chown(m / "f", 1000, 1000)  # a metadata-only copy-up: the data stays below
    os.getxattr(upper / "f", "trusted.overlay.metacopy")  # (ENODATA: the data was copied)
    before = counts(m)
    r = os.open(m / "f", os.O_RDONLY)
    try:
        assert os.pread(r, 8, 0) == BIG[:8]
        assert counts(m).get("READ", 0) == before.get("READ", 0)
        assert counts(m)["passthrough_opens"] == before["passthrough_opens"] + 1
        with open(m / "f", "r+b") as w:  # the data copy, on a new inode
            w.write(b"DATA")
        assert (m / "f").read_bytes() == b"DATA" + BIG[4:]
        assert os.stat(m / "f").st_uid == 1000
    finally:
        os.close(r)
    assert (upper / "f").read_bytes() == b"DATA" + BIG[4:]
    assert (lower / "f").read_bytes() == BIG


def test_the_old_fd_stats_what_the_new_inode_wrote(tmp_path: Path, mount: Mount) -> None:
    """fstat of a descriptor opened before the copy-up shows the size written since, as on the kernel."""
    m, lower, upper = big_file_mount(tmp_path, mount)
    fds = [os.open(m / "f", os.O_RDONLY)]
    try:
        r = fds[0]
        assert os.fstat(r).st_size == len(BIG)
        fds.append(w := os.open(m / "f", os.O_WRONLY | os.O_APPEND))
        os.write(w, b"x" * 5000)
        assert os.fstat(r).st_size == len(BIG) + 5000
        fds.append(w2 := os.open(m / "f", os.O_RDWR))
        os.pwrite(w2, b"y", 2 * len(BIG))
        assert os.fstat(r).st_size == os.fstat(w).st_size == 2 * len(BIG) + 1
        assert os.lseek(r, 0, os.SEEK_END) == 2 * len(BIG) + 1
    finally:
        for fd in fds:
            os.close(fd)


def test_second_node_ids_go_when_the_kernel_forgets_them(tmp_path: Path, mount: Mount) -> None:
    """Every inode let go of, and the new one, is forgotten by the kernel in the end: no id stays."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for i in range(5):
        put(lower / f"f{i}", BIG)
        os.link(lower / f"f{i}", lower / f"link{i}")
    upper.mkdir()
    m = all_mount(mount)([lower], upper).mnt
    for i in range(5):
        r = os.open(m / f"f{i}", os.O_RDONLY)
        with open(m / f"link{i}", "r+b") as w:  # through the other name of the pinned inode
            w.write(b"W")
        assert os.pread(r, 1, 0) == BIG[:1]  # (the documented difference)
        os.close(r)
    assert counts(m)["second_node_ids"] == 5
    assert (m / "f0").read_bytes()[:2] == b"W" + BIG[1:2]
    control.drop_caches(os.fsencode(str(m)))
    # The kernel sends its FORGETs after the invalidations, on its own time.
    deadline = time.monotonic() + 10
    while counts(m)["second_node_ids"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counts(m)["second_node_ids"] == 0
    assert [(m / f"f{i}").read_bytes()[:1] for i in range(5)] == [b"W"] * 5
