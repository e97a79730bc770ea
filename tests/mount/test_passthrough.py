"""The native engine's passthrough and open-file modes, through real mounts.

What is checked (see pyunionfs/fuse/backing.py for the design):

* upper files are served by the kernel from the backing file: the daemon's
  request counts (``user.pyunionfs.stats``) show no READ or WRITE for them,
  and the data reaches the upper, mmap included;
* lower files are served by the daemon (cached mode), and a lower file open
  for reading while another open copies it up shows the copy's data through
  the old descriptor, as the kernel's overlayfs does;
* opens made while an inode is in one mode keep to that mode, so every open
  of a busy file works whatever order reads, writes and copy-ups come in;
* O_TMPFILE files are made in the directory's upper and can be linked in, as on the kernel;
* writes by a user without CAP_FSETID clear set-user-ID bits
  (HANDLE_KILLPRIV_V2 leaves that to the daemon), as on the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path

from pyunionfs.fuse import control
from tests.support.mounting import Daemon, wait_until
from tests.support.writecheck import on_kernel_and_ours, public_dir, put, run_as

Mount = Callable[..., Daemon]


def counts(mnt: Path) -> dict[str, int]:
    return control.stats(os.fsencode(str(mnt)))


def test_upper_files_go_passthrough_and_reach_the_upper(tmp_path: Path, mount: Mount) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "keep", b"k")
    upper.mkdir()
    m = mount([lower], upper).mnt
    before = counts(m)
    data = os.urandom(3 << 20)
    (m / "new").write_bytes(data)
    assert (m / "new").read_bytes() == data
    with open(m / "new", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[:4] = b"MMAP"
        mm.flush()
        mm.close()
    assert (upper / "new").read_bytes() == b"MMAP" + data[4:]
    after = counts(m)
    assert after.get("READ", 0) == before.get("READ", 0), "the daemon served reads of an upper file"
    assert after.get("WRITE", 0) == before.get("WRITE", 0), "the daemon served writes of an upper file"
    assert after["passthrough_opens"] >= 3 + before["passthrough_opens"]


def test_passthrough_off_serves_reads_and_writes_in_the_daemon(tmp_path: Path, mount: Mount) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    m = mount([lower], upper, "passthrough=off").mnt
    (m / "f").write_bytes(b"abc" * 1000)
    assert (m / "f").read_bytes() == b"abc" * 1000
    c = counts(m)
    assert c.get("WRITE", 0) >= 1
    assert c["passthrough_opens"] == 0
    assert (upper / "f").read_bytes() == b"abc" * 1000


def test_lower_files_are_served_by_the_daemon(tmp_path: Path, mount: Mount) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "f", b"lower data")
    upper.mkdir()
    m = mount([lower], upper).mnt
    assert (m / "f").read_bytes() == b"lower data"
    c = counts(m)
    assert c.get("READ", 0) >= 1
    assert c["passthrough_opens"] == 0
    assert not (upper / "f").exists(), "a read copied the file up"


def _copy_up_while_open(m: Path) -> list[object]:
    """A read-only fd of a lower file, then a write open copies it up."""
    seen: list[object] = []
    r = os.open(m / "f", os.O_RDONLY)
    try:
        seen.append(os.pread(r, 100, 0))
        w = os.open(m / "f", os.O_WRONLY)
        try:
            os.pwrite(w, b"NEW", 0)
            seen.append(os.pread(r, 100, 0))  # the old fd sees the copy
            r2 = os.open(m / "f", os.O_RDONLY)  # opened while both are open
            seen.append(os.pread(r2, 100, 0))
            os.close(r2)
        finally:
            os.close(w)
        os.pwrite(fd := os.open(m / "f", os.O_RDWR), b"XY", 7)
        os.close(fd)
        seen.append(os.pread(r, 100, 0))
    finally:
        os.close(r)
    # All closed: the next opens find the file in the upper.
    with open(m / "f", "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"+tail")
    seen.append((m / "f").read_bytes())
    seen.append(os.stat(m / "f").st_size)
    return seen


def test_copy_up_while_open_matches_the_kernel(tmp_path: Path, mount: Mount) -> None:
    results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "f", b"lower data"), _copy_up_while_open)
    assert results["pyunionfs"] == results["kernel"]
    assert results["kernel"][1] == b"NEW"[:3] + b"er data"
    assert (tmp_path / "pyunionfs/up/f").read_bytes() == results["kernel"][-2]
    assert (tmp_path / "pyunionfs/low/f").read_bytes() == b"lower data"


def _hard_links_and_two_modes(m: Path) -> list[object]:
    seen: list[object] = []
    (m / "a").write_bytes(b"0123456789")
    os.link(m / "a", m / "b")
    fa = os.open(m / "a", os.O_RDWR)
    fb = os.open(m / "b", os.O_RDONLY)
    try:
        os.pwrite(fa, b"AB", 0)
        seen.append(os.pread(fb, 20, 0))
        os.ftruncate(fa, 4)
        seen.append(os.pread(fb, 20, 0))
        seen.append(os.fstat(fb).st_size)
    finally:
        os.close(fa)
        os.close(fb)
    return seen


def test_hard_links_share_one_backing(tmp_path: Path, mount: Mount) -> None:
    results = on_kernel_and_ours(tmp_path, mount, lambda low: None, _hard_links_and_two_modes)
    assert results["pyunionfs"] == results["kernel"] == [b"AB23456789", b"AB23", 4]


def test_a_write_by_a_user_clears_set_user_id_as_the_kernel_does(tmp_path: Path, mount: Mount) -> None:
    def build(low: Path) -> None:
        put(low / "suid", b"#!/bin/sh\n", mode=0o4777)
        put(low / "sgid", b"#!/bin/sh\n", mode=0o2777)
        put(low / "sgid-noexec", b"data\n", mode=0o2666)

    def story(m: Path) -> dict[str, object]:
        for name in ("up-suid", "up-sgid"):
            put(m / name, b"x", mode=0o4777 if name == "up-suid" else 0o2777)
        out = run_as(1000, 1000, m, """
