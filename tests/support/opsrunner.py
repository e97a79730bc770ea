"""Filesystem operations run inside a mount by helper processes, for differential tests.

The write-path differential test applies the same operation to two mounts (the
kernel's overlayfs and pyunionfs) and requires the same outcome.  The
operations do not run in the test process but in small executor processes,
one or more per mount, each ``chroot()``-ed into its mount.  Why:

* **Safety.**  The random layers contain symlinks such as ``etc -> /etc`` and
  ``../../../../nowhere``.  ``open("MNT/etc/passwd", O_TRUNC)`` issued by the
  test would follow ``etc`` out of the mount and truncate the host's
  ``/etc/passwd``.  Inside a chroot every path, absolute symlinks and ``..``
  included, resolves inside the mount, and it does so identically on both
  sides, so operations may follow symlinks like ordinary programs do.
* **Several processes.**  A descriptor opened by one executor (a *slot*)
  stays open while another executor renames, unlinks or copies up the file:
  this is how the test checks what one process sees of another's changes.
* **Descriptors kept across steps.**  A slot stays open between requests, so
  that later requests use it after its name was unlinked, renamed over or
  re-created: what the descriptor reaches then (``slot_f*xattr``,
  ``slot_fstat_vs``, ``slot_setfl_write``, ``slot_reopen`` and
  ``slot_proc_chmod``, the last two through ``/proc/self/fd/N``) is the
  object it was opened on, not whatever the name now holds.  ``/proc`` is
  not inside the chroot: a descriptor of it is opened before entering.
* **Hangs.**  A stuck FUSE request blocks only an executor; :meth:`Executor.call`
  times out, kills it (FUSE requests are killable) and names the operation.

Outcomes are plain, picklable data comparable with ``==`` across two mounts:
``("ok", value)``, ``("err", "ENOENT")``, or ``("exc", text)`` for a bug in
this harness.  Values never contain what legitimately differs between two
filesystems: descriptor numbers, inode and device numbers, and times the
kernel set to "now" (shown as ``now``, see :class:`_State.norm`).  The
executor imports only the standard library, so it starts in ~30 ms and never
imports anything after entering the chroot.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import pickle
import platform
import select
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RENAME_WHITEOUT",
    "UTIME_NOW",
    "UTIME_OMIT",
    "Executor",
    "ExecutorError",
    "Outcome",
    "digest",
    "serve",
]

Outcome = tuple[Any, ...]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
#: renameat2(2) syscall numbers, used only if libc lacks the wrapper.
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "i686": 353, "armv7l": 382}
#: Times within this margin of the example's start (or later) count as "set to now".
_NOW_MARGIN_NS = 5 * 10**9
_READ_LIMIT = 4 << 20
_REPO = Path(__file__).resolve().parents[2]

# Same table as tests/support/treesnap.py: repeated on purpose, the executor
# imports nothing but the standard library (see the module docstring).
_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def errname(n: int | None) -> str:
    return errno.errorcode.get(n or 0, str(n))


def digest(data: bytes) -> str:
    """Short, comparable rendering of file contents (tiny contents are shown as is)."""
    if len(data) <= 16:
        return repr(data)
    return f"<{len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:16]}>"


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), f"0o{stat.S_IFMT(mode):o}")


def _try(fn: Callable[..., Any], *args: Any) -> Outcome:
    """One sub-step of a compound operation, as an outcome (errors do not stop the others)."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errname(e.errno))


# --------------------------------------------------------------------------
# Executor side (runs chrooted in the mount)
# --------------------------------------------------------------------------


def _p(rel: bytes) -> bytes:
    """Relative path of the model -> absolute path inside the chroot (the mount's root)."""
    return b"/" if rel in (b".", b"") else b"/" + rel


