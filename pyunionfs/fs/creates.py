"""New names: mkdir, mknod, symlink, link, and the creation every new entry shares.

The kernel's rules (``fs/overlayfs/dir.c``): the parent is copied up first;
a new name over an upper whiteout is built in the work directory and
renamed in, in one step, and a directory made there is opaque; a name a
marker would be read as (``.wh.*`` with OCI whiteouts on, a 0/0 device) is
refused with EPERM, since it would read back as a marker.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from ..errors import fs_error
from . import acl, copyup
from .callers import Caller
from .entry import Entry
from .inodes import Node
from .override import REAL_BITS
from .paths import check_name, join, proc_path
from .answers import Attr
from .writable import Writable, chmod_entry


class Creates(Writable):
    """The requests that add a name to a merged directory."""

    def _create(
        self, parent: Node, name: bytes, mode: int, caller: Caller,
        make: Callable[[int, bytes, int], int | None],
    ) -> tuple[Entry, int | None]:
        """Create *name* with *make(dir_fd, name, mode)*, owned by *caller*.

        Returns the new entry and what *make* returned (an open fd, for files).
        """
        up = self._up()
        check_name(name)
        if self.markers.is_oci_marker(name):
            raise fs_error(errno.EPERM, name)  # it would read back as a marker
        if self.resolver.child(parent.entry, parent.path, name) is not None:
            raise fs_error(errno.EEXIST, name)
        parent.entry = self.copyups.parent_up(parent)
        recorded = self._recorded()
        if recorded:
            mode, gid, default, access = *self._recorded_mode(mode, caller), None, None
        else:
            mode, gid, default, access = self._new_mode(parent, mode, caller)
        dfd, target, over = up.dirfd(parent.path), name, False
        try:
            result = make(dfd, target, mode)
        except FileExistsError:
            # A whiteout (nothing visible is there): made aside, then put in its place.
            dfd, target, over = up.work, copyup.tmp_name(), True
            result = make(dfd, target, mode)
        try:
            uid = self.stored_uid(caller.uid)
            if recorded:
                self._record_new(dfd, target, result, uid, gid, mode)
            elif result is not None:  # a file we hold open: no name to resolve again
                os.fchown(result, uid, gid)
                os.fchmod(result, stat.S_IMODE(mode))
            else:
                os.chown(target, uid, gid, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISLNK(mode):
                    chmod_entry(proc_path(dfd, target), False, stat.S_IMODE(mode))
            if default is not None and not stat.S_ISLNK(mode):
                where = proc_path(result) if result is not None else proc_path(dfd, target)
                acl.inherit(where, result is not None, default, access, stat.S_ISDIR(mode))
            if stat.S_ISDIR(mode) and (over or parent.entry.merged):
                # Over a whiteout it must be opaque.  In a merged parent the
                # kernel (index=on, whose hard-link rules we follow) marks it
                # too, so that a lower dir added offline stays hidden.
                self.markers.set_opaque(proc_path(dfd, target))
            if over:
                up.install(target, parent.path, name, stat.S_ISDIR(mode))
        except BaseException:
            if result is not None:
                os.close(result)
            up.remove(dfd, target)
            raise
        st = up.lstat(parent.path, name)
        assert st is not None
        entry = Entry.lean(0, st)
        self.resolver.cache.changed(parent.entry.ident, name)
        if stat.S_ISDIR(mode):
            entry = self.resolver.child(parent.entry, parent.path, name) or entry
        else:
            self.resolver.cache.store(parent.entry.ident, name, entry)  # what a lookup would find
        return entry, result

    def _recorded(self) -> bool:
        """Whether owners and modes of new objects go to a record (``xattr_permissions=1|2``)."""
        return self.overrides is not None and self.overrides.written is not None

    def _recorded_mode(self, mode: int, caller: Caller) -> tuple[int, int]:
        """Real mode and recorded group of a new object whose owner and mode go
        to a record (see :mod:`.override`): the object is the daemon's, with
        0755 added so it can always reach it, and no set-group-ID parent or
        default ACL counts (fuse-overlayfs makes it in its work dir)."""
        if not stat.S_ISLNK(mode):
            mode = (mode & ~(caller.umask & 0o777)) | REAL_BITS
        return mode, self.stored_gid(caller.gid)

    def _record_new(self, dfd: int, target: bytes, fd: int | None, uid: int, gid: int, mode: int) -> None:
        """A new object's record; its real mode is *mode* (0755 included).  A
        directory's record has no file-type bits, a file's has (as the kernel
        sends the modes to fuse-overlayfs)."""
        assert self.overrides is not None
        where, follow = (proc_path(fd), True) if fd is not None else (proc_path(dfd, target), False)
        if fd is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        elif not stat.S_ISLNK(mode):
            chmod_entry(where, False, stat.S_IMODE(mode))
        self.overrides.write(where, follow, uid, gid, stat.S_IMODE(mode) if stat.S_ISDIR(mode) else mode, mode)

    def _new_mode(self, parent: Node, mode: int, caller: Caller) -> tuple[int, int, bytes | None, bytes | None]:
        """Mode and group of a new entry of *caller* in *parent* (already in the
        upper), and the parent's default ACL with the access ACL it gives."""
        pst = self.stack.stat_self(0, parent.path)
        gid = self.stored_gid(caller.gid)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        default = acl.default_of(*self.stack.entry_path(0, parent.path))
        access = None
        if stat.S_ISLNK(mode):
            pass  # always 0777
        elif default is None:
            mode &= ~(caller.umask & 0o777)
        else:
            mode, access = acl.create_mode(default, mode)
        return mode, gid, default, access

    def _new_node(self, parent: Node, name: bytes, entry: Entry) -> tuple[Node, Attr]:
        path = join(parent.path, name)
        node = self.inodes.remember(path, entry, parent.ino)
        return node, self.attr_of(node.ino, entry, path)

    def mkdir(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> tuple[Node, Attr]:
        parent = self._dir_node(parent_ino)

        def make(dfd: int, n: bytes, m: int) -> None:
            os.mkdir(n, stat.S_IMODE(m) & 0o777, dir_fd=dfd)

        entry, _ = self._create(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), caller, make)
        return self._new_node(parent, name, entry)

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, caller: Caller) -> tuple[Node, Attr]:
        parent = self._dir_node(parent_ino)
        if self.markers.is_whiteout_node(mode, rdev):
            raise fs_error(errno.EPERM, name)  # it would read back as a whiteout

        def make(dfd: int, n: bytes, m: int) -> None:
            os.mknod(n, stat.S_IFMT(m) | stat.S_IMODE(m), rdev, dir_fd=dfd)

        entry, _ = self._create(parent, name, mode, caller, make)
        return self._new_node(parent, name, entry)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, caller: Caller) -> tuple[Node, Attr]:
        parent = self._dir_node(parent_ino)

        def make(dfd: int, n: bytes, m: int) -> None:
            os.symlink(target, n, dir_fd=dfd)

        entry, _ = self._create(parent, name, stat.S_IFLNK | 0o777, caller, make)
        return self._new_node(parent, name, entry)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> tuple[Node, Attr]:
        node = self.node(ino)
        if node.entry.is_dir:
            raise fs_error(errno.EPERM)
        # A node without a name is linked only from its pin in the upper: an
        # O_TMPFILE file (the kernel sends LINK for it only when it may be
        # linked), or a file whose known names went while it kept others.
        nameless = node.gone
        if nameless and (node.pin is None or node.entry.layers != (0,)):
            raise fs_error(errno.ENOENT)
        parent = self._dir_node(new_parent_ino)
        up = self._up()
        check_name(new_name)
        if self.markers.is_oci_marker(new_name):
            raise fs_error(errno.EPERM, new_name)
        if self.resolver.child(parent.entry, parent.path, new_name) is not None:
            raise fs_error(errno.EEXIST, new_name)
        if not nameless:
            self.copyups.node(node, meta=True)
            if node.entry.data is not None:
                # A metadata-only copy's other names find its data through
                # an absolute redirect (the kernel's ovl_set_link_redirect).
                value = up.redirect_for(node.path, False)
                if value is not None:
                    up.set_redirect(node.path, value)
        parent.entry = self.copyups.parent_up(parent)
        # The source is the node's own object (its pin's magic link, followed,
        # links that very inode; a checked name otherwise).
        src, follow = self.object_path(node)
        if up.lstat(parent.path, new_name) is None:
            os.link(src, new_name, dst_dir_fd=up.dirfd(parent.path), follow_symlinks=follow)
        else:
            tmp = copyup.tmp_name()
            os.link(src, tmp, dst_dir_fd=up.work, follow_symlinks=follow)
            up.install(tmp, parent.path, new_name, False)
        self.resolver.cache.changed(parent.entry.ident, new_name)
        path = join(parent.path, new_name)
        if nameless:
            node.gone, node.path, node.parent, node.aliases = False, path, parent.ino, None
            node.lookups += 1
            return node, self.getattr(node.ino)
        if node.aliases is None:
            node.aliases = set()
        node.aliases.add(path)
        node.lookups += 1
        return node, self.getattr(node.ino)
