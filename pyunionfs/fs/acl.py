"""POSIX ACLs where the union itself must apply them: the mode of a new entry.

A new file, directory or node made in a directory with a default ACL takes
its permissions from that ACL, not from the caller's umask (``man 5 acl``,
"object creation and default ACLs"; the kernel's ``posix_acl_create``).  The
kernel's overlayfs gets that from the upper's filesystem.  We create some new
entries in the work dir first (over a whiteout, to rename them in whole), where
no default ACL is inherited, so the rule is applied here, the same way in
every case.  The format is the kernel's xattr form (``posix_acl_xattr.h``):
a 4-byte version (2), then entries of tag, permissions (u16 each) and id (u32).
"""

from __future__ import annotations

import errno
import os
import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

_VERSION = 2
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def default_of(path: bytes, follow: bool) -> bytes | None:
    """The default ACL of the directory at *path*, None without one."""
    try:
        value = os.getxattr(path, DEFAULT, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise
    return value if _parse(value) else None


def _parse(value: bytes) -> list[list[int]]:
    """Entries [tag, perm, id] of an ACL value; empty if it is not one."""
    if len(value) < 4 or (len(value) - 4) % _ENTRY.size or struct.unpack_from("<I", value)[0] != _VERSION:
        return []
    return [list(e) for e in _ENTRY.iter_unpack(value[4:])]


def _pack(entries: list[list[int]]) -> bytes:
    return struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def create_mode(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """(mode, access ACL or None) of an entry created with *mode* under the
    default ACL *default*: ``posix_acl_create_masq``.  The access ACL is
    None where it says no more than the mode (only the three base entries)."""
    entries = _parse(default)
    equivalent = True
    group_obj = mask = None
    for e in entries:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= (mode >> 6) & 7
            mode &= (e[1] << 6) | ~0o700
        elif tag == OTHER:
            e[1] &= mode & 7
            mode &= e[1] | ~0o007
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == MASK:
            mask, equivalent = e, False
        else:
            equivalent = False
    shaped = mask if mask is not None else group_obj
    if shaped is not None:
        shaped[1] &= (mode >> 3) & 7
        mode &= (shaped[1] << 3) | ~0o070
    return mode, None if equivalent else _pack(entries)


def inherit(path: bytes, follow: bool, default: bytes, access: bytes | None, is_dir: bool) -> None:
    """Give the new entry at *path* its ACLs: the access ACL that
    :func:`create_mode` made, and for a directory the default ACL itself."""
    if access is not None:
        os.setxattr(path, ACCESS, access, follow_symlinks=follow)
    if is_dir:
        os.setxattr(path, DEFAULT, default, follow_symlinks=follow)