class _State:
    """What an executor keeps between requests: open descriptors (slots) and the clock origin."""

    def __init__(self, t0_ns: int) -> None:
        self.t0_ns = t0_ns
        self.slots: dict[int, int] = {}
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.renameat2 = getattr(self.libc, "renameat2", None)
        self.sys_renameat2 = _SYS_RENAMEAT2.get(platform.machine())
        # Opened before the chroot (see serve): /proc/self/fd/N is reached as
        # "self/fd/N" relative to it, the mount has no /proc of its own.
        self.proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def is_now(self, t_ns: int) -> bool:
        return self.t0_ns - _NOW_MARGIN_NS <= t_ns <= time.time_ns() + _NOW_MARGIN_NS

    def norm(self, st: os.stat_result) -> str:
        """Everything comparable about a stat result, as one readable string.

        Left out: inode and device numbers, atime and ctime (they differ between
        any two filesystems), directory sizes and directory link counts (treesnap
        ignores them too: overlayfs reports 1 for merged directories and the
        real count for the others, which depends on the layer filesystem).
        mtime is exact when it was not set by the clock during this example
        (copied from a layer, or set explicitly), else ``now``.
        """
        kind = _kind(st.st_mode)
        out = f"{kind} 0o{stat.S_IMODE(st.st_mode):o} {st.st_uid}:{st.st_gid}"
        if kind != "dir":
            mtime = "now" if self.is_now(st.st_mtime_ns) else str(st.st_mtime_ns)
            out += f" size={st.st_size} nlink={st.st_nlink} mtime={mtime}"
        if kind in ("chr", "blk"):
            out += f" rdev={os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return out

    def slot(self, n: int) -> int:
        if n not in self.slots:
            raise OSError(errno.EBADF, "slot not open")
        return self.slots[n]

    def proc_link(self, n: int) -> str:
        """``/proc/self/fd/N`` of slot *n*, relative to :attr:`proc_fd` (use with ``dir_fd=``)."""
        return f"self/fd/{self.slot(n)}"


def _lstat_or_none(p: bytes) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except OSError:
        return None


def _ino_kept(before: os.stat_result | None, p: bytes) -> bool | None:
    """Whether a non-directory kept its st_ino across an operation (None: not applicable).

    Why: a copy-up must not change a file's inode number (the kernel keeps
    the lower one when all layers share a filesystem, and so must pyunionfs).
    """
    after = _lstat_or_none(p)
    if before is None or after is None or stat.S_ISDIR(before.st_mode):
        return None
    if stat.S_IFMT(before.st_mode) != stat.S_IFMT(after.st_mode):
        return None
    return before.st_ino == after.st_ino


def _read_all(fd: int, offset: int = 0) -> bytes:
    chunks = []
    total = 0
    while total < _READ_LIMIT:
        chunk = os.pread(fd, 1 << 20, offset + total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


_NAMED_FLAGS = {
    "RENAME_NOREPLACE": RENAME_NOREPLACE,
    "RENAME_EXCHANGE": RENAME_EXCHANGE,
    "RENAME_WHITEOUT": RENAME_WHITEOUT,
}


def _flags(spec: str | int) -> int:
    """``"O_WRONLY|O_CREAT"`` -> int.  Flags travel as names so that reports and reproductions read well."""
    if isinstance(spec, int):
        return spec
    out = 0
    for name in spec.split("|"):
        name = name.strip()
        if name not in ("", "0"):
            out |= _NAMED_FLAGS[name] if name in _NAMED_FLAGS else getattr(os, name)
    return out


def _open(p: bytes, flags: int, mode: int = 0o644) -> int:
    # O_NONBLOCK: opening a FIFO for writing must fail (ENXIO) rather than hang.
    return os.open(p, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)


def op_stat(s: _State, path: bytes, follow: bool) -> str:
    return s.norm(os.stat(_p(path), follow_symlinks=follow))


def op_listdir(s: _State, path: bytes) -> tuple[tuple[bytes, Outcome], ...]:
    """Sorted names with the type lstat gives each (or its errno)."""
    p = _p(path)
    with os.scandir(p) as it:
        names = sorted(e.name for e in it)
    base = p.rstrip(b"/")
    return tuple((n, _try(lambda q: _kind(os.lstat(q).st_mode), base + b"/" + n)) for n in names)


def op_readlink(s: _State, path: bytes) -> bytes:
    return os.readlink(_p(path))


def op_create(s: _State, path: bytes, flag_names: str, mode: int, data: bytes) -> tuple[Any, ...]:
    p = _p(path)
    flags = _flags(flag_names)
    before = _lstat_or_none(p)
    fd = _open(p, flags, mode)
    try:
        wrote = _try(os.write, fd, data) if data and flags & os.O_ACCMODE != os.O_RDONLY else None
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return wrote, s.norm(st), _ino_kept(before, p)


def op_write(s: _State, path: bytes, how: str, offset: int, data: bytes) -> tuple[Any, ...]:
    """Write through a fresh descriptor: ``pwrite`` at offset, ``seek`` + write, or ``append``."""
    p = _p(path)
    before = _lstat_or_none(p)
    fd = _open(p, os.O_WRONLY | (os.O_APPEND if how == "append" else 0))
    try:
        if how == "pwrite":
            n = os.pwrite(fd, data, offset)
        elif how == "seek":
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, data)
        else:
            n = os.write(fd, data)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return n, s.norm(st), _ino_kept(before, p)


