"""Open file handles: which fd serves which request, and which inode it is of.

A FUSE file handle is the daemon's own fd on the object (the kernel sends it
back with every READ, WRITE, FSYNC and SETATTR on that open file), so the
handle itself always reaches the object opened, whatever its names became
since.  The table also knows the handles of each inode, so that a copy-up
can move the read-only handles of a lower file onto the copy
(:meth:`~.copyups.CopyUps.copy_up`).

The backing fd is opened without O_APPEND and O_DIRECT, as the kernel's
overlayfs behaves towards its callers:

* O_APPEND: the kernel computes an appending write's offset itself (from the
  inode's size) and sends it; an fd opened O_APPEND would ignore that offset,
  so ``fcntl(F_SETFL)`` clearing O_APPEND on the caller's file would not be
  honoured (``pwrite`` at 0 would append).
* O_DIRECT: the kernel sends direct I/O as plain READ/WRITE requests into the
  daemon's own buffers, which are not aligned, so an O_DIRECT backing fd
  fails them with EINVAL.  The daemon's reads and writes go through the
  upper's page cache instead: the caller still gets direct I/O semantics
  from the kernel's FUSE side (no FUSE page cache for that file).  Aligned
  buffers for an O_DIRECT backing fd would skip one page-cache copy in the
  daemon; that is for the engine that owns its buffers (the FUSE-engine
  issue, where passthrough hands such files to the kernel anyway).

Fair shares (:class:`FairShare`): every open file costs the daemon an fd
for as long as it is open, and an open directory costs it a handle (and a
share of a listing), so without a bound one user holding many opens starves
everyone: every open, ``ls`` and create on the mount fails with EMFILE once
the daemon's RLIMIT_NOFILE is reached.  So handles are counted per caller
uid, and checked before anything is opened:

* the daemon raises its fd limit to what the system allows (``fs.nr_open``
  with CAP_SYS_RESOURCE, else its hard limit: ``mount._raise_fd_limit``)
  and keeps a reserve for its own needs (:data:`RESERVE_MIN`, or a
  sixteenth of the limit): the layer roots, the directory-fd cache,
  copy-ups, /dev/fuse, logs;
* what is left is shared by the handles, counting two fds for each: its
  own and the passthrough backing of its inode (the pins of unlinked open
  files, :attr:`.inodes.Node.pin`, come out of the reserve);
* one uid may hold :data:`DEFAULT_SHARE` of that (``-o max_files_per_uid=N``
  to choose): past it, that caller's opens fail with EMFILE, as its own
  RLIMIT_NOFILE would; all callers but root together may hold seven eighths,
  after which their opens fail with ENFILE (the kernel's answer when its
  file table is full, which CAP_SYS_ADMIN may exceed): root keeps the rest.
  Root and the daemon's own user are not bound per uid: they own the
  daemon anyway.
"""

from __future__ import annotations

import errno
import os
import resource
import threading

from ..errors import fs_error

#: Open flags that reach the backing fd: the access mode and what changes
#: how the object itself behaves (not O_APPEND and O_DIRECT: see above).
BACKING_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC

#: The fewest fds kept back for the daemon's own needs (the directory-fd
#: cache alone may hold 2048 per layer stack).
RESERVE_MIN = 4096
#: Fds one handle may cost: its own and its inode's passthrough backing
#: (pins of unlinked open files are few and come out of the reserve).
FDS_PER_HANDLE = 2
#: The fraction of the handles one unprivileged uid may hold by default.
DEFAULT_SHARE = 1 / 4


