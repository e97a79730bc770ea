"""Copy-up through the mount: which object gets an upper copy, when, and under which name.

:mod:`.copyup` knows how to build one copy atomically; this module decides
what to copy and keeps the mount's records right around it (overlayfs's
``copy_up.c``):

* parents first: a name is copied up into a directory that has its own
  upper copy (:meth:`CopyUps.upper_dir`);
* one copy at a time per object: while an object is being copied up,
  requests that would change it or its name wait for it
  (:meth:`CopyUps.settle`, the per-inode lock).  The data copy of a large
  file runs without the core's lock (:mod:`.locking`), so requests on other
  objects go on meanwhile;
* a lower file with several links is copied once, to the work dir's
  ``index/`` (index=on), and each name that is itself copied up afterwards
  is linked to that copy (:meth:`CopyUps.link_up`, overlayfs's
  ``ovl_link_up``).  A name nobody copied up stays lower-only and resolves
  to the index copy (:attr:`.resolve.Entry.index`): lookups never write.

Copy-up is invisible in the merged view: parent times are put back, and
read-only handles of the old lower file move onto the copy in place.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import WouldBlock, fs_error
from . import copyup, origin, override
from .entry import DataRef, Entry, Stat
from .inodes import Node
from .locking import may_block
from .paths import join, proc_path, split
from .upper import Upper

if TYPE_CHECKING:
    from .union import UnionFS

#: Data copies from this size on run without the core's lock (and raise
#: WouldBlock where the thread may not block); smaller ones are cheaper done
#: at once than handed to a worker thread.
LONG_COPY = 1 << 16


class CopyUps:
    """Copy-ups of one writable mount, and the per-object lock around them."""

    def __init__(self, fs: UnionFS, up: Upper) -> None:
        self.fs = fs
        self.up = up
        self._busy: dict[int, threading.Event] = {}
        #: Called with the inode number of an object whose attributes changed
        #: other than by the request at hand (a directory copied up as a
        #: parent becomes merged: its link count drops to 1), so the FUSE
        #: adapter can make the kernel forget what it cached.
        self.attrs_changed: Callable[[int], None] = lambda ino: None

    def settle(self, *inos: int) -> bool:
        """Wait until no copy-up of *inos* is in flight; whether it waited.
        The core's lock is let go meanwhile (WouldBlock where waiting is not
        allowed: nothing was changed yet)."""
        waited = False
        for ino in inos:
            while (ev := self._busy.get(ino)) is not None:
                if not may_block():
                    raise WouldBlock
                waited = True
                with self.fs.lock.released():
                    ev.wait()
        return waited

    # -- directories ----------------------------------------------------------

    def parent_up(self, parent: Node) -> Entry:
        """The entry of directory node *parent*, copied up first if needed
        (without a walk from the root when it has its upper copy already)."""
        if parent.entry.layers[0] == 0:
            return parent.entry
        return self.upper_dir(parent.path)

    def upper_dir(self, rel: bytes) -> Entry:
        """The merged entry of directory *rel*, copied up (with its parents) first."""
        fs, up = self.fs, self.up
        entry = fs.inodes[1].entry
        at = b""
        for name in rel.split(b"/") if rel else []:
            child = fs.resolver.child(entry, at, name)
            if child is None or not child.is_dir:
                raise fs_error(errno.ENOENT, rel)
            if child.layers[0] != 0:
                src_fd, src_name = fs.stack.at(child.layers[0], join(at, name))
                src_dir = os.dup(src_fd)
                times = up.dir_times(at)
                try:
                    record = origin.of(src_dir, src_name)
                    st = copyup.copy_up(
                        src_dir, src_name, up.work, up.dirfd(at), up.keep_xattr, fsync=False,
                        extra_xattrs={fs.markers.origin_xattr: record} if record else None, dst_name=name,
                        **self._stamp(child, join(at, name)),
                    )
                finally:
                    os.close(src_dir)
                if record:
                    up.set_impure(at)
                up.restore_times(at, times)
                child = Entry((0, *child.layers), Stat.of(st), child.ident, child.xwh, impure=child.impure)
                fs.resolver.cache.changed(entry.ident, name)
                self._update(join(at, name), child)
            entry, at = child, join(at, name)
        return entry

    def _update(self, path: bytes, entry: Entry) -> None:
        """Give the node the kernel holds for directory *entry* the new entry."""
        node = self.fs.inodes.get(self.fs.inodes.number(entry.ident, path))
        if node is not None and not node.gone:
            node.entry = entry
            self.attrs_changed(node.ino)

    # -- non-directories --------------------------------------------------------

    def node(self, node: Node, data: bool = True, meta: bool = False) -> None:
        """Make sure *node*'s object has an upper copy; directories copy up empty.

        ``data=False`` copies a file empty, for an open that truncates it
        anyway.  ``meta=True``: the change at hand is to metadata only, so
        with ``metacopy=on`` a regular file's data may stay below
        (overlayfs's ``ovl_need_meta_copy_up``); otherwise a metadata-only
        copy gets its data now (:meth:`fill`).
        """
        self.settle(node.ino)
        if node.entry.linked_up:
            if node.entry.data is not None and not meta:
                self.fill(node, data)
            return
        if node.gone:
            raise fs_error(errno.EEXIST)  # its name is whited out: do not bring it back (overlayfs: EEXIST)
        if node.entry.is_dir:
            node.entry = self.upper_dir(node.path)
            return
        self.entry(node.entry, node.path, data, meta)

    def entry(self, entry: Entry, path: bytes, data: bool = True, meta: bool = False) -> Entry:
        """Non-directory *entry*, found at merged *path*, with an upper link at
        *path*: copied up, or linked to its index copy.  The node the kernel
        holds for it (if any) is now known by *path*, with the new entry.
        *meta* as for :meth:`node` (a metadata-only copy stays one)."""
        ino = self.fs.inodes.number(entry.ident, path)
        self.settle(ino)
        if entry.linked_up:
            return entry
        meta = meta and self.fs.resolver.metacopy and stat.S_ISREG(entry.st.st_mode) and entry.index is None and (
            entry.st.st_nlink < 2)
        if data and not meta and entry.index is None and entry.st.st_size >= LONG_COPY and not may_block():
            raise WouldBlock  # (before anything changed)
        done = self._busy[ino] = threading.Event()
        try:
            parent_rel, name = split(path)
            self.upper_dir(parent_rel)
            times = self.up.dir_times(parent_rel)
            if entry.index is not None:
                new = self.link_up(entry.index, parent_rel, name, entry.ident)
                record = True
            else:
                new, record = self._copy(entry, parent_rel, name, data, meta)
            if record:
                self.up.set_impure(parent_rel)
            self.up.restore_times(parent_rel, times)
            self.fs.resolver.cache.changed(self.upper_dir(parent_rel).ident, name)
            node = self.fs.inodes.get(ino)
            if node is not None:
                if node.path != path:  # the name this copy-up gave the object is the one to use
                    node.aliases = (node.aliases or set()) | {node.path}
                    node.aliases.discard(path)
                    node.path = path
                node.entry, node.xattrs = new, None
                self._repoint(node)
            return new
        finally:
            del self._busy[ino]
            done.set()

    def fill(self, node: Node, data: bool = True) -> None:
        """Copy the data of metadata-only copy *node* into it, in place, and
        then drop its ``overlay.metacopy`` record (the kernel's
        ``ovl_copy_up_meta_inode_data``): until the record goes, reads still
        go to the lower data, so a crash, a full disk or a kill -9 midway
        loses nothing.  ``data=False`` (an open that truncates) copies none.
        ``security.capability``, which the write drops, is put back; the
        redirect record stays, as the kernel leaves it.  Read-only handles
        move onto the upper file, so they see the writes that follow."""
        ref = node.entry.data
        assert ref is not None
        size = node.entry.st.st_size if data else 0
        if size >= LONG_COPY and not may_block():
            raise WouldBlock  # (before anything changed)
        fs = self.fs
        done = self._busy[node.ino] = threading.Event()
        try:
            path, follow = fs.object_path(node)
            dst = os.open(path, os.O_WRONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
            try:
                src = fs.open_object(node, os.O_RDONLY)  # the data's file (see UnionFS.open_object)
                try:
                    try:
                        caps: bytes | None = os.getxattr(dst, CAPS)
                    except OSError:
                        caps = None
                    job = functools.partial(_fill_data, src, dst, size)
                    if size >= LONG_COPY:
                        with fs.lock.released():  # owned fds only: other requests may run
                            job()
                    else:
                        job()
                    if caps is not None:
                        os.setxattr(dst, CAPS, caps)
                    for key in fs.markers.metacopy_names:
                        try:
                            os.removexattr(dst, key)
                        except OSError as exc:
                            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                                raise
                finally:
                    os.close(src)
                e = node.entry
                node.entry = e.restat(os.fstat(dst), e.nlink, None)
            finally:
                os.close(dst)
            self._repoint(node)
        finally:
            del self._busy[node.ino]
            done.set()

    def _copy(self, entry: Entry, parent_rel: bytes, name: bytes, data: bool, meta: bool) -> tuple[Entry, bool]:
        """Copy lower *entry* up to *name* (only its metadata if *meta*); the
        new entry, and whether it has an origin record."""
        fs, up = self.fs, self.up
        src, src_st = entry.layers[0], entry.st
        fds = [os.dup(fs.stack.dirfd(src, parent_rel)), os.dup(up.work), fs.stack.fds.dup(0, parent_rel)]
        lowerdata = entry.data
        if meta and lowerdata is None:
            lowerdata = DataRef(src, fs.stack.real(src, join(parent_rel, name)), src_st.st_blocks)
        data_from = None
        if entry.data is not None and not meta:  # a metadata-only copy below: its data is elsewhere
            where, _, base = entry.data.path.rpartition(b"/")
            fds.append(fs.stack.fds.dup(entry.data.layer, where))
            data_from = (fds[-1], base)
        try:
            record = origin.of(fds[0], name)
            extra = {fs.markers.origin_xattr: record} if record else {}
            if meta:
                extra[fs.markers.metacopy_xattr] = b""
            key = origin.index_name(record) if record and src_st.st_nlink > 1 else None
            dst, dst_name = fds[2], None
            if key is not None:
                # A hard-linked lower file is copied once, to the index, and
                # the name linked there (overlayfs's index=on).
                extra[fs.markers.nlink_xattr] = origin.nlink_record(src_st.st_nlink, 1)
                fds.append(os.dup(up.index))
                dst, dst_name = fds[-1], key
            if key is None or key not in up.index_keys:
                # A metadata-only copy is not synced, as the kernel does not
                # (its "ovl: fsync after metadata copy-up": `chown -R` would
                # pay two fsyncs a file); its data copy is (:meth:`fill`).
                job = functools.partial(
                    copyup.copy_up, fds[0], name, fds[1], dst, up.keep_xattr, not meta, extra, dst_name,
                    data=data, sparse=meta, data_from=data_from,
                    **self._stamp(entry, join(parent_rel, name)),
                )
                if data and not meta and src_st.st_size >= LONG_COPY:
                    # Owned fds and no shared state: other requests may run.
                    with fs.lock.released():
                        job()
                else:
                    job()
        finally:
            for fd in fds:
                os.close(fd)
        if key is not None:
            up.index_keys.add(key)
            return self.link_up(key, parent_rel, name, entry.ident), True
        st = fs.stack.stat_self(0, join(parent_rel, name))
        fs.resolver.origins[(st.st_dev, st.st_ino)] = entry.ident
        return Entry((0,), Stat.of(st), entry.ident, data=lowerdata if meta else None), record is not None

    def _stamp(self, entry: Entry, path: bytes) -> dict[str, Any]:
        """copy_up's arguments for a copy whose owner and mode go to a record
        (``xattr_permissions=``, see :mod:`.override`); none otherwise.

        As fuse-overlayfs: a file's record is the owner and mode it shows (its
        lower's record applied), a directory's its stored ones; 0755 added."""
        over = self.fs.overrides
        if over is None:
            return {}
        st = entry.st
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode
        if stat.S_ISREG(st.st_mode):
            rec = self.fs.record(self.fs.inodes.number(entry.ident, path), entry, path)
            if rec is not None:
                uid, gid, mode = rec.uid, rec.gid, override.apply(mode, rec)
        if over.written is None:
            # Without the option a file of a layer with records is copied
            # owned as it showed (fuse-overlayfs chowns the copy to its record).
            return {} if (uid, gid, mode) == (st.st_uid, st.st_gid, st.st_mode) else {"shown": (uid, gid, mode)}
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return {"owned": False}
        return {"owned": False, "record": (over.written, override.format_record(uid, gid, mode | override.REAL_BITS))}

    def link_up(self, key: bytes, parent_rel: bytes, name: bytes, ident: tuple[int, int]) -> Entry:
        """Link index entry *key* to *name*: one more upper link, the same
        merged count, so the ``overlay.nlink`` record drops by one."""
        fs, up = self.fs, self.up
        before = os.stat(key, dir_fd=up.index, follow_symlinks=False)
        path = proc_path(up.index, key)
        try:
            merged = origin.parse_nlink(
                os.getxattr(path, fs.markers.nlink_xattr, follow_symlinks=False), before.st_nlink, before.st_nlink
            )
        except OSError:
            merged = None
        merged = merged or before.st_nlink
        os.link(key, name, src_dir_fd=up.index, dst_dir_fd=up.dirfd(parent_rel), follow_symlinks=False)
        st = os.stat(name, dir_fd=up.dirfd(parent_rel), follow_symlinks=False)
        os.setxattr(path, fs.markers.nlink_xattr, origin.nlink_record(merged, st.st_nlink), follow_symlinks=False)
        fs.resolver.origins[(st.st_dev, st.st_ino)] = ident
        return Entry((0,), Stat.of(st), ident, nlink=merged)

    def _repoint(self, node: Node) -> None:
        """Re-open read-only handles of a just copied-up file on the copy, in
        place (dup2 keeps the handle number), so they see later writes."""
        fhs = self.fs.handles.of(node.ino)
        if not fhs:
            return
        fd = self.fs.open_object(node, os.O_RDONLY)
        try:
            for fh in fhs:
                st = os.fstat(fh)
                if (st.st_dev, st.st_ino) != node.entry.real:
                    os.dup2(fd, fh, inheritable=False)
        finally:
            os.close(fd)


#: The xattr a write drops and a data copy-in must keep (file capabilities).
CAPS = b"security.capability"


def _fill_data(src: int, dst: int, size: int) -> None:
    """The data copy of :meth:`CopyUps.fill`, synced before the record goes."""
    copyup.copy_data(src, dst, size)
    os.fsync(dst)
