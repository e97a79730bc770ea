"""Linux system calls that the os module does not offer, through ctypes.

Each wrapper raises OSError with the kernel's errno, like the os functions
next to which it is used.  Syscall numbers are those of the generic (new)
table where it exists, else x86_64's; other architectures are looked up in
``_NUMBERS`` and refused clearly if missing.
"""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)

_NUMBERS: dict[str, dict[str, int]] = {
    # renameat2 and name_to_handle_at predate the unified syscall table.
    "x86_64": {"renameat2": 316, "name_to_handle_at": 303, "open_by_handle_at": 304},
    "aarch64": {"renameat2": 276, "name_to_handle_at": 264, "open_by_handle_at": 265},
    "riscv64": {"renameat2": 276, "name_to_handle_at": 264, "open_by_handle_at": 265},
}
_SYS_OPEN_TREE = 428  # the same everywhere: the unified table
_SYS_MOUNT_SETATTR = 442

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

OPEN_TREE_CLONE = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR__ATIME = 0x70  # the atime mode bits, cleared to set one
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128


def _number(name: str) -> int:
    try:
        return _NUMBERS[os.uname().machine][name]
    except KeyError:
        raise OSError(38, f"{name} is not wired for {os.uname().machine}") from None  # ENOSYS


def _check(ret: int, *names: bytes) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), *(os.fsdecode(n) for n in names[:1]))
    return ret


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int = 0) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    _check(_libc.syscall(_number("renameat2"), src_dir, src, dst_dir, dst, flags), src)


def open_tree(fd: int, flags: int) -> int:
    """open_tree(fd, "", flags | AT_EMPTY_PATH); raises OSError (EPERM unprivileged)."""
    return _check(_libc.syscall(_SYS_OPEN_TREE, fd, b"", flags | AT_EMPTY_PATH))


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0) -> None:
    """mount_setattr(fd, "", AT_EMPTY_PATH) on the mount *fd* is (Linux 5.12+)."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)))


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


def name_to_handle_at(dir_fd: int, name: bytes, flags: int = 0) -> tuple[int, bytes]:
    """(handle type, handle bytes) of *name* in *dir_fd*, without following a
    final symlink (the default without AT_SYMLINK_FOLLOW).  *name* may be
    ``b""`` with AT_EMPTY_PATH for *dir_fd* itself."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(
        _libc.syscall(
            _number("name_to_handle_at"), dir_fd, name, ctypes.byref(fh), ctypes.byref(mount_id), flags
        ),
        name,
    )
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """Open the object a file handle names on *mount_fd*'s filesystem
    (needs CAP_DAC_READ_SEARCH; EPERM otherwise, ESTALE if it is gone)."""
    if len(handle) > MAX_HANDLE_SZ:
        raise OSError(22, "file handle too long")  # EINVAL
    fh = _FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    return _check(_libc.syscall(_number("open_by_handle_at"), mount_fd, ctypes.byref(fh), flags))


_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_FDCWD = -100
#: struct statx: stx_mask at 0, stx_btime (tv_sec i64, tv_nsec u32) at 80.
_STATX_SIZE = 256
_BTIME = struct.Struct("<qI")


def birth_time_ns(path: bytes, follow: bool) -> int | None:
    """The birth time of *path* in ns (statx(2), which os.stat does not
    expose), or None where its filesystem does not record one."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
    if _libc.statx(_AT_FDCWD, path, flags, _STATX_BTIME, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    mask = int.from_bytes(buf.raw[0:4], "little")
    if not mask & _STATX_BTIME:
        return None
    sec, nsec = _BTIME.unpack_from(buf.raw, 80)
    return sec * 1_000_000_000 + nsec


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]


def fs_type(fd: int) -> int:
    """The filesystem's magic number (``statfs.f_type``) under *fd*, which
    ``os.fstatvfs`` does not give: it comes first in ``struct statfs``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    _check(_libc.fstatfs(fd, buf))
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its FALLOC_FL_* *mode* (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def syncfs(fd: int) -> None:
    """syncfs(2): write out the whole filesystem *fd* is on."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_CAP_SYS_ADMIN = 21


def has_cap_sys_admin() -> bool:
    """Whether this process has CAP_SYS_ADMIN in its own user namespace."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def in_initial_user_namespace() -> bool:
    """Whether this process's user namespace maps every id to itself (the initial one)."""
    try:
        with open("/proc/self/uid_map", "rb") as f:
            return f.read().split() == [b"0", b"0", b"4294967295"]
    except OSError:
        return False
