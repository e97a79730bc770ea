"""Shared helpers for the write-path acceptance tests (tests/mount/test_write_*.py).

Why a module of its own: the write tests run every scenario twice -- once on
the kernel's overlayfs, to prove that the expected values are what a real
overlay does, and once on pyunionfs -- and they need the same small tools
for it: errno capture that turns a call into a comparable value, big files
that take real time to copy, a look into the work directory and the upper
layer as they are on disk, a way to kill a daemon and clear its dead mount,
and a way to run a step as an unprivileged user.

Nothing here knows pyunionfs internals beyond what its specification fixes:
the default work directory is ``<dirname(UPPER)>/.<basename(UPPER)>.pyunionfs-work``
with ``work/`` for temporaries and ``index/`` for the hardlink index.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.layergen import Stack, kernel_mount, kernel_umount
from tests.support.layergen import is_mounted as something_mounted
from tests.support.mounting import Daemon, dead_mount_errno

__all__ = [
    "MiB",
    "GiB",
    "default_workdir",
    "errname",
    "errno_of",
    "fill_file",
    "kernel_overlay",
    "kill_daemon",
    "layer_state",
    "public_dir",
    "put",
    "run_as",
    "sha256_file",
    "temporaries",
    "upper_layout",
    "wait_for",
    "whiteout",
    "work_entries",
]

MiB = 1 << 20
GiB = 1 << 30
#: The overlay xattr that marks an opaque directory in the upper (trusted namespace).
OPAQUE = "trusted.overlay.opaque"


def default_workdir(upper: Path) -> Path:
    """Where pyunionfs keeps its work directory when ``-o workdir`` is not given (from the spec)."""
    return upper.parent / f".{upper.name}.pyunionfs-work"


def errno_of(fn: Callable[..., object], *args: Any, **kw: Any) -> int:
    """0 if ``fn(*args)`` succeeds, else its errno: makes outcomes comparable between two mounts."""
    try:
        fn(*args, **kw)
    except OSError as exc:
        return exc.errno or -1
    return 0


def errname(n: int) -> str:
    """``EPERM`` for 1, ``ok`` for 0: readable assertion messages."""
    return "ok" if n == 0 else errno.errorcode.get(n, str(n))


def sha256_file(path: Path | bytes | str, noatime: bool = False) -> str:
    """sha256 of a file's data (``noatime``: for layer files, so that hashing them changes nothing)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOATIME if noatime else 0)
    fd = os.open(path, flags)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 4 * MiB):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def fill_file(path: Path, size: int, mode: int = 0o644) -> str:
    """Write *size* bytes of incompressible, hole-free data, fsync it, return its sha256.

    Why: a copy-up must take real time for crash and concurrency tests, so
    the data is random (nothing can share or compress it) and every block is
    written (no holes to skip).  One random MiB is reused with a per-MiB
    counter so that generating 1 GiB costs no more than writing it, while a
    copy that puts a block at the wrong offset still changes the hash.
    """
    block = bytearray(os.urandom(MiB))
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        done = 0
        i = 0
        while done < size:
            block[:8] = i.to_bytes(8, "little")
            view = memoryview(block)[: min(MiB, size - done)]
            h.update(view)
            while view:
                view = view[os.write(fd, view) :]
            done += min(MiB, size - done)
            i += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)
    return h.hexdigest()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Poll *cond* until it returns something truthy (returned); fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def work_entries(workdir: Path) -> list[str]:
    """Names in the work directory's ``work/`` subdir ([] if it does not exist)."""
    try:
        return sorted(os.listdir(workdir / "work"))
    except FileNotFoundError:
        return []


def temporaries(pid: int, workdir: Path) -> dict[str, int]:
    """Temporaries the process *pid* is filling in *workdir*: ``{name: bytes allocated}``.

    Looks both at the names in ``workdir`` (named temporaries) and at the
    process's open descriptors (an ``O_TMPFILE`` temporary has no name but
    shows as ``workdir/... (deleted)`` in /proc).  Allocated bytes
    (``st_blocks``) rather than ``st_size``, so that a temporary made with
    ftruncate or fallocate up front is not mistaken for a full one.
    """
    found: dict[str, int] = {}
    root = os.path.realpath(workdir)
    for dirpath, _dirs, files in os.walk(workdir):
        for name in files:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    found[os.path.relpath(p, workdir)] = st.st_blocks * 512
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(root + "/"):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    if stat.S_ISREG(st.st_mode):
                        found[os.path.relpath(target, root)] = st.st_blocks * 512
    return found


def kill_daemon(d: Daemon) -> None:
    """SIGKILL the pyunionfs daemon and clear its dead mount, as a crash would leave it.

    Checks on the way what a user would see: the mount answers ENOTCONN
    until it is detached, and after ``umount -l`` nothing is mounted there.
    The daemon's log is discarded (a killed daemon has no exit status to
    check), so the ``mount`` fixture does not try to stop it again.
    """
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    try:
        code = dead_mount_errno(d.mnt / "anything")
        assert code == errno.ENOTCONN, f"a dead mount should answer ENOTCONN, not {errno.errorcode.get(code, code)}"
    finally:
        d.stop(check=False)  # umount -l, waits, forgets the log
    assert not something_mounted(d.mnt), f"{d.mnt} is still mounted after the daemon was killed"


