"""Owner and mode kept in an xattr: fuse-overlayfs's ``xattr_permissions=``.

Rootless containers cannot chown files to the container's IDs, so
fuse-overlayfs (and containers/storage, which prepares the layers) can keep
a file's shown owner and mode in an xattr instead, as ``"UID:GID:MODE"``
(decimal IDs, octal mode; the mode may carry the file-type bits, which are
OR-ed into the real type).  pyunionfs follows fuse-overlayfs 1.10 (its
``override_mode`` in utils.c, ``write_permission_xattr`` / ``do_fchown`` /
``do_fchmod`` in main.c), which is what these rules are read from:

* **Which layers.**  A layer whose root directory carries one of the names
  (``security.fuseoverlayfs.override_stat``, then
  ``user.fuseoverlayfs.override_stat``, then ``user.containers.override_stat``:
  the first found) has its directories and regular files shown from that
  xattr (``direct_load_data_source``), whatever the option says.  With
  ``xattr_permissions=1`` the upper is read and written with the
  ``security.`` name, with ``=2`` with the ``user.`` one, and the upper's
  root gets the record (its real owner and mode) at mount if it lacks one.
  ``security.containers.override_stat`` is read by no version we follow.
* **Shown.**  The record replaces the stored owner and permission bits;
  uidmapping and squash apply after it, to the recorded IDs.  A record that
  does not parse (``sscanf("%d:%d:%o")`` short of three fields) is EINVAL
  for the lookup and any listing holding it, as fuse-overlayfs answers.  Symlinks and special files are never read.
* **Written** (only with the option): chown writes the record instead of
  chowning (an ID left unchanged is written as ``-1``, as fuse-overlayfs
  does), chmod writes it instead of chmodding, and new and copied-up objects
  are left owned by the daemon, with 0755 added to their real mode, and get
  a record (copy-up: the shown owner of a file, the real one of a
  directory; any ``security.``/``user.containers.`` record of the lower is
  copied over it).  Symlinks and special files get none.
* **Through the mount.**  ``user.fuseoverlayfs.*`` names are hidden (listed
  and read as absent); setting ``user.fuseoverlayfs.*`` or
  ``user.containers.*`` is EPERM.  The ``security.`` record stays visible
  and settable, as in fuse-overlayfs.

Where we differ, on purpose (docs/semantics.md): a directory or file of an
overriding layer *without* a record shows its stored owner and mode
(fuse-overlayfs fails its lookup with ENODATA, and a listing holding it);
chmod keeps the recorded owner (fuse-overlayfs 1.10 reads it from an
uninitialised stat and, built as Debian's, writes 0:0); and with
``xattr_permissions=1`` symlinks and special files are made (without a
record) instead of failing with ENOMEM or EOPNOTSUPP.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from ..errors import MountError, fs_error
from .entry import StatLike

PRIVILEGED = b"security.fuseoverlayfs.override_stat"
USER = b"user.fuseoverlayfs.override_stat"
CONTAINERS = b"user.containers.override_stat"
#: Looked for on a layer's root, in this order (fuse-overlayfs's ``direct_load_data_source``).
ROOT_MARKS = (PRIVILEGED, USER, CONTAINERS)
#: The name ``xattr_permissions=N`` reads and writes in the upper.
WRITTEN = {1: PRIVILEGED, 2: USER}
#: Names hidden through the mount (fuse-overlayfs's own namespace).
HIDDEN_PREFIX = b"user.fuseoverlayfs."
#: Names that may not be set through the mount.
PROTECTED_PREFIXES = (HIDDEN_PREFIX, b"user.containers.")
#: Added to the real mode of what is made or copied up, so the daemon can
#: always reach it whatever the shown mode says.
REAL_BITS = 0o755
#: fuse-overlayfs reads at most this many bytes of a record (a longer one is ERANGE).
_MAX = 63
#: What ``sscanf("%d:%d:%o")`` takes: blanks before each number, a sign, and
#: anything after the third field ignored.
_RECORD = re.compile(rb"\s*([+-]?\d+):\s*([+-]?\d+):\s*([+-]?[0-7]+)")
_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Record:
    """One parsed record: the IDs as stored (before uidmapping) and the mode bits."""

    uid: int
    gid: int
    mode: int


def parse(value: bytes) -> Record:
    """The record in xattr *value*; EINVAL where fuse-overlayfs's sscanf finds
    fewer than three fields.  IDs wrap to 32 bits (``-1`` is 4294967295)."""
    if len(value) > _MAX:
        raise fs_error(errno.ERANGE)
    m = _RECORD.match(value.split(b"\0", 1)[0])
    if m is None:
        raise fs_error(errno.EINVAL)
    return Record(int(m[1]) & _U32, int(m[2]) & _U32, int(m[3], 8) & _U32)


def format_record(uid: int, gid: int, mode: int) -> bytes:
    """``"%d:%d:%o"`` of C's uid_t/gid_t printed as int: 4294967295 shows as -1."""
    return b"%d:%d:%o" % (_signed(uid), _signed(gid), mode & _U32)


