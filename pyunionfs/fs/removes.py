"""Names that go: unlink, rmdir, rename.

The kernel's rules (``fs/overlayfs/dir.c``): removing a name leaves a
whiteout when a lower layer still has it ("lower positive"), else just
removes the upper entry; a directory with lower parts is not renamed (EXDEV:
``redirect_dir=off``), and an upper-only directory moved into a merged
parent becomes opaque.  Before a name the kernel may still hold goes away,
its object is pinned (:meth:`Removes._name_goes`), so requests naming the
inode still reach it.
"""

from __future__ import annotations

import errno
import os

from ..errors import fs_error
from .entry import Entry
from .inodes import Node
from .paths import check_name, join
from .syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2
from .upper import Upper
from .writable import Writable


class Removes(Writable):
    """The requests that take a name away (or move it)."""

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
        if entry.index is not None:
            dfd, name = self._up().index, entry.index
        else:
            dfd, name = self.stack.at(layer, path)
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
        # A directory with lower parts moves only with a redirect record
        # saying where they are (redirect_dir=on); else EXDEV, and mv copies.
        # (overlayfs checks this before whether the target is empty.)
        src_redirects = src.is_dir and src.layers != (0,)
        dst_redirects = exchange and dst is not None and dst.is_dir and dst.layers != (0,)
        if (src_redirects or dst_redirects) and not self.redirect_dir:
            raise fs_error(errno.EXDEV)
        # (An upper-only target's emptiness is left to rename(2) itself, after
        # the source got its opaque marker: the kernel's order.)
        merged_target = dst is not None and not exchange and dst.is_dir and dst.layers != (0,)
        if merged_target and dst is not None and self.resolver.listing(dst, dst_path):
            raise fs_error(errno.ENOTEMPTY, new_name)
        self.copyups.settle(*(i for i in (src_node.ino if src_node else None, dst_ino) if i is not None))
        # (A file moving copies up only its metadata with metacopy=on; a
        # metadata-only copy then records where its data is, as a directory does.)
        if not src.is_dir:
            src = self.copyups.entry(src, src_path, meta=True)
        elif src_redirects:
            src = self.copyups.upper_dir(src_path)
        if dst_redirects:
            dst = self.copyups.upper_dir(dst_path)
        if dst is not None and not dst.is_dir and (exchange or dst.st.st_nlink > 1 or dst.index is not None):
            # A name of a hard-linked lower file is copied up (linked to the
            # index) before it is replaced, so its merged link count drops.
            dst = self.copyups.entry(dst, dst_path, meta=exchange)
        src_redirects = src_redirects or src.data is not None
        dst_redirects = dst_redirects or (exchange and dst is not None and dst.data is not None)
        samedir = op.ino == np.ino
        op.entry = self.copyups.upper_dir(op.path)
        np.entry = op.entry if samedir else self.copyups.upper_dir(np.path)
        if dst is not None and not exchange and dst_ino is not None:
            self._name_goes(dst_ino, dst, dst_path, _last_name(dst))
        redirects = [(p, v) for p, on in ((src_path, src_redirects), (dst_path, dst_redirects)) if on
                     for v in [up.redirect_for(p, samedir)] if v is not None]
        old_dir = self.stack.fds.dup(0, op.path)
        try:
            new_dir = old_dir if samedir else self.stack.fds.dup(0, np.path)
        except BaseException:
            os.close(old_dir)
            raise
        try:
            for path, value in redirects:
                up.set_redirect(path, value)
            if not samedir:
                # A directory that receives a copied-up entry (one with an
                # origin) is marked impure, as the kernel's ovl_rename does.
                if src.ident != src.real:
                    up.set_impure(np.path)
                if exchange and dst is not None and dst.ident != dst.real:
                    up.set_impure(op.path)
            if src.is_dir and not src_redirects and np.entry.merged and not up.is_opaque(src_path):
                up.set_opaque(src_path)
            if exchange:
                assert dst is not None
                if dst.is_dir and not dst_redirects and op.entry.merged and not up.is_opaque(dst_path):
                    up.set_opaque(dst_path)
                renameat2(old_dir, old_name, new_dir, new_name, RENAME_EXCHANGE)
            else:
                self._rename_over(up, op, old_name, np, new_name, src, dst, old_dir, new_dir)
        finally:
            os.close(old_dir)
            if new_dir != old_dir:
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
            paths = {src_path: dst_path, dst_path: src_path} if exchange else {src_path: dst_path}
            self.inodes.moved(paths)
            if self.stack.moved:
                self.stack.renamed(paths)
                self.resolver.presence.clear()
            if src_redirects or dst_redirects:
                # Resolved again now, through the new record: so the moved
                # directories' lower parts are found below their new names.
                for node, name, on in ((np, new_name, src_redirects), (op, old_name, dst_redirects)):
                    moved = self.resolver.child(node.entry, node.path, name) if on else None
                    held = self.inodes.get(self._ino(moved, join(node.path, name))) if moved else None
                    if held is not None and moved is not None:
                        held.entry = moved
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


def _last_name(entry: Entry) -> bool:
    """Whether removing a name of *entry* leaves the object without a name
    in the merged view (merged link count, for indexed hard links)."""
    return entry.is_dir or (entry.st.st_nlink if entry.nlink is None else entry.nlink) <= 1