@contextlib.contextmanager
def kernel_overlay(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                   options: Sequence[str] = ()) -> Iterator[Path]:
    """The kernel's overlayfs over these layers at *mnt*, always unmounted afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    kernel_mount(Stack(lowers=tuple(lowers), upper=upper, work=work), mnt, options)
    try:
        yield mnt
    finally:
        kernel_umount(mnt)


def on_kernel_and_ours(tmp_path: Path, mount: Callable[..., Daemon], build: Callable[[Path], object],
                       story: Callable[[Path], Any], mnt_parent: Path | None = None,
                       kernel_options: Sequence[str] = ()) -> dict[str, Any]:
    """Run *story(mnt)* on the kernel's overlayfs and on pyunionfs over the same one-lower stack.

    *kernel_options* go to the kernel's mount (``index=on`` where lower hard links must stay one
    file across copy-up, as pyunionfs always keeps them).

    *build(lower)* fills the lower (each side gets its own copy, made the same way).  The layers
    stay at ``tmp_path/SIDE/{low,up}`` for the caller's checks of the upper layout; the returned
    dict maps "kernel" and "pyunionfs" to what *story* returned.  The mountpoints are
    ``MNT_PARENT/SIDE`` when given (e.g. a :func:`public_dir`, for steps run as another user).
    """
    results: dict[str, Any] = {}
    for side in ("kernel", "pyunionfs"):
        low, up = tmp_path / side / "low", tmp_path / side / "up"
        mnt = (mnt_parent or tmp_path / side) / (side if mnt_parent else "mnt")
        low.mkdir(parents=True, exist_ok=True)
        build(low)
        up.mkdir()
        mnt.mkdir(exist_ok=True)
        if side == "kernel":
            with kernel_overlay([low], up, tmp_path / side / "work", mnt, kernel_options) as m:
                results[side] = story(m)
        else:
            d = mount([low], up, mnt=mnt)
            results[side] = story(d.mnt)
            d.stop()
    return results


@contextlib.contextmanager
def public_dir(prefix: str = "pyunionfs-pub-") -> Iterator[Path]:
    """An empty 0755 directory that any user can reach (pytest's tmp_path is 0700).

    Why: ownership and permission tests run steps as uid 1000, which must be
    able to walk to the mountpoint.  Whatever is still mounted on it at the
    end is detached before it is removed.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for child in sorted(path.iterdir(), reverse=True):
            if something_mounted(child):
                subprocess.run(["umount", "-l", str(child)], capture_output=True, timeout=30)
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()


_RUN_AS = r"""
import errno, json, os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
os.umask(0o022)
out = {}
def err(fn, *a):
    try:
        fn(*a)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"
def mkfile(p, data=b"x"):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.write(fd, data)
    os.close(fd)
def openw(p):
    os.close(os.open(p, os.O_WRONLY))
m = sys.argv[3]
"""


def run_as(uid: int, gid: int, mnt: Path, body: str, timeout: float = 30) -> dict[str, Any]:
    """Run Python *body* as *uid*/*gid* (no supplementary groups, umask 022); return its ``out`` dict.

    Why a child process: permission checks and ownership of new entries
    depend on the calling process's credentials, and the test process must
    stay root.  *body* sees ``m`` (the mount path, str), ``out`` (a dict it
    fills; JSON-serialisable values), ``err(fn, *args)`` -> ``"ok"`` or the
    errno name, ``mkfile(path, data)`` and ``openw(path)``.
    """
    code = _RUN_AS + body + "\nprint(json.dumps(out))\n"
    res = subprocess.run([sys.executable, "-c", code, str(uid), str(gid), str(mnt)],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"step as {uid}:{gid} failed:\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def upper_layout(upper: Path) -> dict[str, tuple[Any, ...]]:
    """The upper layer as stored on disk, in the terms overlayfs defines.

    ``{relative path: (kind, detail)}`` where a whiteout is ``("whiteout",)``
    (char device 0/0), a directory is ``("dir", opaque)`` with the value of
    ``trusted.overlay.opaque`` (or None), a regular file is
    ``("reg", size, sha256)``, and anything else ``(kind,)``.  Other
    ``trusted.overlay.*`` xattrs (origin, impure, uuid...) and link counts are
    bookkeeping that may legitimately differ and are left out.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(upper):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, upper)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out[rel] = ("whiteout",)
            elif stat.S_ISDIR(st.st_mode):
                try:
                    opaque: bytes | None = os.getxattr(p, OPAQUE, follow_symlinks=False)
                except OSError:
                    opaque = None
                out[rel] = ("dir", opaque)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("reg", st.st_size, sha256_file(p, noatime=True))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("lnk", os.readlink(p))
            else:
                out[rel] = (stat.filemode(st.st_mode)[0],)
    return out


def layer_state(layer: Path) -> dict[str, tuple[Any, ...]]:
    """Everything of a layer a write path could disturb (contents, mode, owner, times, xattrs).

    Why: lower layers must never be modified; comparing this before and
    after a test catches any write, chmod, utime or xattr change (ctime is
    included: it moves on every metadata change).  Regular files are read
    with O_NOATIME so that the check itself changes nothing.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(layer):
        for name in [".", *dirs, *files] if dirpath == str(layer) else [*dirs, *files]:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            body = sha256_file(p, noatime=True) if stat.S_ISREG(st.st_mode) else ""
            xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                  for n in os.listxattr(p, follow_symlinks=False)))
            out[os.path.relpath(p, layer)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                              st.st_ctime_ns, st.st_nlink, body, xattrs)
    return out


def put(path: Path, data: bytes | str = b"", mode: int | None = None) -> Path:
    """Create a file (and its parents) in a layer being built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def whiteout(path: Path) -> None:
    """A kernel-format whiteout (char device 0/0) in a layer being built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
