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

Requests run on the event loop except the data copy of a copy-up, which runs
in a worker thread so that a large copy does not stall other requests.  While
an object is being copied up, other requests that would change it or its
name wait for the copy (:meth:`WritableUnionFS._settle`); requests on other
objects go on.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import copyup, origin
from .config import MountConfig
from .errors import fs_error
from .inodes import Node
from .paths import check_name, join, proc_path, split
from .resolve import Entry
from .syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2
from .union import Attr, UnionFS
from .upper import Upper

_ACCESS_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_DIRECT | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
_THREAD_MIN = 1 << 16  # smaller copy-ups are cheaper inline than in a thread


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: new entries belong to them (the kernel checked permissions)."""

    uid: int
    gid: int


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
        self._busy: dict[int, trio.Event] = {}
        self._fh_ino: dict[int, int] = {}
        self._handles: dict[int, set[int]] = {}  # ino -> its open file handles
        if self.upper is not None and not self.readonly:
            self.resolver.index_hook = self._indexed
        #: Called with the inode number of an object whose attributes changed
        #: other than by the request at hand (a directory copied up as a
        #: parent becomes merged: its link count drops to 1), so the FUSE
        #: adapter can make the kernel forget what it cached.
        self.attrs_changed: Callable[[int], None] = lambda ino: None

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

    async def _settle(self, *inos: int) -> bool:
        """Wait until no copy-up of *inos* is in flight; whether it waited."""
        waited = False
        for ino in inos:
            while (ev := self._busy.get(ino)) is not None:
                waited = True
                await ev.wait()
        return waited

    def _ino(self, entry: Entry, path: bytes) -> int:
        return self.inodes.number(entry.ident, path)

    def _update(self, path: bytes, entry: Entry) -> None:
        """Give the node the kernel holds for *entry* (if any) the new entry."""
        node = self.inodes.get(self._ino(entry, path))
        if node is not None and not node.gone:
            node.entry = entry
            self.attrs_changed(node.ino)

    def _lower_positive(self, parent: Entry, parent_rel: bytes, name: bytes) -> bool:
        """Whether a layer below the upper still shows *name* in *parent*
        (then removing it needs a whiteout); overlayfs's ``ovl_lower_positive``."""
        for layer in parent.layers:
            if layer == 0 and self.upper is not None:
                continue
            st = self.stack.lstat(layer, parent_rel, name)
            if st is None:
                if self.resolver._oci_whiteout(layer, parent_rel, name):
                    return False
                continue
            return not (
                self.markers.is_device_whiteout(st)
                or (
                    layer in parent.xwh
                    and self.markers.may_be_xwhiteout(st)
                    and self.markers.has_whiteout_xattr(self.stack.listxattr(layer, join(parent_rel, name)))
                )
            )
        return False

    # -- copy-up --------------------------------------------------------------

    def _parent_up(self, parent: Node) -> Entry:
        """The entry of directory node *parent*, copied up first if needed
        (without a walk from the root when it has its upper copy already)."""
        if parent.entry.layers[0] == 0:
            return parent.entry
        return self._upper_dir(parent.path)

    def _upper_dir(self, rel: bytes) -> Entry:
        """The merged entry of directory *rel*, copied up (with its parents) first."""
        up = self._up()
        entry = self.inodes[1].entry
        at = b""
        for name in rel.split(b"/") if rel else []:
            child = self.resolver.child(entry, at, name)
            if child is None or not child.is_dir:
                raise fs_error(errno.ENOENT, rel)
            if child.layers[0] != 0:
                src = child.layers[0]
                src_dir = self.stack.fds.dup(src, at)
                times = up.dir_times(at)
                try:
                    record = origin.of(src_dir, name)
                    st = copyup.copy_up(
                        src_dir, name, up.work, up.dirfd(at), up.keep_xattr, fsync=False,
                        extra_xattrs={self.markers.origin_xattr: record} if record else None,
                    )
                finally:
                    os.close(src_dir)
                if record:
                    up.set_impure(at)
                up.restore_times(at, times)
                child = Entry((0, *child.layers), st, child.ident, child.xwh)
                self.resolver.cache.changed(entry.ident, name)
                self._update(join(at, name), child)
            entry, at = child, join(at, name)
        return entry

    async def _copy_up(self, node: Node, path: bytes | None = None, data: bool = True) -> None:
        """Make sure *node* has its own upper copy; directories copy up empty.

        *path* picks which name of a hard-linked file gets the upper copy
        (default: the node's current name).  ``data=False`` copies a file
        empty, for an open that truncates it anyway.
        """
        up = self._up()
        await self._settle(node.ino)
        if node.entry.layers[0] == 0:
            return
        if node.gone:
            raise fs_error(errno.EEXIST)  # its name is whited out: do not bring it back (overlayfs: EEXIST)
        if node.entry.is_dir:
            node.entry = self._upper_dir(node.path)
            return
        done = self._busy[node.ino] = trio.Event()
        if path is not None and path != node.path:
            if node.aliases is None:
                node.aliases = set()
            node.aliases.add(node.path)
            node.aliases.discard(path)
            node.path = path
        try:
            parent_rel, name = split(node.path)
            self._upper_dir(parent_rel)
            times = up.dir_times(parent_rel)
            src, src_st = node.entry.layers[0], node.entry.st
            fds = [self.stack.fds.dup(src, parent_rel), os.dup(up.work), self.stack.fds.dup(0, parent_rel)]
            try:
                record = origin.of(fds[0], name)
                extra = {self.markers.origin_xattr: record} if record else None
                key = origin.index_name(record) if record and src_st.st_nlink > 1 else None
                if key is not None and key not in up.index_keys:
                    # A hard-linked lower file is copied once, to the index,
                    # and every name of it links there (overlayfs's index=on).
                    assert extra is not None
                    extra[self.markers.nlink_xattr] = origin.nlink_record(src_st.st_nlink, 1)
                    fds.append(os.dup(up.index))
                    job = functools.partial(
                        copyup.copy_up, fds[0], name, fds[1], fds[3], up.keep_xattr, True, extra, key, data=data
                    )
                else:
                    job = functools.partial(
                        copyup.copy_up, fds[0], name, fds[1], fds[2], up.keep_xattr, True, extra, data=data
                    )
                if key is not None and key in up.index_keys:
                    pass  # copied before, under another name: only a link is needed
                elif data and src_st.st_size >= _THREAD_MIN:
                    await trio.to_thread.run_sync(job)
                else:
                    job()
            finally:
                for fd in fds:
                    os.close(fd)
            parent_rel, name = split(node.path)  # a rename may have moved it meanwhile
            self.resolver.cache.changed(self._upper_dir(parent_rel).ident, name)
            if key is not None:
                up.index_keys.add(key)
                entry = self._link_up(key, parent_rel, name, node.entry.ident)
            else:
                st = self.stack.stat_self(0, node.path)
                entry = Entry((0,), st, node.entry.ident)
                self.resolver.origins[(st.st_dev, st.st_ino)] = node.entry.ident
            if record:
                up.set_impure(parent_rel)
            up.restore_times(parent_rel, times)
            node.entry, node.xattrs = entry, None
            self._repoint(node)
            if key is not None:
                # FUSE names the file being changed by inode only, so the name
                # the caller used may be any of the names we handed out for it:
                # link the copy under each (the kernel links just the one used
                # and serves the others from the index, as our lookups would).
                for alias in sorted(node.aliases or ()):
                    with contextlib.suppress(OSError):
                        self._resolve_path(alias)
        finally:
            del self._busy[node.ino]
            done.set()

    def _indexed(self, layer: int, parent_rel: bytes, name: bytes, st: os.stat_result) -> Entry | None:
        """The resolver found a lower file with several links: if the index has
        its copy (made through another name), link this name to it too, so every
        name shows the same, current file."""
        up = self.upper
        if up is None or not up.index_keys:
            return None
        record = origin.of(self.stack.dirfd(layer, parent_rel), name)
        if record is None or origin.index_name(record) not in up.index_keys:
            return None
        self._upper_dir(parent_rel)
        times = up.dir_times(parent_rel)
        entry = self._link_up(origin.index_name(record), parent_rel, name, (st.st_dev, st.st_ino))
        up.set_impure(parent_rel)
        up.restore_times(parent_rel, times)
        return entry

    def _link_up(self, key: bytes, parent_rel: bytes, name: bytes, ident: tuple[int, int]) -> Entry:
        """Link index entry *key* to *name*: one more upper link, the same
        merged count, so the ``overlay.nlink`` record drops by one."""
        up = self._up()
        before = os.stat(key, dir_fd=up.index, follow_symlinks=False)
        path = proc_path(up.index, key)
        try:
            merged = origin.parse_nlink(
                os.getxattr(path, self.markers.nlink_xattr, follow_symlinks=False), before.st_nlink, before.st_nlink
            )
        except OSError:
            merged = None
        merged = merged or before.st_nlink
        os.link(key, name, src_dir_fd=up.index, dst_dir_fd=up.dirfd(parent_rel), follow_symlinks=False)
        st = os.stat(name, dir_fd=up.dirfd(parent_rel), follow_symlinks=False)
        os.setxattr(path, self.markers.nlink_xattr, origin.nlink_record(merged, st.st_nlink), follow_symlinks=False)
        self.resolver.origins[(st.st_dev, st.st_ino)] = ident
        return Entry((0,), st, ident, nlink=merged)

    def _repoint(self, node: Node) -> None:
        """Re-open read-only handles of a just copied-up file on the copy, in
        place (dup2 keeps the handle number), so they see later writes."""
        for fh in self._handles.get(node.ino, ()):
            fd = self.stack.open_file(0, node.path, os.O_RDONLY)
            os.dup2(fd, fh)
            os.close(fd)

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
        parent.entry = self._parent_up(parent)
        pst = self.stack.stat_self(0, parent.path)
        gid = caller.gid
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
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

    def _new_node(self, parent: Node, name: bytes, entry: Entry) -> tuple[Node, Attr]:
        node = self.inodes.remember(join(parent.path, name), entry, parent.ino)
        return node, self.attr_of(node.ino, entry)

    async def create(
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
            fh = await self.open_file(node.ino, flags & ~os.O_CREAT)
            return fh, node, self.getattr(node.ino)
        open_flags = (flags & _ACCESS_FLAGS & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

        def make(dfd: int, n: bytes, m: int) -> int:
            return os.open(n, open_flags, stat.S_IMODE(m), dir_fd=dfd)

        entry, fd = self._create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), caller, make)
        assert fd is not None
        node, attr = self._new_node(parent, name, entry)
        self._track(fd, node.ino)
        self._files.add(fd)
        return fd, node, attr

    def mkdir(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> tuple[Node, Attr]:
        parent = self._dir_node(parent_ino)

        def make(dfd: int, n: bytes, m: int) -> None:
            os.mkdir(n, stat.S_IMODE(m) & 0o777, dir_fd=dfd)

        entry, _ = self._create(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), caller, make)
        return self._new_node(parent, name, entry)

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, caller: Caller) -> tuple[Node, Attr]:
        parent = self._dir_node(parent_ino)
        if stat.S_ISCHR(mode) and rdev == 0:
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

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> tuple[Node, Attr]:
        node = self.node(ino)
        if node.entry.is_dir:
            raise fs_error(errno.EPERM)
        if node.gone:
            raise fs_error(errno.ENOENT)
        parent = self._dir_node(new_parent_ino)
        up = self._up()
        check_name(new_name)
        if self.markers.is_oci_marker(new_name):
            raise fs_error(errno.EPERM, new_name)
        if self.resolver.child(parent.entry, parent.path, new_name) is not None:
            raise fs_error(errno.EEXIST, new_name)
        await self._copy_up(node)
        parent.entry = self._parent_up(parent)
        src_parent, src_name = split(node.path)
        src_dir = self.stack.fds.dup(0, src_parent)
        try:
            if up.lstat(parent.path, new_name) is None:
                os.link(src_name, new_name, src_dir_fd=src_dir, dst_dir_fd=up.dirfd(parent.path), follow_symlinks=False)
            else:
                tmp = copyup.tmp_name()
                os.link(src_name, tmp, src_dir_fd=src_dir, dst_dir_fd=up.work, follow_symlinks=False)
                up.install(tmp, parent.path, new_name, False)
        finally:
            os.close(src_dir)
        self.resolver.cache.changed(parent.entry.ident, new_name)
        path = join(parent.path, new_name)
        if node.aliases is None:
            node.aliases = set()
        node.aliases.add(path)
        node.lookups += 1
        return node, self.getattr(node.ino)

    # -- removing -------------------------------------------------------------

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        await self._remove(parent_ino, name, is_dir=False)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        await self._remove(parent_ino, name, is_dir=True)

    async def _remove(self, parent_ino: int, name: bytes, is_dir: bool) -> None:
        parent = self._dir_node(parent_ino)
        up = self._up()
        entry = self.resolver.child(parent.entry, parent.path, name)
        if entry is None:
            raise fs_error(errno.ENOENT, name)
        path = join(parent.path, name)
        ino = self._ino(entry, path)
        if await self._settle(ino):
            entry = self.resolver.child(parent.entry, parent.path, name)
            if entry is None:
                raise fs_error(errno.ENOENT, name)
        if entry.is_dir != is_dir:
            raise fs_error(errno.ENOTDIR if is_dir else errno.EISDIR, name)
        if is_dir and self.resolver.listing(entry, path):
            raise fs_error(errno.ENOTEMPTY, name)
        if not is_dir and entry.layers[0] != 0 and entry.st.st_nlink > 1:
            # A name of a hard-linked lower file: copy it up (to the index)
            # first, so the merged link count has a record to drop, as
            # overlayfs does with index=on.
            entry = await self._copied(entry, path)
        parent.entry = self._parent_up(parent)
        last = _last_name(entry)
        if last:
            self._last_goes(ino, entry, path)
        if entry.layers[0] != 0:
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

    def _last_goes(self, ino: int, entry: Entry, path: bytes) -> None:
        """Before the last name of *entry* (at *path*) goes: hold its object
        for the node the kernel still has (see :attr:`.inodes.Node.pin`), and
        drop what is known about it by upper inode number."""
        layer = entry.layers[0]
        if layer == 0:
            # Its number may be reused once it is freed: forget what it copied.
            self.resolver.origins.pop((entry.st.st_dev, entry.st.st_ino), None)
        node = self.inodes.get(ino)
        if node is None or node.pin is not None:
            return
        parent, name = split(path)
        node.pin = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.stack.dirfd(layer, parent))

    # -- rename -----------------------------------------------------------------

    async def rename(self, old_pino: int, old_name: bytes, new_pino: int, new_name: bytes, flags: int) -> None:
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
        await self._settle(*(i for i in (src_node.ino if src_node else None, dst_ino) if i is not None))
        if not src.is_dir:
            src = await self._copied(src, src_path)
        if dst is not None and not dst.is_dir and (exchange or dst.st.st_nlink > 1):
            # A name of a hard-linked lower file is copied up (linked to the
            # index) before it is replaced, so its merged link count drops.
            dst = await self._copied(dst, dst_path)
        op.entry = self._upper_dir(op.path)
        np.entry = self._upper_dir(np.path)
        if dst is not None and not exchange and dst_ino is not None and _last_name(dst):
            self._last_goes(dst_ino, dst, dst_path)
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
            for d in self._dirs.values():
                d.path = _remap(d.path, src_path, dst_path, exchange)
        else:
            # Files: just the names of the one or two objects involved.
            src_ino = self._ino(src, src_path)
            if src_ino != dst_ino:  # (exchanging two names of one file changes nothing)
                self.inodes.renamed(src_ino, src_path, dst_path)
                if exchange and dst_ino is not None:
                    self.inodes.renamed(dst_ino, dst_path, src_path)
        if src_node is not None and not src_node.gone:
            src_node.parent = np.ino

    async def _copied(self, entry: Entry, path: bytes) -> Entry:
        """*entry* at *path*, copied up if it is not yet (non-directories)."""
        if entry.layers[0] == 0:
            return entry
        node = self.inodes.get(self._ino(entry, path))
        if node is None or node.gone:
            node = Node(self._ino(entry, path), path, entry)
        await self._copy_up(node, path)
        return node.entry

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

    async def open_file(self, ino: int, flags: int) -> int:
        """open(2) of any kind; a write open copies up first.  Returns the fd,
        which is also the FUSE file handle."""
        node = self.node(ino)
        if node.entry.is_dir:
            raise fs_error(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            # O_TRUNC: copy no data, as overlayfs does (copy_up.c, "maybe
            # truncate regular file"): the open empties the file anyway, and
            # copying it first needs room for data about to be thrown away
            # (ENOSPC for `> file` of a large lower file on a nearly full upper).
            await self._copy_up(node, data=not flags & os.O_TRUNC)
        try:
            fd = self.stack.open_file(node.entry.layers[0], node.path, flags & _ACCESS_FLAGS)
        except FileNotFoundError:
            self._relocate(node)
            fd = self.stack.open_file(node.entry.layers[0], node.path, flags & _ACCESS_FLAGS)
        self._files.add(fd)
        self._track(fd, ino)
        return fd

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return os.pwrite(fh, data, offset)

    def _track(self, fh: int, ino: int) -> None:
        self._fh_ino[fh] = ino
        self._handles.setdefault(ino, set()).add(fh)

    def release(self, fh: int) -> None:
        ino = self._fh_ino.pop(fh, None)
        if ino is not None:
            handles = self._handles[ino]
            handles.discard(fh)
            if not handles:
                del self._handles[ino]
        super().release(fh)

    def _fd_of(self, ino: int) -> int | None:
        """An fd on *ino*'s object: an open handle, else the pin of a gone node."""
        fd = next(iter(self._handles.get(ino, ())), None)
        if fd is None:
            node = self.inodes.get(ino)
            fd = node.pin if node is not None else None
        return fd

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.gone:
            fd = self._fd_of(ino)
            if fd is None:
                raise fs_error(errno.ENOENT)
            st = os.fstat(fd)
            node.entry = Entry(node.entry.layers, st, node.entry.ident, node.entry.xwh, self._unlinked_nlink(fd, st))
            return self.attr_of(ino, node.entry)
        try:
            return super().getattr(ino)
        except FileNotFoundError:
            self._relocate(node)
            return super().getattr(ino)

    def _unlinked_nlink(self, fd: int, st: os.stat_result) -> int | None:
        """The merged link count of an object with no merged name left: an
        indexed hard link keeps its index name, and its ``overlay.nlink``
        record says how many merged names it has (0 now), as the kernel's
        in-memory count does."""
        if st.st_nlink == 0 or stat.S_ISDIR(st.st_mode):
            return None
        return self.resolver.nlink_of(proc_path(fd), True, st, unlinked=True)

    def _relocate(self, node: Node) -> None:
        """Re-resolve a hard-linked file whose current name is not where its
        entry says (a name still only in a lower layer, of a file whose copy
        is in the index): resolving it links that name to the copy."""
        if node.entry.is_dir or node.gone:
            raise fs_error(errno.ENOENT)
        entry = self._resolve_path(node.path)
        if entry.ident != node.entry.ident:
            raise fs_error(errno.ENOENT)
        node.entry = entry

    # -- attributes ---------------------------------------------------------------

    async def setattr(self, ino: int, change: SetAttr, fh: int | None) -> Attr:
        node = self.node(ino)
        self._up()
        await self._copy_up(node)
        if fh is None and not node.gone and node.path and self.stack.lstat(0, *split(node.path)) is None:
            self._relocate(node)
        fd = fh if fh is not None and fh in self._fh_ino else (self._fd_of(ino) if node.gone else None)
        path, follow = (proc_path(fd), True) if fd is not None else self._upper_path(node)
        if change.size is not None:
            if fd is not None and fd in self._fh_ino:
                os.ftruncate(fd, change.size)
            elif fd is not None:
                os.truncate(path, change.size)  # a pin (O_PATH) names the file only
            else:
                tfd = self.stack.open_file(0, node.path, os.O_WRONLY)
                try:
                    os.ftruncate(tfd, change.size)
                finally:
                    os.close(tfd)
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

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.node(ino)
        self._up()
        await self._copy_up(node)
        path, follow = self._upper_path(node)
        node.xattrs = None
        os.setxattr(path, self.markers.stored_xattr(name), value, follow_symlinks=follow)

    async def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        self._up()
        stored = self.markers.stored_xattr(name)
        if node.entry.layers[0] != 0:
            self.getxattr(ino, name)  # ENODATA without a copy-up, as overlayfs does
        await self._copy_up(node)
        path, follow = self._upper_path(node)
        node.xattrs = None
        os.removexattr(path, stored, follow_symlinks=follow)

    def _upper_path(self, node: Node) -> tuple[bytes, bool]:
        """A path to *node*'s upper object for calls without an ``*at`` form,
        and whether its last step must be followed (only the root's magic link)."""
        return self.stack.entry_path(0, node.path)

    # -- durability ---------------------------------------------------------------

    def fsyncdir(self, handle: int) -> None:
        d = self._dirs.get(handle)
        if d is None or self.upper is None:
            return
        # A directory without an upper part has nothing to sync.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.upper.fsync_dir(d.path)


def _last_name(entry: Entry) -> bool:
    """Whether removing a name of *entry* leaves the object without a name
    in the merged view (merged link count, for indexed hard links)."""
    return entry.is_dir or (entry.st.st_nlink if entry.nlink is None else entry.nlink) <= 1


def _remap(path: bytes, a: bytes, b: bytes, exchange: bool) -> bytes:
    for old, new in ((a, b), (b, a)) if exchange else ((a, b),):
        if path == old:
            return new
        if path.startswith(old + b"/"):
            return new + path[len(old) :]
    return path


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