def op_truncate(s: _State, path: bytes, size: int, via_fd: bool) -> tuple[Any, ...]:
    p = _p(path)
    before = _lstat_or_none(p)
    if via_fd:
        fd = _open(p, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            st = os.fstat(fd)
        finally:
            os.close(fd)
    else:
        os.truncate(p, size)
        st = os.stat(p)
    return s.norm(st), _ino_kept(before, p)


def op_read(s: _State, path: bytes, offset: int, nofollow: bool) -> tuple[Any, ...]:
    fd = _open(_p(path), os.O_RDONLY | (os.O_NOFOLLOW if nofollow else 0))
    try:
        st = os.fstat(fd)
        return s.norm(st), digest(_read_all(fd, offset))
    finally:
        os.close(fd)


def op_mmap_write(s: _State, path: bytes, offset: int, data: bytes) -> tuple[Any, ...]:
    """Write through a shared writable mapping, msync, unmap, then read back with read(2)."""
    p = _p(path)
    before = _lstat_or_none(p)
    fd = _open(p, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return ("empty file: nothing to map",)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            off = offset % size
            chunk = data[: size - off]
            mm[off : off + len(chunk)] = chunk
            mm.flush()
    finally:
        os.close(fd)
    fd = _open(p, os.O_RDONLY)
    try:
        back = _read_all(fd)
    finally:
        os.close(fd)
    return size, off, len(chunk), digest(back), _ino_kept(before, p)


def op_mkdir(s: _State, path: bytes, mode: int) -> str:
    os.mkdir(_p(path), mode)
    return s.norm(os.lstat(_p(path)))


def op_rmdir(s: _State, path: bytes) -> None:
    os.rmdir(_p(path))


def op_unlink(s: _State, path: bytes) -> None:
    os.unlink(_p(path))


def op_mkfifo(s: _State, path: bytes, mode: int) -> str:
    os.mkfifo(_p(path), mode)
    return s.norm(os.lstat(_p(path)))


def op_mknod(s: _State, path: bytes, mode: int, major: int, minor: int) -> str:
    os.mknod(_p(path), mode, os.makedev(major, minor))
    return s.norm(os.lstat(_p(path)))


def op_symlink(s: _State, target: bytes, path: bytes) -> tuple[Any, ...]:
    os.symlink(target, _p(path))
    return os.readlink(_p(path)), s.norm(os.lstat(_p(path)))


def op_link(s: _State, src: bytes, dst: bytes, follow: bool) -> tuple[Any, ...]:
    os.link(_p(src), _p(dst), follow_symlinks=follow)
    return s.norm(os.lstat(_p(dst))), _try(lambda: s.norm(os.lstat(_p(src))))


def op_rename(s: _State, src: bytes, dst: bytes, flag_names: str) -> tuple[Any, ...]:
    flags = _flags(flag_names)
    if flags == 0:
        os.rename(_p(src), _p(dst))
    else:
        if s.renameat2 is not None:
            rc = s.renameat2(AT_FDCWD, _p(src), AT_FDCWD, _p(dst), ctypes.c_uint(flags))
        elif s.sys_renameat2 is not None:
            rc = s.libc.syscall(s.sys_renameat2, AT_FDCWD, _p(src), AT_FDCWD, _p(dst), ctypes.c_uint(flags))
        else:  # pragma: no cover - exotic architecture
            raise RuntimeError(f"no renameat2 on {platform.machine()}")
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return _try(lambda: s.norm(os.lstat(_p(src)))), _try(lambda: s.norm(os.lstat(_p(dst))))


def op_chmod(s: _State, path: bytes, mode: int) -> tuple[Any, ...]:
    p = _p(path)
    before = _lstat_or_none(p)
    os.chmod(p, mode)
    return s.norm(os.stat(p)), _ino_kept(before, p)


def op_chown(s: _State, path: bytes, uid: int, gid: int, follow: bool) -> tuple[Any, ...]:
    p = _p(path)
    before = _lstat_or_none(p)
    os.chown(p, uid, gid, follow_symlinks=follow)
    return s.norm(os.stat(p, follow_symlinks=follow)), _ino_kept(before, p)


def op_utimens(
    s: _State, path: bytes, atime: tuple[Any, ...], mtime: tuple[Any, ...], follow: bool, via_os_utime: bool
) -> tuple[Any, ...]:
    """utimensat(2) with each time ``("set", sec, nsec)``, ``("omit",)`` or ``("now",)``.

    Why ctypes: os.utime cannot express UTIME_OMIT (it is used, if asked,
    when both times are explicit).  The result reports, per time, the exact
    value for "set", ``kept``/``changed`` for "omit", and ``now`` (or the
    surprising value) for "now", so the outcome is comparable between mounts
    although "now" differs.
    """
    p = _p(path)
    before = _lstat_or_none(p)
    st0 = _try(lambda: os.stat(p, follow_symlinks=follow))
    if via_os_utime and atime[0] == mtime[0] == "set":
        ns = (atime[1] * 10**9 + atime[2], mtime[1] * 10**9 + mtime[2])
        os.utime(p, ns=ns, follow_symlinks=follow)
    else:
        times = (_Timespec * 2)()
        for i, spec in enumerate((atime, mtime)):
            if spec[0] == "set":
                times[i].tv_sec, times[i].tv_nsec = spec[1], spec[2]
            else:
                times[i].tv_sec, times[i].tv_nsec = 0, UTIME_OMIT if spec[0] == "omit" else UTIME_NOW
        if s.libc.utimensat(AT_FDCWD, p, times, 0 if follow else AT_SYMLINK_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    st1 = os.stat(p, follow_symlinks=follow)

    def judge(spec: tuple[Any, ...], old: int | None, new: int) -> object:
        if spec[0] == "set":
            return new
        if spec[0] == "omit":
            return "kept" if new == old else f"changed {old} -> {new}"
        return "now" if s.is_now(new) else new

    old_a = st0[1].st_atime_ns if st0[0] == "ok" else None
    old_m = st0[1].st_mtime_ns if st0[0] == "ok" else None
    return judge(atime, old_a, st1.st_atime_ns), judge(mtime, old_m, st1.st_mtime_ns), _ino_kept(before, p)


def _check_xattr_flags(get: Callable[[], bytes], flags: int) -> None:
    """XATTR_CREATE/REPLACE checked first, as pyfuse3 does before calling a
    filesystem's setxattr (the kernel's overlayfs would copy up first): see
    the differential test's notes.  The same on both sides."""
    if not flags:
        return
    try:
        get()
    except OSError as exc:
        if exc.errno != errno.ENODATA or flags == os.XATTR_REPLACE:
            raise
    else:
        if flags == os.XATTR_CREATE:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))


def op_setxattr(s: _State, path: bytes, name: str, value: bytes, flags: int, follow: bool) -> bool | None:
    p = _p(path)
    before = _lstat_or_none(p)
    _check_xattr_flags(lambda: os.getxattr(p, name, follow_symlinks=follow), flags)
    os.setxattr(p, name, value, flags, follow_symlinks=follow)
    return _ino_kept(before, p)


def op_removexattr(s: _State, path: bytes, name: str, follow: bool) -> bool | None:
    p = _p(path)
    before = _lstat_or_none(p)
    os.removexattr(p, name, follow_symlinks=follow)
    return _ino_kept(before, p)


def op_getxattr(s: _State, path: bytes, name: str, follow: bool) -> tuple[Outcome, tuple[tuple[str, Outcome], ...]]:
    """The value of *name*, and the value of every name listxattr shows."""
    p = _p(path)
    listed = sorted(os.listxattr(p, follow_symlinks=follow))
    values = tuple((n, _try(lambda n: os.getxattr(p, n, follow_symlinks=follow), n)) for n in listed)
    return _try(lambda: os.getxattr(p, name, follow_symlinks=follow)), values


def op_listxattr(s: _State, path: bytes, follow: bool) -> tuple[str, ...]:
    return tuple(sorted(os.listxattr(_p(path), follow_symlinks=follow)))


def op_open_unlink(s: _State, path: bytes, create: bool, data: bytes) -> tuple[Any, ...]:
    """Open, unlink the name, then use the descriptor: an unlinked open file must stay usable.

    fstat through the descriptor must then report st_nlink 0.
    """
    p = _p(path)
    fd = _open(p, os.O_RDWR | (os.O_CREAT if create else 0), 0o640)
    try:
        steps = (
            _try(os.unlink, p),
            _try(os.pwrite, fd, data, 0),
            _try(lambda: s.norm(os.fstat(fd))),
            _try(lambda: digest(_read_all(fd))),
            _try(os.fsync, fd),
            _try(os.fdatasync, fd),
            _try(lambda: s.norm(os.lstat(p))),
        )
    finally:
        os.close(fd)
    return steps


def op_fsync(s: _State, path: bytes, how: str) -> None:
    """fsync/fdatasync of a file opened read-only or write-only, or fsync of a directory."""
    flags = {"ro": os.O_RDONLY, "wo": os.O_WRONLY, "wo-data": os.O_WRONLY, "dir": os.O_RDONLY | os.O_DIRECTORY}[how]
    fd = _open(_p(path), flags)
    try:
        if how == "wo-data":
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def op_empty_dir(s: _State, path: bytes, then_rmdir: bool) -> tuple[Any, ...]:
    """Delete everything below *path* (depth first, never following symlinks), then maybe rmdir it.

    Why: random single unlinks rarely empty a merged directory; this reaches
    "rmdir of a merged directory whose merged view is empty" (the upper holds
    only whiteouts) and, followed by mkdir, an opaque directory.
    """
    failures: list[tuple[bytes, str]] = []

    def clear(d: bytes, rel: bytes) -> None:
        with os.scandir(d) as it:
            names = sorted(e.name for e in it)
        for name in names:
            q, r = d.rstrip(b"/") + b"/" + name, rel + b"/" + name if rel else name
            try:
                if stat.S_ISDIR(os.lstat(q).st_mode):
                    clear(q, r)
                    os.rmdir(q)
                else:
                    os.unlink(q)
            except OSError as e:
                failures.append((r, errname(e.errno)))

    clear(_p(path), b"")
    rm = _try(os.rmdir, _p(path)) if then_rmdir else None
    return tuple(failures), rm


def op_slot_open(s: _State, slot: int, path: bytes, flag_names: str, mode: int) -> str:
    if slot in s.slots:
        os.close(s.slots.pop(slot))
    fd = _open(_p(path), _flags(flag_names), mode)
    s.slots[slot] = fd
    return s.norm(os.fstat(fd))


def op_slot_pwrite(s: _State, slot: int, offset: int, data: bytes) -> int:
    return os.pwrite(s.slot(slot), data, offset)


def op_slot_write(s: _State, slot: int, data: bytes) -> int:
    return os.write(s.slot(slot), data)


def op_slot_pread(s: _State, slot: int, offset: int) -> str:
    return digest(_read_all(s.slot(slot), offset))


def op_slot_fstat(s: _State, slot: int) -> str:
    return s.norm(os.fstat(s.slot(slot)))


def op_slot_ftruncate(s: _State, slot: int, size: int) -> str:
    os.ftruncate(s.slot(slot), size)
    return s.norm(os.fstat(s.slot(slot)))


def op_slot_fsync(s: _State, slot: int, data_only: bool) -> None:
    (os.fdatasync if data_only else os.fsync)(s.slot(slot))


def op_slot_fchmod(s: _State, slot: int, mode: int) -> str:
    os.fchmod(s.slot(slot), mode)
    return s.norm(os.fstat(s.slot(slot)))


def op_slot_fsetxattr(s: _State, slot: int, name: str, value: bytes, flags: int = 0) -> tuple[str, ...]:
    """fsetxattr, then the names flistxattr shows.

    With *flags*, the same check first as :func:`op_setxattr` (and for the same reason).
    """
    fd = s.slot(slot)
    _check_xattr_flags(lambda: os.getxattr(fd, name), flags)
    os.setxattr(fd, name, value, flags)
    return tuple(sorted(os.listxattr(fd)))


def op_slot_fgetxattr(s: _State, slot: int, name: str) -> tuple[Outcome, Outcome]:
    """fgetxattr of *name*, and every name flistxattr shows with its fgetxattr value (or both errnos)."""
    fd = s.slot(slot)

    def listed() -> tuple[tuple[str, Outcome], ...]:
        return tuple((n, _try(os.getxattr, fd, n)) for n in sorted(os.listxattr(fd)))

    return _try(os.getxattr, fd, name), _try(listed)


def op_slot_flistxattr(s: _State, slot: int) -> tuple[str, ...]:
    return tuple(sorted(os.listxattr(s.slot(slot))))


def op_slot_fremovexattr(s: _State, slot: int, name: str) -> tuple[str, ...]:
    """fremovexattr, then the names flistxattr shows."""
    fd = s.slot(slot)
    os.removexattr(fd, name)
    return tuple(sorted(os.listxattr(fd)))


def _same_object(st: os.stat_result, p: bytes, follow: bool) -> bool | str:
    """Whether *p* now names the object *st* describes (compared by st_dev/st_ino, which are never shown)."""
    try:
        now = os.stat(p, follow_symlinks=follow)
    except OSError as e:
        return errname(e.errno)
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def op_slot_fstat_vs(s: _State, slot: int, path: bytes, follow: bool) -> tuple[str, bool | str]:
    """fstat of the slot, and whether *path* (the name it was opened by) still names the same object.

    The second value is True, False, or the errno of stat(*path*): a kept
    descriptor must stay with its object when the name is unlinked, renamed
    over or re-created.
    """
    st = os.fstat(s.slot(slot))
    return s.norm(st), _same_object(st, _p(path), follow)


def op_slot_setfl_write(s: _State, slot: int, append: bool, data: bytes) -> tuple[Any, ...]:
    """Flip O_APPEND with fcntl(F_SETFL), then write: plain write(2) if set, pwrite at offset 0 if cleared.

    Why: the flag of an open descriptor changes after open, so a filesystem
    must follow the descriptor's current flags (a FUSE daemon that opened its
    backing file with O_APPEND would append the pwrite).  Then fstat and the
    whole content read back through the descriptor (when it is readable).
    """
    fd = s.slot(slot)
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (fl | os.O_APPEND) if append else (fl & ~os.O_APPEND))
    n = os.write(fd, data) if append else os.pwrite(fd, data, 0)
    return n, s.norm(os.fstat(fd)), _try(lambda: digest(_read_all(fd)))