def _signed(ident: int) -> int:
    ident &= _U32
    return ident - (1 << 32) if ident >= 1 << 31 else ident


def apply(st_mode: int, record: Record) -> int:
    """The mode shown for a stored *st_mode*: its type, OR-ed with the record's mode."""
    return (stat.S_IFMT(st_mode) | record.mode) & _U32


def root_mark(fd: int) -> bytes | None:
    """The record name a layer root (directory fd *fd*) says its entries carry, if any.

    fuse-overlayfs asks with a 64-byte buffer: a longer value does not count."""
    for name in ROOT_MARKS:
        try:
            if len(os.getxattr(b"/proc/self/fd/%d" % fd, name)) <= 64:
                return name
        except OSError:
            continue
    return None


@dataclass(frozen=True, slots=True)
class Overrides:
    """Which layers show owners and modes from a record, and which name is written."""

    #: Per layer (topmost first): the record name read there, or None.
    names: tuple[bytes | None, ...]
    #: The name written in the upper (``xattr_permissions=1|2``); None for 0.
    written: bytes | None

    def read(self, layer: int, path: bytes, follow: bool, st: StatLike) -> Record | None:
        """The record of the object at *path* (a ``/proc/self/fd`` path,
        followed only if *follow*: a magic link) in *layer*, whose lstat is
        *st*; None where none applies."""
        name = self.names[layer]
        if name is None or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return None
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                return None  # (fuse-overlayfs fails on ENODATA; see the module's notes)
            raise
        return parse(value)

    def write(self, path: bytes, follow: bool, uid: int, gid: int, mode: int, st_mode: int) -> None:
        """Record *uid*, *gid*, *mode* on the object at *path* (followed only if *follow*),
        whose stored mode is *st_mode*.  Only directories and regular files get
        one: fuse-overlayfs's write on the others fails (EPERM for ``user.``,
        which it ignores; see the module's notes for ``security.``)."""
        assert self.written is not None
        if stat.S_ISDIR(st_mode) or stat.S_ISREG(st_mode):
            os.setxattr(path, self.written, format_record(uid, gid, mode), follow_symlinks=follow)


def overrides(xattr_permissions: int, layer_fds: list[int], writable: bool) -> Overrides | None:
    """The mount's rules, None where no layer has records and the option is 0
    (then attributes cost nothing more).  *layer_fds* are the layer roots,
    topmost first; the first is the upper when *writable*."""
    names = [root_mark(fd) for fd in layer_fds]
    written = WRITTEN.get(xattr_permissions) if writable else None
    if written is not None:
        names[0] = written
        mark_root(layer_fds[0], written)
    if written is None and not any(names):
        return None
    return Overrides(tuple(names), written)


def mark_root(fd: int, name: bytes) -> None:
    """Give the upper's root its record (its own owner and whole mode) if it has
    none, as fuse-overlayfs does at mount: so the root shows as before."""
    path = b"/proc/self/fd/%d" % fd
    try:
        try:
            os.getxattr(path, name)
            return
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        st = os.fstat(fd)
        os.setxattr(path, name, format_record(st.st_uid, st.st_gid, st.st_mode))
    except OSError as exc:  # (fuse-overlayfs refuses to mount too)
        raise MountError(f"xattr_permissions: the upper's root cannot hold {name.decode()}: {exc.strerror}") from None