def capacity(limit: int) -> int:
    """How many handles all callers together may hold under an fd limit of *limit*."""
    reserve = max(RESERVE_MIN, limit // 16)
    return max(16, (limit - reserve) // FDS_PER_HANDLE)


class FairShare:
    """Counts the handles held per caller uid, and refuses those past its share.

    Thread-safe on its own (admission is a check then a count, and the
    core's lock is let go during a copy-up between them).
    """

    def __init__(self, total: int | None = None, per_uid: int = 0, privileged: frozenset[int] | None = None) -> None:
        if total is None:
            total = capacity(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        #: All handles together (root may use every one).
        self.total = total
        #: What callers other than root may hold together.
        self.shared = total - total // 8
        #: What one unprivileged uid may hold.
        self.per_uid = min(per_uid, self.shared) if per_uid > 0 else max(1, int(self.shared * DEFAULT_SHARE))
        #: Uids bound by nothing but the total: root, and the daemon's own user.
        self.privileged = frozenset({0, os.geteuid()}) if privileged is None else privileged
        self._held: dict[int, int] = {}
        self._all = 0
        self._unprivileged = 0
        self._lock = threading.Lock()

    def held(self, uid: int | None = None) -> int:
        """Handles held by *uid* (by everyone when None)."""
        return self._all if uid is None else self._held.get(uid, 0)

    def take(self, uid: int) -> None:
        """Count one more handle of *uid*, or raise EMFILE / ENFILE."""
        with self._lock:
            if self._all >= self.total:
                raise fs_error(errno.ENFILE)
            free = uid in self.privileged
            if not free:
                if self._held.get(uid, 0) >= self.per_uid:
                    raise fs_error(errno.EMFILE)
                if self._unprivileged >= self.shared:
                    raise fs_error(errno.ENFILE)
                self._unprivileged += 1
            self._held[uid] = self._held.get(uid, 0) + 1
            self._all += 1

    def give(self, uid: int) -> None:
        """One handle of *uid* was closed."""
        with self._lock:
            n = self._held.get(uid, 0)
            if n <= 0:
                return
            if n == 1:
                del self._held[uid]
            else:
                self._held[uid] = n - 1
            self._all -= 1
            if uid not in self.privileged:
                self._unprivileged -= 1

    def admitted(self, uid: int) -> _Admission:
        """Count a handle of *uid* for the block, which opens it; given back
        if the block fails (nothing was opened)."""
        return _Admission(self, uid)


class _Admission:
    """:meth:`FairShare.admitted`'s block: a class, not a generator, as it
    runs on every open (a generator-based context manager costs a
    microsecond more)."""

    __slots__ = ("share", "uid")

    def __init__(self, share: FairShare, uid: int) -> None:
        self.share, self.uid = share, uid

    def __enter__(self) -> None:
        self.share.take(self.uid)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.share.give(self.uid)


class HandleTable:
    """The open files of one mount: fd -> inode and owner, inode -> its fds."""

    def __init__(self, share: FairShare | None = None) -> None:
        self._ino: dict[int, int] = {}
        self._uid: dict[int, int] = {}
        self._of: dict[int, set[int]] = {}
        #: Counts the handles of each uid, the directory handles included.
        self.share = share if share is not None else FairShare()

    def __contains__(self, fh: int) -> bool:
        return fh in self._ino

    def __len__(self) -> int:
        return len(self._ino)

    def add(self, fh: int, ino: int, uid: int) -> None:
        """Record handle *fh* of *ino*, opened for *uid* (already counted by
        :meth:`FairShare.admitted`)."""
        self._ino[fh] = ino
        self._uid[fh] = uid
        self._of.setdefault(ino, set()).add(fh)

    def of(self, ino: int) -> set[int]:
        """The open handles of inode *ino* (do not change the set)."""
        return self._of.get(ino, set())

    def release(self, fh: int) -> None:
        """Close handle *fh*; one the table does not hold is ignored."""
        if self.detach(fh) is not None:
            os.close(fh)

    def detach(self, fh: int) -> int | None:
        """Take handle *fh* out of the table and return its fd for the caller
        to close (None: not held).  An engine closes it after letting go of
        the core's lock: the last close of an unlinked file frees it on disk,
        and ext4 may write data back at a close, neither of which should
        hold up every other request."""
        ino = self._ino.pop(fh, None)
        if ino is None:
            return None
        self.share.give(self._uid.pop(fh))
        fhs = self._of[ino]
        fhs.discard(fh)
        if not fhs:
            del self._of[ino]
        return fh

    def close(self) -> None:
        """Close every handle (at unmount, after the kernel let go)."""
        for fh in self._ino:
            os.close(fh)
            self.share.give(self._uid[fh])
        self._ino.clear()
        self._uid.clear()
        self._of.clear()
