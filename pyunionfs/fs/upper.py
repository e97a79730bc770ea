"""The writable upper layer and its work directory: every change made on disk.

Each method here is one step the kernel's overlayfs also takes, done so that
the merged view goes from one consistent state to the next in a single
rename: new objects that must replace a whiteout are built in the work
directory first, and objects that must leave a whiteout behind are swapped
with one (RENAME_WHITEOUT or RENAME_EXCHANGE).  A crash between two steps
leaves at worst an orphan in the work directory, cleaned at the next mount.

The work directory has the kernel's layout, ``work/`` for temporaries and
``index/`` for hard-linked lower files copied up, so that the same directory
can later be handed to ``mount -t overlay -o workdir=``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ..errors import fs_error
from . import copyup
from .layers import LayerStack
from .markers import Markers
from .paths import join, proc_path
from .syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

WORK = b"work"
#: The longest redirect record written (the kernel's ``redirect_max`` default).
REDIRECT_MAX = 256
INDEX = b"index"


def _open_subdir(base: int, name: bytes) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=base)
    return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base)


class Upper:
    """On-disk operations on layer 0 of a writable :class:`LayerStack`."""

    def __init__(self, stack: LayerStack, markers: Markers) -> None:
        self.stack = stack
        self.markers = markers
        base = stack.workdir_fd
        assert base is not None, "a writable stack is opened with its work directory"
        self.work = _open_subdir(base, WORK)
        self.index = _open_subdir(base, INDEX)
        copyup.clean_workdir(proc_path(self.work))
        #: Names in ``index/``: lower hard-linked files that have an upper copy.
        self.index_keys: set[bytes] = {os.fsencode(n) for n in os.listdir(proc_path(self.index))}

    def close(self) -> None:
        os.close(self.work)
        os.close(self.index)

    # -- looking ----------------------------------------------------------

    def dirfd(self, rel: bytes) -> int:
        return self.stack.dirfd(0, rel)

    def lstat(self, parent: bytes, name: bytes) -> os.stat_result | None:
        return self.stack.lstat(0, parent, name)

    def keep_xattr(self, name: bytes) -> bool:
        """Copied up: every xattr a user sees; not the overlay's own records."""
        return self.markers.visible_xattr(name) is not None

    # -- creating ---------------------------------------------------------

    def whiteout(self, parent: bytes, name: bytes) -> None:
        """Hide a lower-only *name*: a whiteout where the upper has nothing.

        Made in the work dir and renamed in, as the kernel does: made in
        place, a set-group-ID directory would give it its own group.
        """
        tmp = copyup.tmp_name()
        self.markers.make_whiteout(self.work, tmp)
        try:
            renameat2(self.work, tmp, self.dirfd(parent), name, RENAME_NOREPLACE)
        except BaseException:
            os.unlink(tmp, dir_fd=self.work)
            raise

    def replace_with_whiteout(self, parent: bytes, name: bytes) -> None:
        """Swap the upper non-directory *name* for a whiteout in one step."""
        dfd = self.dirfd(parent)
        tmp = copyup.tmp_name()
        self.markers.make_whiteout(self.work, tmp)
        try:
            os.rename(tmp, name, src_dir_fd=self.work, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=self.work)
            raise

    def install(self, tmp: bytes, parent: bytes, name: bytes, is_dir: bool) -> None:
        """Move *tmp* from the work dir to *name*, replacing a whiteout there.

        A directory cannot be renamed over a non-directory, so it is exchanged
        with the whiteout, which is then removed from the work dir.
        """
        dfd = self.dirfd(parent)
        if not is_dir:
            os.rename(tmp, name, src_dir_fd=self.work, dst_dir_fd=dfd)
            return
        renameat2(self.work, tmp, dfd, name, RENAME_EXCHANGE)
        self.remove(self.work, tmp)

    def set_opaque(self, rel: bytes) -> None:
        parent, _, name = rel.rpartition(b"/")
        self.markers.set_opaque(
            proc_path(self.dirfd(parent), name) if rel else proc_path(self.stack.layers[0].fd), follow=not rel
        )

    def is_opaque(self, rel: bytes) -> bool:
        parent, _, name = rel.rpartition(b"/")
        return self.markers.is_set_opaque(proc_path(self.dirfd(parent), name))

    def redirect(self, rel: bytes) -> bytes | None:
        """Upper entry *rel*'s ``overlay.redirect`` record, if it has one
        (in any namespace this mount reads)."""
        if not rel:
            return None
        for key in self.markers.record_names(b"redirect"):
            try:
                return self.stack.getxattr(0, rel, key)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        return None

    def redirect_for(self, path: bytes, samedir: bool) -> bytes | None:
        """The redirect record upper entry *path* (a directory with lower
        parts, or a metadata-only copy) needs before it moves, or None to
        keep the one it has: the kernel's ``ovl_set_redirect``.  Within its
        parent, its name; elsewhere, the absolute path of its lower parts,
        built up from the records of the directory and its ancestors."""
        have = self.redirect(path)
        if have is not None and (samedir or have.startswith(b"/")):
            return None
        if samedir:
            return path.rpartition(b"/")[2]
        parts: list[bytes] = []
        at, record = path, have
        while at:
            if record is not None and record.startswith(b"/"):
                parts.append(record[1:])
                break
            parts.append(record if record is not None else at.rpartition(b"/")[2])
            at = at.rpartition(b"/")[0]
            record = self.redirect(at) if at else None
        value = b"/" + b"/".join(reversed(parts))
        if len(value) > REDIRECT_MAX:
            raise fs_error(errno.EXDEV)  # as the kernel: too long to record, mv copies instead
        return value

    def set_redirect(self, rel: bytes, value: bytes) -> None:
        """Record where upper entry *rel*'s lower parts (or data) are (the
        kernel's ``ovl_set_redirect``)."""
        parent, _, name = rel.rpartition(b"/")
        os.setxattr(proc_path(self.dirfd(parent), name), self.markers.redirect_xattr, value, follow_symlinks=False)

    def set_impure(self, rel: bytes) -> None:
        """Mark directory *rel* as holding copied-up entries, as the kernel
        does, so its readdir knows to report their origin inode numbers.

        Written at every copy-up into it (one syscall beside a copy-up's
        dozens), so no record of marked directories has to follow renames
        and removals."""
        parent, _, name = rel.rpartition(b"/")
        path = proc_path(self.dirfd(parent), name) if rel else proc_path(self.stack.layers[0].fd)
        try:
            os.setxattr(path, self.markers.impure_xattr, b"y", follow_symlinks=not rel)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise

    def dir_times(self, rel: bytes) -> tuple[int, int]:
        st = self.stack.stat_self(0, rel)
        return st.st_atime_ns, st.st_mtime_ns

    def restore_times(self, rel: bytes, times: tuple[int, int]) -> None:
        """Put back a directory's times after a copy-up added an entry to it:
        copy-up is invisible in the merged view, as in overlayfs."""
        path, follow = self.stack.entry_path(0, rel)
        os.utime(path, ns=times, follow_symlinks=follow)

    def moved(self, old: bytes, new: bytes) -> None:
        """Forget the directory fds cached under paths that a rename changed."""
        for rel in (old, new):
            self.stack.fds.forget_tree(0, rel)

    # -- removing ---------------------------------------------------------

    def clear_dir(self, rel: bytes) -> None:
        """Remove what is left in an upper directory whose merged view is
        empty: whiteouts and markers only, never anything a user sees."""
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dirfd(rel))
        try:
            names = os.listdir(fd)
            for n in names:
                self.remove(fd, os.fsencode(n))
        finally:
            os.close(fd)

    def remove_dir_leaving_whiteout(self, parent: bytes, name: bytes) -> None:
        """Swap upper directory *name* for a whiteout, then delete it from the work dir."""
        tmp = copyup.tmp_name()
        self.markers.make_whiteout(self.work, tmp)
        try:
            renameat2(self.work, tmp, self.dirfd(parent), name, RENAME_EXCHANGE)
        except BaseException:
            os.unlink(tmp, dir_fd=self.work)
            raise
        self.stack.fds.forget_tree(0, join(parent, name))
        self.remove(self.work, tmp)

    @staticmethod
    def remove(dir_fd: int, name: bytes) -> None:
        """Remove *name* (a whiteout, marker, or a directory of those)."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            for n in os.listdir(sub):
                Upper.remove(sub, os.fsencode(n))
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dir_fd)

    def fsync_dir(self, rel: bytes) -> None:
        copyup.fsync_dir(self.dirfd(rel))
