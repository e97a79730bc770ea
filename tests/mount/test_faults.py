"""Faults: a full upper filesystem, unmounting a busy mount, a killed daemon's mount.

Why these tests: a union filesystem is used for builds and containers, where
disks fill up, shells sit inside mounts and daemons get killed.  What must
hold then is what a local filesystem (and the kernel's overlayfs) gives:

* **Full disk** (the upper and its work directory on a small tmpfs made by
  the test): a write that does not fit fails with ENOSPC and leaves the file
  with exactly what was reported written; a copy-up that does not fit fails
  with ENOSPC and leaves no trace (no partial copy in the upper, nothing in
  the work dir, no space held), the file keeps its lower content, and the
  same change succeeds once there is room; filling the upper with new files
  and then deleting them gives ENOSPC only and a correct listing; running
  out of inodes gives ENOSPC on every kind of create.  Where the kernel's
  overlayfs can show the expected errnos, the same story runs on it first.
* **Unmounting a busy mount**: ``umount``, ``fusermount3 -u`` and
  ``pyunionfs umount`` refuse with EBUSY (pyunionfs: one line, non-zero
  status) and the mount stays; a lazy unmount detaches at once, open files
  keep working, and the daemon exits 0 when the last one is closed.
* **A killed daemon**: the mount answers ENOTCONN, and ``pyunionfs umount``,
  ``fusermount3 -u`` and ``umount`` (not only ``umount -l``, which
  test_write_safety's ``kill_daemon`` uses) clear it; a remount over the
  same upper works.

Every tmpfs made here is unmounted after the test (after the daemons using
it have stopped), and /proc/mounts is checked for leftovers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyunionfs.fuse.mountinfo import find_mount
from tests.support.layergen import is_mounted as something_mounted
from tests.support.mounting import Daemon, dead_mount_errno, is_mounted
from tests.support.writecheck import (
    MiB,
    default_workdir,
    errname,
    errno_of,
    kernel_overlay,
    layer_state,
    put,
    temporaries,
    upper_layout,
    wait_for,
    work_entries,
)

Mount = Callable[..., Daemon]
KiB = 1 << 10
PYUNIONFS = [sys.executable, "-m", "pyunionfs"]
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------
# Small filesystems for the upper
# --------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: ``small_fs(name, size="8m", nr_inodes=None)`` -> a fresh tmpfs at ``tmp_path/name``.

    Every one is unmounted after the test; a tmpfs still busy then (a daemon
    that kept files open in its upper) is detached lazily and reported.
    """
    made: list[Path] = []

    def make(name: str, size: str = "8m", nr_inodes: int | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size},mode=0755" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "pyunionfs-faults", str(path)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"cannot mount a tmpfs: {res.stderr}"
        made.append(path)
        # The upper needs trusted.* xattrs (whiteouts' opaque dirs, origin records).
        try:
            os.setxattr(path, "trusted.pyunionfs-faults", b"1")
            os.removexattr(path, "trusted.pyunionfs-faults")
        except OSError as exc:
            pytest.fail(f"tmpfs does not take trusted.* xattrs here ({exc}): the upper needs them")
        return path

    yield make
    busy = []
    for path in reversed(made):
        res = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
        if res.returncode != 0 and something_mounted(path):
            busy.append(f"{path}: {res.stderr.strip()}")
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
    left = [str(p) for p in made if something_mounted(p)]
    assert not left, f"still mounted after the test: {left}"
    assert not busy, f"a tmpfs was still busy after the daemons stopped: {busy}"


@pytest.fixture
def mount(small_fs: Callable[..., Path], mount: Mount) -> Mount:
    """conftest's ``mount``, set up after ``small_fs``: daemons stop before their tmpfs is unmounted."""
    return mount


