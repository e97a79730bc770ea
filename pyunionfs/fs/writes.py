"""The write path: every change through the mount, with overlayfs's semantics.

:class:`WritableUnionFS` adds the mutating requests to :class:`~.union.UnionFS`.
The rules are the kernel's (``fs/overlayfs/dir.c``, ``copy_up.c``):

* the first change to an object that only a lower layer has copies it up
  (parents first), atomically, through the work dir (:mod:`.copyup`);
* removing a name leaves a whiteout when a lower layer still has it
  ("lower positive"), else just removes the upper entry;
* a new name replaces an upper whiteout in one rename, and a directory made
  there is opaque;
* a directory with lower parts is not renamed (EXDEV: ``redirect_dir=off``);
  an upper-only directory moved into a merged parent becomes opaque.

Copy-up itself (which object, when, the per-object lock) is
:class:`~.copyups.CopyUps`.  Every request that names an inode reaches that
object through :meth:`~.union.UnionFS.open_object` and its siblings, never
through whatever holds its old name now; before a name the kernel may still
hold goes away, its object is pinned (:meth:`WritableUnionFS._name_goes`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..config import MountConfig
from ..errors import fs_error
from . import acl, copyup
from .callers import DAEMON, Caller
from .copyups import CopyUps
from .entry import Entry
from .handles import BACKING_FLAGS
from .inodes import Node
from .paths import check_name, join, proc_path, split
from .syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2
from .union import TRUSTED, Attr, UnionFS
from .upper import Upper


@dataclass(slots=True)
class SetAttr:
    """The attributes a setattr request changes; None means "leave it"."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class WritableUnionFS(UnionFS):
    """A :class:`UnionFS` that also takes changes (EROFS when mounted read-only)."""

    def __init__(self, cfg: MountConfig) -> None:
        super().__init__(cfg)
        self.upper: Upper | None = None
        if self.stack.upper is not None:
            try:
                self.upper = Upper(self.stack, self.markers)
            except BaseException:
                self.stack.close()
                raise
        self._copyups: CopyUps | None = None
        if self.upper is not None and not self.readonly:
            self.resolver.index = self.upper
            self._copyups = CopyUps(self, self.upper)
        self.attrs_changed = lambda ino: None

    @property
    def copyups(self) -> CopyUps:
        """The copy-up side (EROFS on a mount that takes no changes)."""
        if self._copyups is None:
            raise fs_error(errno.EROFS)
        return self._copyups

    @property
    def attrs_changed(self) -> Callable[[int], None]:
        """Called with the inode number of an object whose attributes changed
        other than by the request at hand, so the FUSE adapter can make the
        kernel forget what it cached (see :attr:`.copyups.CopyUps.attrs_changed`)."""
        return self._attrs_changed

    @attrs_changed.setter
    def attrs_changed(self, fn: Callable[[int], None]) -> None:
        self._attrs_changed = fn
        if self._copyups is not None:
            self._copyups.attrs_changed = fn

    def close(self) -> None:
        if not self._closed and self.upper is not None:
            self.upper.close()
        super().close()

    # -- helpers ------------------------------------------------------------

    def _up(self) -> Upper:
        if self.upper is None or self.readonly:
            raise fs_error(errno.EROFS)
        return self.upper

    def _dir_node(self, ino: int) -> Node:
        node = self.node(ino)
        if not node.entry.is_dir:
            raise fs_error(errno.ENOTDIR)
        if node.gone:
            raise fs_error(errno.ENOENT)
        return node

    def _ino(self, entry: Entry, path: bytes) -> int:
        return self.inodes.number(entry.ident, path)

    def _lower_positive(self, parent: Entry, parent_rel: bytes, name: bytes) -> bool:
        """Whether a layer below the upper still shows *name* in *parent*
        (then removing it needs a whiteout); overlayfs's ``ovl_lower_positive``."""
        for layer in parent.layers:
            if layer == 0 and self.upper is not None:
                continue
            st = self.stack.lstat(layer, parent_rel, name)
            if st is None:
                if self.markers.oci_whiteout(self.stack, layer, parent_rel, name):
                    return False
                continue
            return not self.markers.is_whiteout(st, layer in parent.xwh, self.stack, layer, parent_rel, name)
        return False

    # -- new entries ------------------------------------------------------------

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
        mode, gid, default, access = self._new_mode(parent, mode, caller)
        over = up.lstat(parent.path, name) is not None  # a whiteout: nothing visible is there
        dfd, target = (up.work, copyup.tmp_name()) if over else (up.dirfd(parent.path), name)
        result = make(dfd, target, mode)
        try:
            if result is not None:  # a file we hold open: no name to resolve again
                os.fchown(result, caller.uid, gid)
                os.fchmod(result, stat.S_IMODE(mode))
            else:
                os.chown(target, caller.uid, gid, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISLNK(mode):
                    _chmod(proc_path(dfd, target), False, stat.S_IMODE(mode))
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
        entry = Entry((0,), st, (st.st_dev, st.st_ino))
        self.resolver.cache.changed(parent.entry.ident, name)
        if stat.S_ISDIR(mode):
            entry = self.resolver.child(parent.entry, parent.path, name) or entry
        else:
            self.resolver.cache.store(parent.entry.ident, name, entry)  # what a lookup would find
        return entry, result

    def _new_mode(self, parent: Node, mode: int, caller: Caller) -> tuple[int, int, bytes | None, bytes | None]:
        """Mode and group of a new entry of *caller* in *parent* (already in the
        upper), and the parent's default ACL with the access ACL it gives."""
        pst = self.stack.stat_self(0, parent.path)
        gid = caller.gid
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
        node = self.inodes.remember(join(parent.path, name), entry, parent.ino)
        return node, self.attr_of(node.ino, entry)

    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Node, Attr]:
        """open(O_CREAT): make the file, or open it if it exists and O_EXCL is not set."""
        parent = self._dir_node(parent_ino)
        self._up()
        found = self.resolver.child(parent.entry, parent.path, name)
        if found is not None:
            if flags & os.O_EXCL:
                raise fs_error(errno.EEXIST, name)
            node, _ = self._new_node(parent, name, found)
            fh = self.open_file(node.ino, flags & ~os.O_CREAT, caller)
            return fh, node, self.getattr(node.ino)
        with self.handles.share.admitted(caller.uid):  # before the file is made: EMFILE makes nothing
            fd, node, attr = self._create_new(parent, name, mode, flags, caller)
            self.handles.add(fd, node.ino, caller.uid)
        return fd, node, attr

    def _create_new(self, parent: Node, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[int, Node, Attr]:
        """Make *name* new and open it (the handle is counted by the caller)."""
        open_flags = (flags & BACKING_FLAGS & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

        def make(dfd: int, n: bytes, m: int) -> int:
            return os.open(n, open_flags, stat.S_IMODE(m), dir_fd=dfd)

        entry, fd = self._create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), caller, make)
        assert fd is not None
        node, attr = self._new_node(parent, name, entry)
        return fd, node, attr

    def tmpfile(self, parent_ino: int, mode: int, flags: int, caller: Caller) -> tuple[int, Node, Attr]:
        """open(O_TMPFILE): a file without a name in the directory's upper, as
        overlayfs makes it; linkat() may give it one later (:meth:`link`)."""
        parent = self._dir_node(parent_ino)
        self._up()
        with self.handles.share.admitted(caller.uid):
            fd, ino = self._tmpfile(parent, mode, flags, caller)
            self.handles.add(fd, ino, caller.uid)
        return fd, self.inodes.nodes[ino], self.attr_of(ino, self.inodes.nodes[ino].entry)

    def _tmpfile(self, parent: Node, mode: int, flags: int, caller: Caller) -> tuple[int, int]:
        """(fd, inode) of a new nameless file (the handle is counted by the caller)."""
        parent.entry = self.copyups.parent_up(parent)
        mode, gid, default, access = self._new_mode(parent, stat.S_IFREG | stat.S_IMODE(mode), caller)
        access_mode = flags & os.O_ACCMODE if flags & os.O_ACCMODE != os.O_RDONLY else os.O_RDWR
        fd = os.open(".", os.O_TMPFILE | access_mode | os.O_CLOEXEC, stat.S_IMODE(mode),
                     dir_fd=self._up().dirfd(parent.path))
        try:
            os.fchown(fd, caller.uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
            if default is not None:
                acl.inherit(proc_path(fd), True, default, access, False)
            st = os.fstat(fd)
            entry = Entry((0,), st, (st.st_dev, st.st_ino))
            pin = os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        ino = self.inodes.number(entry.ident)
        self.inodes.nodes[ino] = Node(ino, b"", entry, lookups=1, parent=parent.ino, gone=True, pin=pin)
        return fd, ino

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
            self.copyups.node(node)
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

    # -- removing -------------------------------------------------------------

    def unlink(self, parent_ino: int, name: bytes) -> None:
        self._remove(parent_ino, name, is_dir=False)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._remove(parent_ino, name, is_dir=True)

    def _remove(self, parent_ino: int, name: bytes, is_dir: bool) -> None:
        parent = self._dir_node(parent_ino)
        up = self._up()
        entry = self.resolver.child(parent.entry, parent.path, name)
        if entry is None:
            raise fs_error(errno.ENOENT, name)
        path = join(parent.path, name)
        ino = self._ino(entry, path)
        if self.copyups.settle(ino):
            entry = self.resolver.child(parent.entry, parent.path, name)
            if entry is None:
                raise fs_error(errno.ENOENT, name)
        if entry.is_dir != is_dir:
            raise fs_error(errno.ENOTDIR if is_dir else errno.EISDIR, name)
        if is_dir and self.resolver.listing(entry, path):
            raise fs_error(errno.ENOTEMPTY, name)
        if not is_dir and not entry.linked_up and (entry.index is not None or entry.st.st_nlink > 1):
            # A name of a hard-linked lower file: copy it up (to the index)
            # first, so the merged link count has a record to drop, as
            # overlayfs does with index=on.
            entry = self.copyups.entry(entry, path)
        parent.entry = self.copyups.parent_up(parent)
        last = _last_name(entry)
        self._name_goes(ino, entry, path, last)
        if not entry.linked_up:
            up.whiteout(parent.path, name)
        elif self._lower_positive(parent.entry, parent.path, name):
            if is_dir:
                up.remove_dir_leaving_whiteout(parent.path, name)
            else:
                up.replace_with_whiteout(parent.path, name)
        elif is_dir:
            up.clear_dir(path)
            os.rmdir(name, dir_fd=up.dirfd(parent.path))
        else:
            os.unlink(name, dir_fd=up.dirfd(parent.path))
        self.resolver.cache.changed(parent.entry.ident, name)
        if is_dir:
            self.resolver.cache.dropped(entry.ident)
            up.moved(path, path)
        self.inodes.unlinked(ino, path, last=last)

    def _name_goes(self, ino: int, entry: Entry, path: bytes, last: bool) -> None:
        """Before name *path* of *entry* (node *ino*) is removed or replaced:
        pin the object for the node the kernel may still hold, if that name
        is how the node finds it (see :attr:`.inodes.Node.pin`); and when it
        is the object's *last* name, drop what is known about it by upper
        inode number (a new file may get that number once it is freed)."""
        layer = entry.layers[0]
        if last and layer == 0:
            self.resolver.origins.pop(entry.real, None)
        node = self.inodes.get(ino)
        if node is None or node.pin is not None or not (last or node.path == path):
            return
        parent, name = split(path)
        if entry.index is not None:
            dfd, name = self._up().index, entry.index
        else:
            dfd = self.stack.dirfd(layer, parent)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != entry.real:
            os.close(fd)  # not the object the name held when resolved: nothing to hold
            return
        node.pin = fd

    # -- rename -----------------------------------------------------------------

    def rename(self, old_pino: int, old_name: bytes, new_pino: int, new_name: bytes, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise fs_error(errno.EINVAL)
        exchange = bool(flags & RENAME_EXCHANGE)
        op, np = self._dir_node(old_pino), self._dir_node(new_pino)
        up = self._up()
        check_name(new_name)
        if self.markers.is_oci_marker(new_name):
            raise fs_error(errno.EPERM, new_name)
        src = self.resolver.child(op.entry, op.path, old_name)
        if src is None:
            raise fs_error(errno.ENOENT, old_name)
        dst = self.resolver.child(np.entry, np.path, new_name)
        src_path, dst_path = join(op.path, old_name), join(np.path, new_name)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fs_error(errno.EEXIST, new_name)
        if dst is None and exchange:
            raise fs_error(errno.ENOENT, new_name)
        if src_path == dst_path:
            return
        src_node = self.inodes.get(self._ino(src, src_path))
        dst_ino = self._ino(dst, dst_path) if dst is not None else None
        if dst is not None and not exchange and src.ident == dst.ident:
            return  # two names of one file: rename(2) does nothing
        if src.is_dir and (dst_path + b"/").startswith(src_path + b"/"):
            raise fs_error(errno.EINVAL)
        if exchange and dst is not None and dst.is_dir and (src_path + b"/").startswith(dst_path + b"/"):
            raise fs_error(errno.EINVAL)
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise fs_error(errno.ENOTDIR, new_name)
            if not src.is_dir and dst.is_dir:
                raise fs_error(errno.EISDIR, new_name)
        # Without redirect records, a directory with lower parts cannot move.
        # (overlayfs checks this before whether the target is empty.)
        if src.is_dir and src.layers != (0,):
            raise fs_error(errno.EXDEV)
        if exchange and dst is not None and dst.is_dir and dst.layers != (0,):
            raise fs_error(errno.EXDEV)
        # (An upper-only target's emptiness is left to rename(2) itself, after
        # the source got its opaque marker: the kernel's order.)
        merged_target = dst is not None and not exchange and dst.is_dir and dst.layers != (0,)
        if merged_target and dst is not None and self.resolver.listing(dst, dst_path):
            raise fs_error(errno.ENOTEMPTY, new_name)
        self.copyups.settle(*(i for i in (src_node.ino if src_node else None, dst_ino) if i is not None))
        if not src.is_dir:
            src = self.copyups.entry(src, src_path)
        if dst is not None and not dst.is_dir and (exchange or dst.st.st_nlink > 1 or dst.index is not None):
            # A name of a hard-linked lower file is copied up (linked to the
            # index) before it is replaced, so its merged link count drops.
            dst = self.copyups.entry(dst, dst_path)
        op.entry = self.copyups.upper_dir(op.path)
        np.entry = self.copyups.upper_dir(np.path)
        if dst is not None and not exchange and dst_ino is not None:
            self._name_goes(dst_ino, dst, dst_path, _last_name(dst))
        old_dir, new_dir = self.stack.fds.dup(0, op.path), self.stack.fds.dup(0, np.path)
        try:
            if src.is_dir and np.entry.merged and not up.is_opaque(src_path):
                up.set_opaque(src_path)
            if exchange:
                assert dst is not None
                if dst.is_dir and op.entry.merged and not up.is_opaque(dst_path):
                    up.set_opaque(dst_path)
                renameat2(old_dir, old_name, new_dir, new_name, RENAME_EXCHANGE)
            else:
                self._rename_over(up, op, old_name, np, new_name, src, dst, old_dir, new_dir)
        finally:
            os.close(old_dir)
            os.close(new_dir)
        self.resolver.cache.changed(op.entry.ident, old_name)
        self.resolver.cache.changed(np.entry.ident, new_name)
        if dst is not None and dst.is_dir and not exchange:
            self.resolver.cache.dropped(dst.ident)
        if dst is not None and dst_ino is not None and not exchange:
            self.inodes.unlinked(dst_ino, dst_path, last=_last_name(dst))
        if src.is_dir or (dst is not None and dst.is_dir):
            # Paths below a directory change too: every path-keyed record is
            # rewritten (rare: only upper-only directories move).
            up.moved(src_path, dst_path)
            self.inodes.moved({src_path: dst_path, dst_path: src_path} if exchange else {src_path: dst_path})
        else:
            # Files: just the names of the one or two objects involved.
            src_ino = self._ino(src, src_path)
            if src_ino != dst_ino:  # (exchanging two names of one file changes nothing)
                self.inodes.renamed(src_ino, src_path, dst_path)
                if exchange and dst_ino is not None:
                    self.inodes.renamed(dst_ino, dst_path, src_path)
        if src_node is not None and not src_node.gone:
            src_node.parent = np.ino

    def _rename_over(
        self, up: Upper, op: Node, old_name: bytes, np: Node, new_name: bytes,
        src: Entry, dst: Entry | None, old_dir: int, new_dir: int,
    ) -> None:
        """A replacing rename, leaving a whiteout at the old name when a lower
        layer still has it (overlayfs's RENAME_WHITEOUT / exchange dance)."""
        hidden = dst is None and up.lstat(np.path, new_name) is not None  # an upper whiteout
        if dst is not None and dst.is_dir and dst.layers[0] == 0 and dst.layers != (0,):
            up.clear_dir(join(np.path, new_name))  # merged, and found empty: whiteouts only
        if self._lower_positive(op.entry, op.path, old_name):
            if hidden:
                renameat2(old_dir, old_name, new_dir, new_name, RENAME_EXCHANGE)
                return
            try:
                renameat2(old_dir, old_name, new_dir, new_name, RENAME_WHITEOUT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EPERM):
                    raise
                os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)
                self.markers.make_whiteout(old_dir, old_name)
        elif src.is_dir and hidden:
            renameat2(old_dir, old_name, new_dir, new_name, RENAME_EXCHANGE)
            os.unlink(old_name, dir_fd=old_dir)
        else:
            os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)

    # -- files --------------------------------------------------------------------

    def open_file(self, ino: int, flags: int, caller: Caller = DAEMON) -> int:
        """open(2) of any kind by *caller* (counted in its fair share, see
        :mod:`.handles`); a write open copies up first.  Returns the fd,
        which is also the FUSE file handle."""
        node = self.node(ino)
        if node.entry.is_dir:
            raise fs_error(errno.EISDIR)
        with self.handles.share.admitted(caller.uid):
            fd = self._open_file(node, flags)
            self.handles.add(fd, ino, caller.uid)
        return fd

    def _open_file(self, node: Node, flags: int) -> int:
        """The backing fd of an open with *flags* (the handle is counted by the caller)."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            # O_TRUNC: copy no data, as overlayfs does (copy_up.c, "maybe
            # truncate regular file"): the open empties the file anyway, and
            # copying it first needs room for data about to be thrown away
            # (ENOSPC for `> file` of a large lower file on a nearly full upper).
            self.copyups.node(node, data=not flags & os.O_TRUNC)
        return self.open_object(node, flags & BACKING_FLAGS)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return os.pwrite(fh, data, offset)

    # -- attributes ---------------------------------------------------------------

    def setattr(self, ino: int, change: SetAttr, fh: int | None) -> Attr:
        node = self.node(ino)
        self._up()
        self.copyups.node(node)
        # The kernel's handle, where it sent one, is the object itself.
        fd = fh if fh is not None and fh in self.handles else None
        path, follow = (proc_path(fd), True) if fd is not None else self.object_path(node)
        if change.size is not None:
            try:
                os.ftruncate(fd, change.size) if fd is not None else os.truncate(path, change.size)
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.EINVAL) or fd is None:
                    raise
                os.truncate(path, change.size)  # a handle open read-only: truncate the object it names
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else change.uid
            gid = -1 if change.gid is None else change.gid
            os.chown(path, uid, gid, follow_symlinks=follow)
        if change.mode is not None and not stat.S_ISLNK(node.entry.st.st_mode):
            _chmod(path, follow, stat.S_IMODE(change.mode))
        if change.atime_ns is not None or change.mtime_ns is not None:
            cur = os.stat(path, follow_symlinks=follow)
            times = (
                cur.st_atime_ns if change.atime_ns is None else change.atime_ns,
                cur.st_mtime_ns if change.mtime_ns is None else change.mtime_ns,
            )
            os.utime(path, ns=times, follow_symlinks=follow)
        return self.getattr(ino)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, caller: Caller = DAEMON) -> None:
        """Set an xattr; *flags* (XATTR_CREATE, XATTR_REPLACE) are decided by the
        upper copy's own setxattr, after the copy-up, as overlayfs does."""
        node = self.node(ino)
        self._up()
        _may_change_xattr(name, caller)
        self.copyups.node(node)
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
        self.copyups.node(node)
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

    # -- durability ---------------------------------------------------------------

    def fsyncdir(self, handle: int) -> None:
        d = self._dirs.get(handle)
        node = self.inodes.get(d.ino) if d is not None else None
        if node is None or node.gone or self.upper is None:
            return
        # A directory without an upper part has nothing to sync.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.upper.fsync_dir(node.path)


def _may_change_xattr(name: bytes, caller: Caller) -> None:
    """EPERM for a ``trusted.*`` change without CAP_SYS_ADMIN, as the kernel
    answers before asking any filesystem (``xattr_permission``)."""
    if name.startswith(TRUSTED) and not caller.sys_admin():
        raise fs_error(errno.EPERM, name)


def _last_name(entry: Entry) -> bool:
    """Whether removing a name of *entry* leaves the object without a name
    in the merged view (merged link count, for indexed hard links)."""
    return entry.is_dir or (entry.st.st_nlink if entry.nlink is None else entry.nlink) <= 1


__all__ = ["Caller", "SetAttr", "WritableUnionFS"]


def _chmod(path: bytes, follow: bool, mode: int) -> None:
    """chmod without following a final symlink: Linux has no lchmod, so the
    object is opened O_PATH|O_NOFOLLOW and changed through its fd's magic
    link.  Should the name turn out to be a symlink (swapped in behind the
    mount's back), nothing is changed: following it could reach any file."""
    if follow:  # a magic link naming the object itself (an fd we hold)
        os.chmod(path, mode)
        return
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise fs_error(errno.ESTALE, path)
        os.chmod(proc_path(fd), mode)
    finally:
        os.close(fd)