def op_slot_reopen(s: _State, slot: int, flag_names: str, data: bytes) -> tuple[Any, ...]:
    """Open ``/proc/self/fd/N`` of the slot anew (as ``cat /proc/PID/fd/N`` does), maybe pwrite, then read it.

    The result: fstat, whether the new descriptor reaches the slot's object,
    the pwrite at offset 0 (only with a writable open and *data*), and the
    whole content read through the new descriptor.
    """
    old = os.fstat(s.slot(slot))
    fd = os.open(s.proc_link(slot), _flags(flag_names) | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=s.proc_fd)
    try:
        wrote = _try(os.pwrite, fd, data, 0) if data and _flags(flag_names) & os.O_ACCMODE != os.O_RDONLY else None
        st = os.fstat(fd)
        same = (st.st_dev, st.st_ino) == (old.st_dev, old.st_ino)
        return s.norm(st), same, wrote, _try(lambda: digest(_read_all(fd)))
    finally:
        os.close(fd)


def op_slot_proc_chmod(s: _State, slot: int, mode: int) -> str:
    """chmod of ``/proc/self/fd/N``: how to change the mode through an O_PATH descriptor (fchmod gives EBADF)."""
    os.chmod(s.proc_link(slot), mode, dir_fd=s.proc_fd)
    return s.norm(os.fstat(s.slot(slot)))


