"""Open files and writes to them: open (a write open copies up first),
create and O_TMPFILE, write.

Every open is counted in its caller's fair share (:mod:`.handles`) before
anything is opened or made, so EMFILE leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import fs_error
from . import acl
from .callers import DAEMON, Caller
from .creates import Creates
from .entry import Entry
from .handles import BACKING_FLAGS
from .inodes import Node
from .paths import proc_path
from .answers import Attr


class OpenFiles(Creates):
    """The requests that give the caller a file handle."""

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
        return fd, self.inodes.nodes[ino], self.attr_of(ino, self.inodes.nodes[ino].entry, b"")

    def _tmpfile(self, parent: Node, mode: int, flags: int, caller: Caller) -> tuple[int, int]:
        """(fd, inode) of a new nameless file (the handle is counted by the caller)."""
        parent.entry = self.copyups.parent_up(parent)
        recorded = self._recorded()
        if recorded:
            mode, gid, default, access = *self._recorded_mode(stat.S_IFREG | stat.S_IMODE(mode), caller), None, None
        else:
            mode, gid, default, access = self._new_mode(parent, stat.S_IFREG | stat.S_IMODE(mode), caller)
        access_mode = flags & os.O_ACCMODE if flags & os.O_ACCMODE != os.O_RDONLY else os.O_RDWR
        fd = os.open(".", os.O_TMPFILE | access_mode | os.O_CLOEXEC, stat.S_IMODE(mode),
                     dir_fd=self._up().dirfd(parent.path))
        try:
            if recorded:
                self._record_new(-1, b"", fd, self.stored_uid(caller.uid), gid, mode)
            else:
                os.fchown(fd, self.stored_uid(caller.uid), gid)
                os.fchmod(fd, stat.S_IMODE(mode))
            if default is not None:
                acl.inherit(proc_path(fd), True, default, access, False)
            st = os.fstat(fd)
            entry = Entry.lean(0, st)
            pin = os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        ino = self.inodes.number(entry.ident)
        self.inodes.nodes[ino] = Node(ino, b"", entry, lookups=1, parent=parent.ino, gone=True, pin=pin)
        return fd, ino
