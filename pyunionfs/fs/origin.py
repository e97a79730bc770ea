"""The kernel's ``overlay.origin`` record: which lower object an upper one was copied from.

overlayfs stores, on every object it copies up, the lower object's file
handle in the ``overlay.origin`` xattr (``struct ovl_fb`` of
``fs/overlayfs/overlayfs.h``: version 0, magic 0xfb, length, flags, handle
type, a 16-byte filesystem uuid, then the handle bytes).  It uses that record
to give the copy the lower object's inode number, so st_ino survives copy-up,
also after a remount.  We write the same record, so the kernel mounting an
upper written by pyunionfs keeps the same numbers, and we read the kernel's.

The uuid is written as all zeroes, as current kernels do by default
(``uuid=auto`` on an upper without a uuid); on reading it is ignored, and a
record is first checked against the lower object found at the same path; only
when that fails (a renamed copy, a name linked to one) is the handle opened,
O_PATH, just to read its inode number.
"""

from __future__ import annotations

import errno
import os

from .syscalls import name_to_handle_at, open_by_handle_at

_VERSION = 0
_MAGIC = 0xFB
_HEADER = 5
_UUID = 16
FLAG_PATH_UPPER = 1 << 2  # the handle names an upper object (index's ``upper``)


def encode(handle_type: int, handle: bytes, flags: int = 0) -> bytes:
    """The on-disk record for one file handle (little-endian machines: flags 0)."""
    length = _HEADER + _UUID + len(handle)
    return bytes((_VERSION, _MAGIC, length, flags, handle_type)) + bytes(_UUID) + handle


def decode(record: bytes) -> tuple[int, bytes] | None:
    """(handle type, handle bytes) of a record; None if it is not one we understand."""
    if len(record) < _HEADER + _UUID or record[0] != _VERSION or record[1] != _MAGIC:
        return None
    if record[2] != len(record):
        return None
    return record[4], bytes(record[_HEADER + _UUID :])


def of(dir_fd: int, name: bytes) -> bytes | None:
    """The origin record of entry *name* in *dir_fd*; None where the
    filesystem has no file handles (then the kernel stores none either)."""
    try:
        handle_type, handle = name_to_handle_at(dir_fd, name)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EOVERFLOW, errno.EPERM):
            return None
        raise
    return encode(handle_type, handle)


def same_object(record: bytes, dir_fd: int, name: bytes) -> bool:
    """Whether *record* names entry *name* of *dir_fd* (the uuid is not compared)."""
    want = decode(record)
    if want is None:
        return False
    try:
        return name_to_handle_at(dir_fd, name) == want
    except OSError:
        return False


def identity(record: bytes, mount_fds: list[int]) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the object *record* names, on the filesystem of
    one of *mount_fds*; None if no filesystem has it or we may not ask.

    The object is opened with O_PATH only to fstat it: nothing is read and
    no path is walked, so it does not matter where it sits.  Used when the
    record does not name the entry at the same path (a renamed copy, or a
    new name linked to one).
    """
    decoded = decode(record)
    if decoded is None:
        return None
    for fd in mount_fds:
        try:
            # open_by_handle_at refuses O_PATH fds as its mount fd.
            mnt = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            continue
        try:
            obj = open_by_handle_at(mnt, decoded[0], decoded[1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        finally:
            os.close(mnt)
        try:
            st = os.fstat(obj)
        finally:
            os.close(obj)
        return st.st_dev, st.st_ino
    return None


def index_name(record: bytes) -> bytes:
    """The name of the index entry for a lower object: the record in hex, as
    the kernel names entries of ``workdir/index`` (``ovl_get_index_name``)."""
    return record.hex().encode()


def nlink_record(merged_nlink: int, upper_nlink: int) -> bytes:
    """The ``overlay.nlink`` value: the merged link count relative to the
    upper inode's (the kernel's ``"U%+i"`` form)."""
    return b"U%+d" % (merged_nlink - upper_nlink)


def parse_nlink(value: bytes, upper_nlink: int, lower_nlink: int, unlinked: bool = False) -> int | None:
    """Merged link count from an ``overlay.nlink`` value; None if malformed
    or not positive, unless *unlinked* (an object whose last merged name is
    gone, still linked in the index: 0 is then the answer)."""
    if len(value) < 3 or value[:1] not in (b"U", b"L") or value[1:2] not in (b"+", b"-"):
        return None
    try:
        diff = int(value[1:])
    except ValueError:
        return None
    n = (upper_nlink if value[:1] == b"U" else lower_nlink) + diff
    if unlinked:
        return max(n, 0)
    return n if n > 0 else None

