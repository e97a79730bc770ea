"""Attributes and xattrs: setattr (mode, owner, size, times), setxattr, removexattr.

Each change copies the object up first and is then made on the upper copy,
whose own syscalls decide the answer (XATTR_CREATE / XATTR_REPLACE, EPERM),
as overlayfs does.  Xattr names are mapped by :mod:`.markers` (the overlay's
own records are private, escaped names are the user's).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ..errors import fs_error
from . import acl
from .callers import DAEMON, Caller
from .inodes import Node
from .override import PROTECTED_PREFIXES
from .paths import proc_path
from .answers import Attr
from .union import TRUSTED
from .writable import Writable, chmod_entry


@dataclass(slots=True)
class SetAttr:
    """The attributes a setattr request changes; None means "leave it"."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Attributes(Writable):
    """The requests that change an object's attributes or xattrs."""

    def setattr(self, ino: int, change: SetAttr, fh: int | None) -> Attr:
        node = self.node(ino)
        self._up()
        recorded = self.overrides is not None and self.overrides.written is not None
        # What a record keeps as the mode on chown: the mode shown before (fuse-overlayfs's ino->mode).
        shown_mode = self.attr_of(ino, node.entry, node.path).mode if recorded and change.mode is None else 0
        # Only a size change needs the data up (metacopy=on: the rest is metadata).
        self.copyups.node(node, meta=change.size is None)
        # The kernel's handle, where it sent one, is the object itself --
        # unless it reads a metadata-only copy's data, a lower file.
        fd = fh if fh is not None and fh in self.handles else None
        if fd is not None and node.entry.data is not None:
            fd = None
        path, follow = (proc_path(fd), True) if fd is not None else self.object_path(node)
        if change.size is not None:
            try:
                os.ftruncate(fd, change.size) if fd is not None else os.truncate(path, change.size)
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.EINVAL) or fd is None:
                    raise
                os.truncate(path, change.size)  # a handle open read-only: truncate the object it names
        if recorded and (change.uid is not None or change.gid is not None or change.mode is not None):
            self._record(node, change, path, follow, shown_mode)
        else:
            self._chown_chmod(node, change, path, follow)
        if change.atime_ns is not None or change.mtime_ns is not None:
            cur = os.stat(path, follow_symlinks=follow)
            times = (
                cur.st_atime_ns if change.atime_ns is None else change.atime_ns,
                cur.st_mtime_ns if change.mtime_ns is None else change.mtime_ns,
            )
            os.utime(path, ns=times, follow_symlinks=follow)
        return self.getattr(ino)

    def _chown_chmod(self, node: Node, change: SetAttr, path: bytes, follow: bool) -> None:
        """Owner, then mode, changed on the object itself."""
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else self.stored_uid(change.uid)
            gid = -1 if change.gid is None else self.stored_gid(change.gid)
            try:
                os.chown(path, uid, gid, follow_symlinks=follow)
            except OSError:
                if self.ids is None or not self.ids.squashes:
                    raise  # (squashed, every file shows one owner: fuse-overlayfs reports no failure)
        if change.mode is not None and not stat.S_ISLNK(node.entry.st.st_mode):
            chmod_entry(path, follow, stat.S_IMODE(change.mode))

    def _record(self, node: Node, change: SetAttr, path: bytes, follow: bool, shown_mode: int) -> None:
        """Owner and mode changed in the object's record instead (``xattr_permissions=``,
        see :mod:`.override`): the stored object keeps the daemon's owner and its mode."""
        assert self.overrides is not None
        st = node.entry.st
        old = self.record(node.ino, node.entry, node.path)
        uid = old.uid if old is not None else 0  # (fuse-overlayfs: 0:0 where a chmod finds no record)
        gid = old.gid if old is not None else 0
        mode = shown_mode if change.mode is None else change.mode
        if change.uid is not None or change.gid is not None:
            # An ID not changed is written as -1, as fuse-overlayfs writes it.
            uid = -1 if change.uid is None else self.stored_uid(change.uid)
            gid = -1 if change.gid is None else self.stored_gid(change.gid)
        node.xattrs = None  # (the security. record is listed through the mount)
        try:
            self.overrides.write(path, follow, uid, gid, mode, st.st_mode)
        except OSError:
            if self.ids is None or not self.ids.squashes or change.mode is not None:
                raise

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, caller: Caller = DAEMON) -> None:
        """Set an xattr; *flags* (XATTR_CREATE, XATTR_REPLACE) are decided by the
        upper copy's own setxattr, after the copy-up, as overlayfs does."""
        node = self.node(ino)
        self._up()
        _may_change_xattr(name, caller)
        if self.overrides is not None and name.startswith(PROTECTED_PREFIXES):
            raise fs_error(errno.EPERM, name)  # records are changed by chown and chmod (fuse-overlayfs's rule)
        self.copyups.node(node, meta=True)
        path, follow = self.object_path(node)
        node.xattrs = None
        os.setxattr(path, self.markers.stored_xattr(name), value, flags, follow_symlinks=follow)
        self._xattr_changed(node, name)

    def removexattr(self, ino: int, name: bytes, caller: Caller = DAEMON) -> None:
        node = self.node(ino)
        self._up()
        _may_change_xattr(name, caller)
        stored = self.markers.stored_xattr(name)
        if not node.entry.linked_up:
            self.getxattr(ino, name)  # ENODATA without a copy-up, as overlayfs does
        self.copyups.node(node, meta=True)
        path, follow = self.object_path(node)
        node.xattrs = None
        os.removexattr(path, stored, follow_symlinks=follow)
        self._xattr_changed(node, name)

    def _xattr_changed(self, node: Node, name: bytes) -> None:
        """An access ACL is also the mode: the kernel must not keep showing
        (and, with default_permissions, enforcing) the old one until its
        attribute cache times out."""
        if name == acl.ACCESS:
            self.attrs_changed(node.ino)


def _may_change_xattr(name: bytes, caller: Caller) -> None:
    """EPERM for a ``trusted.*`` change without CAP_SYS_ADMIN, as the kernel
    answers before asking any filesystem (``xattr_permission``)."""
    if name.startswith(TRUSTED) and not caller.sys_admin():
        raise fs_error(errno.EPERM, name)