for n in ("suid", "sgid", "sgid-noexec", "up-suid", "up-sgid"):
    fd = os.open(os.path.join(m, n), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"more\\n")
    os.close(fd)
    out[n] = oct(os.stat(os.path.join(m, n)).st_mode)
""")
        out["root sees"] = {n: oct(os.stat(m / n).st_mode) for n in out}
        return out

    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, build, story, mnt_parent=pub)
    assert results["pyunionfs"] == results["kernel"]
    assert not int(results["kernel"]["suid"], 8) & stat.S_ISUID


def test_stats_are_for_root_and_the_owner_only(tmp_path: Path, mount: Mount) -> None:
    lower = tmp_path / "lower"
    put(lower / "f", b"x")
    with public_dir() as pub:
        m = mount([lower], None, mnt=pub / "m").mnt
        assert counts(m)["passthrough_opens"] == 0  # read-only: nothing in an upper
        out = run_as(1000, 1000, m, "out['stats'] = err(os.getxattr, m, 'user.pyunionfs.stats')")
    assert out["stats"] == "EPERM"


_libc = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH, _AT_SYMLINK_FOLLOW, _AT_FDCWD = 0x1000, 0x400, -100


def _linkat_fd(fd: int, dst: Path) -> str:
    """linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH): "ok" or the errno name."""
    if _libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(dst), _AT_EMPTY_PATH) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def _tmpfile_story(m: Path) -> list[object]:
    seen: list[object] = []
    os.umask(0o022)
    fd = os.open(m / "d", os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"anonymous")
        st = os.fstat(fd)
        seen.append((st.st_nlink, oct(stat.S_IMODE(st.st_mode)), st.st_size, sorted(os.listdir(m / "d"))))
        seen.append(_linkat_fd(fd, m / "d" / "named"))
        seen.append(((m / "d" / "named").read_bytes(), os.fstat(fd).st_nlink))
        os.pwrite(fd, b"A", 0)
        seen.append((m / "d" / "named").read_bytes())
    finally:
        os.close(fd)
    excl = os.open(m / "d", os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
    try:
        seen.append(_linkat_fd(excl, m / "d" / "never"))
    finally:
        os.close(excl)
    seen.append(sorted(os.listdir(m / "d")))
    return seen


def test_o_tmpfile_matches_the_kernel(tmp_path: Path, mount: Mount) -> None:
    results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "d" / "lowerfile", b"l"), _tmpfile_story)
    assert results["pyunionfs"] == results["kernel"]
    assert results["kernel"][1] == "ok" and results["kernel"][3] == b"Anonymous"
    assert (tmp_path / "pyunionfs/up/d/named").read_bytes() == b"Anonymous"
    assert not (tmp_path / "pyunionfs/up/d/never").exists()


def test_pages_cached_before_passthrough_writes_are_not_shown_after(tmp_path: Path, mount: Mount) -> None:
    """An inode served cached, then written in passthrough mode (past the kernel's page cache),
    then opened cached again shows the new data, not the pages it cached first."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    m = mount([lower], upper).mnt
    f = m / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)  # O_APPEND: cached mode
    os.write(fd, b"AAAA" * 1024)
    assert os.pread(fd, 8, 0) == b"AAAAAAAA"  # the kernel holds these pages now
    os.close(fd)
    # RELEASE is asynchronous (and may be answered after the next OPEN): wait for it each time,
    # so that the next open finds the inode closed and may change mode
    wait_until(lambda: counts(m)["open_files"] == 0, 10, "the cached open to be released")
    fd = os.open(f, os.O_RDWR)  # passthrough: the write goes past those pages
    os.pwrite(fd, b"BBBB", 0)
    os.close(fd)
    wait_until(lambda: counts(m)["open_files"] == 0, 10, "the passthrough open to be released")
    fd = os.open(f, os.O_RDONLY | os.O_APPEND)  # cached again
    try:
        assert os.pread(fd, 8, 0) == b"BBBBAAAA"
    finally:
        os.close(fd)
    assert (upper / "f").read_bytes()[:8] == b"BBBBAAAA"
    assert counts(m)["passthrough_opens"] == 1
