"""What every part of the write path shares: the upper, its copy-up side,
and the ways requests reach them.

:class:`~.writes.WritableUnionFS` is assembled from subclasses of
:class:`Writable`, one per kind of state a request changes (:mod:`.creates`,
:mod:`.openfiles`, :mod:`.removes`, :mod:`.attributes`).  They are parts of
one class, not objects it forwards to: a request stays one method call on
the mount's one object, as the FUSE engines expect, with no layer of
indirection on the hot path; and all of them run under the caller's
``fs.lock`` (:mod:`.locking`) as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from ..config import MountConfig
from ..errors import fs_error
from .copyups import CopyUps
from .entry import Entry
from .inodes import Node
from .paths import proc_path
from .union import UnionFS
from .upper import Upper


class Writable(UnionFS):
    """A :class:`UnionFS` with an upper layer that may take changes (EROFS
    when mounted read-only): the state all write-path parts share."""

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
        #: Whether a directory with lower parts may be renamed, leaving a
        #: redirect record (``redirect_dir=on``); otherwise EXDEV.
        self.redirect_dir = cfg.redirect_dir == "on"

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

    # -- durability ---------------------------------------------------------------

    def fsyncdir(self, handle: int) -> None:
        ino = self.dirs.ino_of(handle)
        if ino is not None:
            self.fsyncdir_of(ino)

    def fsyncdir_of(self, ino: int) -> None:
        """fsync of directory *ino*'s upper part (also for a reader without a
        handle, see :meth:`.UnionFS.readdir_at`)."""
        node = self.inodes.get(ino)
        if node is None or node.gone or self.upper is None:
            return
        # A directory without an upper part has nothing to sync.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.upper.fsync_dir(node.path)


def chmod_entry(path: bytes, follow: bool, mode: int) -> None:
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