def op_slot_close(s: _State, slot: int) -> None:
    os.close(s.slots.pop(slot) if slot in s.slots else s.slot(slot))


def op_close_all(s: _State) -> int:
    n = len(s.slots)
    for fd in s.slots.values():
        os.close(fd)
    s.slots.clear()
    return n


OPS: dict[str, Callable[..., Any]] = {
    name[3:]: fn for name, fn in dict(globals()).items() if name.startswith("op_") and callable(fn)
}


def _send(fd: int, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    buf = b""
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv(fd: int, timeout: float | None) -> object:
    """One framed message; None at end of file; TimeoutError after *timeout* seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _read_exact(fd, 4, deadline)
    if head is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", head)[0], deadline)
    if body is None:
        return None
    return pickle.loads(body)


def serve(root: str, t0_ns: str) -> None:
    """Executor main loop: chroot into *root*, then answer ``(op, args)`` requests on stdin/stdout.

    Everything is imported before the chroot; afterwards ``sys.path`` is
    emptied so nothing can be imported from the mount by accident.
    """
    state = _State(int(t0_ns))
    os.chroot(root)
    os.chdir("/")
    os.umask(0o022)
    sys.path[:] = []
    fin, fout = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    _send(fout, ("ready", os.getpid()))
    while True:
        msg = _recv(fin, None)
        if msg is None:
            return
        op, args = cast(tuple[str, tuple[Any, ...]], msg)
        res: Outcome
        try:
            res = ("ok", OPS[op](state, *args))
        except OSError as e:
            res = ("err", errname(e.errno))
        except Exception as e:  # a harness bug: reported, never compared
            res = ("exc", f"{type(e).__name__}: {e}")
        _send(fout, res)


# --------------------------------------------------------------------------
# Caller side
# --------------------------------------------------------------------------

_BOOT = "import sys; from tests.support.opsrunner import serve; serve(sys.argv[1], sys.argv[2])"


class ExecutorError(AssertionError):
    """An executor died, hung, or could not start."""


class Executor:
    """One helper process chrooted into *root*; :meth:`call` runs an operation there.

    *t0_ns* is the example's start: later times are reported as ``now``.
    """

    def __init__(self, root: Path, label: str, t0_ns: int, timeout: float = 30.0) -> None:
        self.label = label
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.fsdecode(root), str(t0_ns)],
            cwd=_REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            hello = self._recv(20.0, "start")
        except BaseException:
            self.kill()
            raise
        if not (isinstance(hello, tuple) and hello[0] == "ready"):
            self.kill()
            raise ExecutorError(f"{label}: executor failed to start: {hello!r}")

    def _recv(self, timeout: float, what: str) -> object:
        assert self.proc.stdout is not None
        try:
            msg = _recv(self.proc.stdout.fileno(), timeout)
        except TimeoutError:
            self.kill()
            raise ExecutorError(f"{self.label}: {what} did not answer within {timeout}s (killed)") from None
        if msg is None:
            err = self._stderr()
            raise ExecutorError(f"{self.label}: executor died during {what}: rc={self.proc.poll()} {err}")
        return msg

    def _stderr(self) -> str:
        self.kill()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def call(self, op: str, *args: Any) -> Outcome:
        """Run *op* in the executor; the outcome, or ExecutorError if it hung or died."""
        if self.proc.poll() is not None:
            raise ExecutorError(f"{self.label}: executor is dead (rc={self.proc.returncode})")
        assert self.proc.stdin is not None
        try:
            _send(self.proc.stdin.fileno(), (op, args))
        except BrokenPipeError:
            raise ExecutorError(f"{self.label}: executor died before {op}: {self._stderr()}") from None
        res = self._recv(self.timeout, f"{op}{args!r}"[:300])
        assert isinstance(res, tuple)
        return res

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in D state: nothing more to do
                self.proc.wait(timeout=10)

    def close(self, timeout: float = 10.0) -> None:
        """Close every slot and let the process exit; kill it if it does not (always leaves it gone)."""
        try:
            if self.proc.poll() is None:
                self.call("close_all")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
        except (ExecutorError, OSError, subprocess.TimeoutExpired):
            self.kill()
        finally:
            self.kill()
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()