def _free(path: Path) -> int:
    """Bytes an unprivileged writer may still use on *path*'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible data: the kernel's run and ours get the same lower files."""
    return random.Random(seed).randbytes(size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------
# Full disk: a write that does not fit
# --------------------------------------------------------------------------


def _write_until_error(path: Path, data: bytes) -> tuple[int, list[tuple[str, int]]]:
    """Create *path* and write *data* 1 MiB at a time, then fsync and close.

    Returns (bytes reported written, [(step, errno), ...] of every failed step).
    """
    errors: list[tuple[str, int]] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    written = 0
    try:
        while written < len(data):
            try:
                written += os.write(fd, data[written:written + MiB])
            except OSError as exc:
                errors.append(("write", exc.errno or -1))
                break
        if e := errno_of(os.fsync, fd):
            errors.append(("fsync", e))
    finally:
        if e := errno_of(os.close, fd):
            errors.append(("close", e))
    return written, errors


def test_a_write_that_does_not_fit_fails_with_enospc_and_the_mount_recovers(
        tmp_path: Path, small_fs: Callable[..., Path], mount: Mount) -> None:
    """Writing 8 MiB into a 4 MiB upper: ENOSPC, the file holds exactly what was written; after
    deleting it the space comes back and new files work."""
    fs = small_fs("upfs", size="4m")
    low, up = tmp_path / "low", fs / "up"
    put(low / "keep", "kept\n")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    free0 = _free(fs)
    assert _free(m) == free0, "df of the mount should show the upper's filesystem"

    data = _pattern(8 * MiB)
    written, errors = _write_until_error(m / "big", data)
    assert errors, f"{written} bytes written into a 4 MiB filesystem without an error"
    assert errors[0][1] == errno.ENOSPC and all(e == errno.ENOSPC for _, e in errors), (
        f"a full upper must give ENOSPC: {[(s, errname(e)) for s, e in errors]}")
    assert 0 < written <= 4 * MiB
    # The file has exactly what the writes reported, through the mount and on disk.
    assert os.stat(m / "big").st_size == written
    assert _sha(_read(m / "big")) == _sha(data[:written])
    assert os.lstat(up / "big").st_size == written and _sha(_read(up / "big")) == _sha(data[:written])
    assert _free(m) == _free(fs) < MiB
    # Full, but still serving.
    assert (m / "keep").read_text() == "kept\n"
    assert sorted(os.listdir(m)) == ["big", "keep"]

    os.unlink(m / "big")
    # The daemon closes its descriptor on RELEASE, which the kernel sends after close() returned.
    wait_for(lambda: _free(fs) == free0, 10, "the deleted file's space to be freed")
    small = _pattern(300 * KiB, 1)
    with open(m / "after", "xb") as f:
        f.write(small)
        f.flush()
        os.fsync(f.fileno())
    assert _read(m / "after") == small
    assert sorted(os.listdir(m)) == ["after", "keep"]
    assert upper_layout(up) == {"after": ("reg", len(small), _sha(small))}
    assert work_entries(default_workdir(up)) == []
    d.stop()


# --------------------------------------------------------------------------
# Full disk: a copy-up that does not fit
# --------------------------------------------------------------------------

_BIG = 6 * MiB  # the lower file
_FS_SIZE = "8m"  # the upper's filesystem: room for it...
_FILLER = 5 * MiB  # ...until a file outside the upper takes this much

COPY_UP_OPS: dict[str, Callable[[Path], object]] = {
    "open-for-write": lambda p: os.close(os.open(p, os.O_WRONLY)),
    "truncate": lambda p: os.truncate(p, 1000),
    "chmod": lambda p: os.chmod(p, 0o600),
    "setxattr": lambda p: os.setxattr(p, "user.faults", b"1"),
}


def _big_lower(low: Path) -> bytes:
    data = _pattern(_BIG, 6)
    put(low / "d/big", data, 0o644)
    os.setxattr(low / "d", "user.dir", b"d")
    put(low / "other", "other")
    return data


def _view(p: Path) -> tuple[Any, ...]:
    """A file as the mount shows it: size, mode, data hash, user xattrs."""
    st = os.stat(p)
    xattrs = sorted((n, os.getxattr(p, n)) for n in os.listxattr(p) if n.startswith("user."))
    return st.st_size, stat.filemode(st.st_mode), _sha(_read(p)), xattrs


def _copy_up_when_full(m: Path, fs: Path, up: Path, work: Path, op: Callable[[Path], object],
                       pid: int | None) -> dict[str, Any]:
    """Fill *fs* so that d/big does not fit, apply *op* to it, look, free the space, apply it again."""
    put(fs / "filler", _pattern(_FILLER, 5))
    free = _free(fs)
    assert free < _BIG
    out: dict[str, Any] = {"errno": errname(errno_of(op, m / "d/big"))}
    out["view"] = _view(m / "d/big")
    out["listing"] = sorted(os.listdir(m)), sorted(os.listdir(m / "d"))
    out["upper files"] = sorted(k for k, v in upper_layout(up).items() if v[0] != "dir")
    out["work"] = work_entries(work)
    out["space held"] = free - _free(fs)
    if pid is not None:
        out["temporaries held"] = temporaries(pid, work)
    (fs / "filler").unlink()
    out["retry"] = errname(errno_of(op, m / "d/big"))
    out["view after"] = _view(m / "d/big")
    out["upper after"] = {k: v for k, v in upper_layout(up).items() if v[0] != "dir"}
    out["work after"] = work_entries(work)
    return out


@pytest.mark.parametrize("op", list(COPY_UP_OPS))
def test_a_copy_up_that_does_not_fit_fails_with_enospc_and_leaves_no_trace(
        tmp_path: Path, small_fs: Callable[..., Path], mount: Mount, op: str) -> None:
    """The first change to a 6 MiB lower file with 3 MiB free: ENOSPC, the lower content still shows,
    nothing partial in the upper or the work dir, no space held; with room again, the same change works."""
    results = {}
    for side in ("kernel", "pyunionfs"):
        low = tmp_path / side / "low"
        data = _big_lower(low)
        lower_before = layer_state(low)
        fs = small_fs(f"{side}-fs", size=_FS_SIZE)
        up = fs / "up"
        up.mkdir()
        if side == "kernel":
            with kernel_overlay([low], up, fs / "work", tmp_path / side / "mnt") as m:
                results[side] = _copy_up_when_full(m, fs, up, fs / "work", COPY_UP_OPS[op], None)
        else:
            d = mount([low], up)
            results[side] = _copy_up_when_full(d.mnt, fs, up, default_workdir(up), COPY_UP_OPS[op], d.proc.pid)
            d.stop()
        assert layer_state(low) == lower_before, f"{side}: the lower layer was modified"

        r = results[side]
        before = (_BIG, "-rw-r--r--", _sha(data), [])
        assert r["errno"] == "ENOSPC", f"{side}: {op} of a file that does not fit: {r['errno']}"
        assert r["view"] == before, f"{side}: the failed copy-up changed the file as the mount shows it"
        assert r["listing"] == (["d", "other"], ["big"])
        assert r["upper files"] == [], f"{side}: a failed copy-up left files in the upper: {r['upper files']}"
        assert r["work"] == [], f"{side}: a failed copy-up left entries in work/: {r['work']}"
        assert r["space held"] == 0, f"{side}: a failed copy-up still holds {r['space held']} bytes"
        assert r.pop("temporaries held", {}) == {}, f"{side}: the daemon holds temporaries: {r}"
        expected = {
            "open-for-write": before,
            "truncate": (1000, "-rw-r--r--", _sha(data[:1000]), []),
            "chmod": (_BIG, "-rw-------", _sha(data), []),
            "setxattr": (_BIG, "-rw-r--r--", _sha(data), [("user.faults", b"1")]),
        }[op]
        assert (r["retry"], r["view after"]) == ("ok", expected), f"{side}: {op} once there is room: {r}"
        assert r["upper after"] == {"d/big": ("reg", expected[0], expected[2])}, r["upper after"]
        assert r["work after"] == []
    assert results["pyunionfs"] == results["kernel"]


@pytest.mark.parametrize("how", ["O_TRUNC", "O_CREAT|O_TRUNC"])
def test_opening_a_lower_file_with_o_trunc_needs_no_room_for_its_old_data(
        tmp_path: Path, small_fs: Callable[..., Path], mount: Mount, how: str) -> None:
    """open(O_TRUNC) of a 6 MiB lower file with 3 MiB free works: the kernel copies up no data for it
    (copy_up.c: "maybe truncate regular file"), so the old data needs no room (``> file`` in a shell)."""
    flags = os.O_WRONLY | os.O_TRUNC | (os.O_CREAT if "CREAT" in how else 0)
    results = {}
    for side in ("kernel", "pyunionfs"):
        low = tmp_path / side / "low"
        _big_lower(low)
        fs = small_fs(f"{side}-fs", size=_FS_SIZE)
        up = fs / "up"
        up.mkdir()

        def story(m: Path, fs: Path = fs, up: Path = up) -> tuple[Any, ...]:
            put(fs / "filler", _pattern(_FILLER, 5))
            try:
                fd = os.open(m / "d/big", flags, 0o644)
            except OSError as exc:
                return (errname(exc.errno or -1),)
            try:
                os.write(fd, b"new content\n")
            finally:
                os.close(fd)
            layout = {k: v for k, v in upper_layout(up).items() if v[0] != "dir"}
            return "ok", _view(m / "d/big"), layout

        if side == "kernel":
            with kernel_overlay([low], up, fs / "work", tmp_path / side / "mnt") as m:
                results[side] = story(m)
        else:
            d = mount([low], up)
            results[side] = story(d.mnt)
            d.stop()
    new = b"new content\n"
    assert results["kernel"] == ("ok", (len(new), "-rw-r--r--", _sha(new), []),
                                 {"d/big": ("reg", len(new), _sha(new))})
    assert results["pyunionfs"] == results["kernel"]


# --------------------------------------------------------------------------
# Full disk: many new files, then deleting them
# --------------------------------------------------------------------------


def test_filling_the_upper_with_new_files_then_deleting_them(
        tmp_path: Path, small_fs: Callable[..., Path], mount: Mount) -> None:
    """New files (in the root and in a lower directory) until ENOSPC: nothing but ENOSPC, every file has
    what was written; deleting them all works and leaves the lower's listing and an empty upper."""
    fs = small_fs("upfs", size="4m")
    low, up = tmp_path / "low", fs / "up"
    put(low / "a", "a")
    put(low / "sub/b", "b")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    free0 = _free(fs)
    made: dict[str, bytes] = {}
    failures: list[tuple[str, str, int]] = []
    for k in range(64):
        rel = f"f{k:02d}" if k % 2 == 0 else f"sub/f{k:02d}"
        data = _pattern(256 * KiB, k)
        try:
            fd = os.open(m / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            failures.append(("create", rel, exc.errno or -1))
            break
        n = 0
        try:
            while n < len(data):
                n += os.write(fd, data[n:n + 64 * KiB])
        except OSError as exc:
            failures.append(("write", rel, exc.errno or -1))
        made[rel] = data[:n]
        if e := errno_of(os.close, fd):
            failures.append(("close", rel, e))
        if failures:
            break
    else:
        pytest.fail(f"64 files of 256 KiB fit in a 4 MiB upper: {_free(fs)} bytes still free")
    assert all(e == errno.ENOSPC for _, _, e in failures), [(s, r, errname(e)) for s, r, e in failures]
    assert len(made) >= 8

    root = {r for r in made if "/" not in r}
    in_sub = {r.split("/")[1] for r in made if r.startswith("sub/")}
    assert sorted(os.listdir(m)) == sorted({"a", "sub"} | root)
    assert sorted(os.listdir(m / "sub")) == sorted({"b"} | in_sub)
    for rel, data in made.items():
        assert _read(m / rel) == data, f"{rel}: not what was written"
        assert os.lstat(up / rel).st_size == len(data)

    failed = {rel: errname(e) for rel in made if (e := errno_of(os.unlink, m / rel))}
    assert not failed, f"deleting new files failed: {failed}"
    assert sorted(os.listdir(m)) == ["a", "sub"]
    assert sorted(os.listdir(m / "sub")) == ["b"]
    assert upper_layout(up) == {"sub": ("dir", None)}, "deleting upper-only files left entries in the upper"
    assert work_entries(default_workdir(up)) == []
    wait_for(lambda: _free(fs) == free0, 10, "the deleted files' space to be freed")
    put(m / "sub/again", "again")
    assert (m / "sub/again").read_text() == "again"
    d.stop()


# --------------------------------------------------------------------------
# No inodes left
# --------------------------------------------------------------------------


def test_running_out_of_inodes_gives_enospc_on_create(
        tmp_path: Path, small_fs: Callable[..., Path], mount: Mount) -> None:
    """On an upper with no inode left, every create (file, dir, symlink, fifo, hard link) and a
    deletion that needs a whiteout fail with ENOSPC and leave nothing behind; freeing inodes fixes it."""
    fs = small_fs("upfs", size="4m", nr_inodes=48)
    low, up = tmp_path / "low", fs / "up"
    put(low / "lower1", "lower one")
    put(low / "dir/lf", "lf")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    made: list[str] = []
    err = 0
    for k in range(100):
        try:
            fd = os.open(m / f"n{k:02d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            err = exc.errno or -1
            break
        os.close(fd)
        made.append(f"n{k:02d}")
    assert err == errno.ENOSPC, f"creating files on an upper without inodes: {errname(err)} after {len(made)}"
    assert made, "not even one file could be created"

    attempts = {
        "create": lambda: os.close(os.open(m / "x-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
        "mkdir": lambda: os.mkdir(m / "x-dir"),
        "symlink": lambda: os.symlink("lower1", m / "x-link"),
        "mkfifo": lambda: os.mkfifo(m / "x-fifo"),
        "hard link": lambda: os.link(m / made[0], m / "x-hard"),
        "mkdir in a lower dir": lambda: os.mkdir(m / "dir/x-dir"),
        "unlink of a lower file": lambda: os.unlink(m / "lower1"),
    }
    got = {what: errname(errno_of(fn)) for what, fn in attempts.items()}
    assert got == dict.fromkeys(attempts, "ENOSPC"), got
    for name in ("x-file", "x-dir", "x-link", "x-fifo", "x-hard", "dir/x-dir"):
        assert errno_of(os.lstat, m / name) == errno.ENOENT, f"{name} exists after a failed create"
    assert (m / "lower1").read_text() == "lower one"
    assert sorted(os.listdir(m)) == sorted(["dir", "lower1", *made])
    assert sorted(os.listdir(m / "dir")) == ["lf"]
    assert sorted(k for k in upper_layout(up) if k != "dir") == made, "failed creates left entries in the upper"
    assert work_entries(default_workdir(up)) == []

    for name in made[:4]:
        os.unlink(m / name)
    wait_for(lambda: os.statvfs(fs).f_ffree >= 4, 10, "the deleted files' inodes to be freed")
    put(m / "fresh", "fresh")
    assert (m / "fresh").read_text() == "fresh"
    os.unlink(m / "lower1")
    assert errno_of(os.lstat, m / "lower1") == errno.ENOENT
    assert upper_layout(up)["lower1"] == ("whiteout",)
    assert sorted(os.listdir(m)) == sorted(["dir", "fresh", *made[4:]])
    d.stop()


# --------------------------------------------------------------------------
# Unmounting a busy mount
# --------------------------------------------------------------------------


def test_unmounting_a_busy_mount_is_refused_and_the_mount_stays(tmp_path: Path, mount: Mount) -> None:
    """With a file open inside, umount, fusermount3 -u and pyunionfs umount fail with EBUSY; nothing changes."""
    low, up = tmp_path / "low", tmp_path / "up"
    put(low / "f", "lower f")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    fd = os.open(m / "held", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before ")
        for cmd in (["umount", str(m)], ["fusermount3", "-u", str(m)], PYUNIONFS + ["umount", str(m)]):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert res.returncode != 0, f"{cmd[-2:]} unmounted a busy mount"
            assert "busy" in res.stderr.lower(), f"{cmd[-2:]}: {res.stderr!r}"
            assert is_mounted(m) and d.proc.poll() is None, f"{cmd[-2:]}: the mount or daemon went away"
        assert res.returncode == 1 and res.stderr.startswith("pyunionfs: ") and res.stderr.count("\n") == 1, (
            f"pyunionfs umount should say one line and exit 1: {res.returncode} {res.stderr!r}")
        os.write(fd, b"after")
        assert os.pread(fd, 100, 0) == b"before after"
        assert sorted(os.listdir(m)) == ["f", "held"]
    finally:
        os.close(fd)
    assert (up / "held").read_bytes() == b"before after"
    assert d.stop(how=PYUNIONFS + ["umount", str(m)]) == 0


LAZY = {
    "umount -l": ["umount", "-l"],
    "fusermount3 -u -z": ["fusermount3", "-u", "-z"],
    "pyunionfs umount -z": PYUNIONFS + ["umount", "-z"],
}


@pytest.mark.parametrize("how", list(LAZY))
def test_lazy_unmount_detaches_at_once_and_the_daemon_exits_when_the_last_file_closes(
        tmp_path: Path, mount: Mount, how: str) -> None:
    """A lazy unmount with files open: the mountpoint is free at once, the open files keep working
    (writes reach the upper), the daemon serves them and exits 0 when the last one is closed."""
    low, up = tmp_path / "low", tmp_path / "up"
    put(low / "lowfile", "lower data")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    new = os.open(m / "new", os.O_RDWR | os.O_CREAT, 0o644)
    old = os.open(m / "lowfile", os.O_RDWR)  # copied up now
    cmd = None
    try:
        os.write(new, b"before ")
        cmd = subprocess.Popen(LAZY[how] + [str(m)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        # (Whether the command itself returns at once: see the fusectl test below.)
        wait_for(lambda: find_mount(os.fsencode(str(m))) is None, 10, f"{how} to detach the mount")
        assert os.listdir(m) == [], "the mountpoint should show its own (empty) directory at once"
        assert d.proc.poll() is None, "the daemon exited while files of its mount were still open"
        os.write(new, b"after")
        assert os.pread(new, 100, 0) == b"before after"
        assert os.fstat(new).st_size == len(b"before after")
        os.pwrite(old, b"LOWER", 0)
        os.fsync(old)
        assert (up / "new").read_bytes() == b"before after", "a write after the detach did not reach the upper"
        assert (up / "lowfile").read_bytes() == b"LOWER data"
        os.close(new)
        new = -1
        assert d.proc.poll() is None
    finally:
        for fd in (new, old):
            if fd >= 0:
                os.close(fd)
    assert d.proc.wait(timeout=30) == 0, f"the daemon exited with {d.proc.returncode}:\n{d.log_text()}"
    out, err = cmd.communicate(timeout=60)
    assert cmd.returncode == 0 and err == "", f"{how}: {cmd.returncode} {err!r}"
    assert (low / "lowfile").read_text() == "lower data"
    assert d.stop() == 0  # the log has no traceback


# Runs in a private mount namespace with fusectl mounted (as on many systems):
# the daemon, a file held open, ``pyunionfs umount -z`` given 5 s to return.
_LAZY_WITH_FUSECTL = r"""
import json, os, subprocess, sys, time
from pyunionfs.fuse.mountinfo import find_mount
low, up, mnt, pidfile, log = sys.argv[1:6]
conns = "/sys/fs/fuse/connections"
with open("/proc/self/mounts") as f:
    if not any(line.split()[1] == conns for line in f):
        subprocess.run(["mount", "-t", "fusectl", "none", conns], check=True)
out = {}
with open(log, "wb") as lf:
    daemon = subprocess.Popen([sys.executable, "-m", "pyunionfs", "mount", low, up, mnt, "-f"],
                              stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
with open(pidfile, "w") as f:
    f.write(str(daemon.pid))
point = os.fsencode(mnt)
try:
    deadline = time.monotonic() + 20
    while find_mount(point) is None:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the mount did not appear")
        time.sleep(0.01)
    out["connection"] = os.path.isdir(os.path.join(conns, find_mount(point)[1].split(":")[1]))
    fd = os.open(os.path.join(mnt, "held"), os.O_RDWR | os.O_CREAT, 0o644)
    t0 = time.monotonic()
    umount = subprocess.Popen([sys.executable, "-m", "pyunionfs", "umount", "-z", mnt],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        umount.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    out["returned while the file is open"] = umount.poll() is not None
    out["detached"] = find_mount(point) is None
    os.close(fd)
    out["umount status"] = umount.wait(timeout=60)
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["daemon status"] = daemon.wait(timeout=30)
finally:
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait()
    if find_mount(point) is not None:
        subprocess.run(["umount", "-l", mnt])
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_pyunionfs_lazy_umount_returns_at_once_when_fusectl_is_mounted(tmp_path: Path) -> None:
    """``pyunionfs umount -z`` detaches and returns at once with a file open, also where the connection
    directories it watches exist (fusectl mounted: here in a private mount namespace)."""
    low, up, mnt = tmp_path / "low", tmp_path / "up", tmp_path / "mnt"
    put(low / "f", "f")
    up.mkdir()
    mnt.mkdir()
    pidfile, log = tmp_path / "daemon.pid", tmp_path / "daemon.log"
    try:
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                              _LAZY_WITH_FUSECTL, str(low), str(up), str(mnt), str(pidfile), str(log)],
                             capture_output=True, text=True, timeout=100, cwd=ROOT, stdin=subprocess.DEVNULL)
    finally:
        _kill_if_ours(pidfile, mnt)
    assert res.returncode == 0, res.stdout + res.stderr + log.read_text(errors="replace")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    seconds = out.pop("seconds")
    assert out == {"connection": True, "returned while the file is open": True, "detached": True,
                   "umount status": 0, "daemon status": 0}, f"{out}, {seconds} s"


def _kill_if_ours(pidfile: Path, mnt: Path) -> None:
    """SIGKILL the daemon started in the namespace, if it is still running (its mount dies with it)."""
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if b"pyunionfs" in cmdline and os.fsencode(str(mnt)) in cmdline:
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# A killed daemon
# --------------------------------------------------------------------------

CLEAR_DEAD = {
    "pyunionfs umount": PYUNIONFS + ["umount"],
    "fusermount3 -u": ["fusermount3", "-u"],
    "umount": ["umount"],
}


def _killed(d: Daemon) -> None:
    """SIGKILL the daemon; its mount stays, answering ENOTCONN."""
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    m = d.mnt
    assert is_mounted(m), "the dead daemon's mount went away by itself"
    assert dead_mount_errno(m / "kept") == errno.ENOTCONN
    for what, fn in (("stat", lambda: os.stat(m / "kept")), ("listdir", lambda: os.listdir(m)),
                     ("open", lambda: os.close(os.open(m / "kept", os.O_RDONLY)))):
        assert errno_of(fn) == errno.ENOTCONN, f"{what} on a dead mount: {errname(errno_of(fn))}, not ENOTCONN"


@pytest.mark.parametrize("how", list(CLEAR_DEAD))
def test_a_killed_daemons_mount_is_cleared_by_a_plain_unmount_and_can_be_remounted(
        tmp_path: Path, mount: Mount, how: str) -> None:
    """After kill -9, ENOTCONN; ``pyunionfs umount``, ``fusermount3 -u`` or ``umount`` (not lazy) clears
    the mount at once; mounting the same upper again shows what was fsynced."""
    low, up = tmp_path / "low", tmp_path / "up"
    put(low / "lowfile", "lower")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    with open(m / "kept", "xb") as f:
        f.write(b"kept data")
        f.flush()
        os.fsync(f.fileno())
    _killed(d)
    res = subprocess.run(CLEAR_DEAD[how] + [str(m)], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stderr == "", f"{how} on a dead mount: {res.returncode} {res.stderr!r}"
    assert find_mount(os.fsencode(str(m))) is None, f"{how} left the dead mount in place"
    assert os.listdir(m) == []
    d.stop(check=False)  # nothing left to unmount; forgets the log of the killed daemon

    d2 = mount([low], up, mnt=m)
    assert sorted(os.listdir(m)) == ["kept", "lowfile"]
    assert (m / "kept").read_bytes() == b"kept data"
    assert work_entries(default_workdir(up)) == []
    d2.stop()


def test_a_killed_daemons_busy_mount_needs_a_lazy_pyunionfs_umount(tmp_path: Path, mount: Mount) -> None:
    """kill -9 while a directory of the mount is open (a shell inside it): ``pyunionfs umount`` says
    busy in one line, ``pyunionfs umount -z`` clears it; the open descriptor then gets ENOTCONN."""
    low, up = tmp_path / "low", tmp_path / "up"
    put(low / "kept", "kept")
    up.mkdir()
    d = mount([low], up)
    m = d.mnt
    held = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _killed(d)
        res = subprocess.run(PYUNIONFS + ["umount", str(m)], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 1 and res.stderr.startswith("pyunionfs: ") and res.stderr.count("\n") == 1, (
            f"{res.returncode} {res.stderr!r}")
        assert "busy" in res.stderr and is_mounted(m)
        res = subprocess.run(PYUNIONFS + ["umount", "-z", str(m)], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 0 and res.stderr == "", f"{res.returncode} {res.stderr!r}"
        assert find_mount(os.fsencode(str(m))) is None
        assert errno_of(os.listdir, held) == errno.ENOTCONN
    finally:
        os.close(held)
    d.stop(check=False)
    d2 = mount([low], up, mnt=m)
    assert os.listdir(m) == ["kept"]
    d2.stop()
