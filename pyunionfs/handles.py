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
"""

from __future__ import annotations

import os

#: Open flags that reach the backing fd: the access mode and what changes
#: how the object itself behaves (not O_APPEND and O_DIRECT: see above).
BACKING_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC


class HandleTable:
    """The open files of one mount: fd -> inode, inode -> its fds."""

    def __init__(self) -> None:
        self._ino: dict[int, int] = {}
        self._of: dict[int, set[int]] = {}

    def __contains__(self, fh: int) -> bool:
        return fh in self._ino

    def add(self, fh: int, ino: int) -> None:
        self._ino[fh] = ino
        self._of.setdefault(ino, set()).add(fh)

    def of(self, ino: int) -> set[int]:
        """The open handles of inode *ino* (do not change the set)."""
        return self._of.get(ino, set())

    def release(self, fh: int) -> None:
        """Close handle *fh*; one the table does not hold is ignored."""
        ino = self._ino.pop(fh, None)
        if ino is None:
            return
        fhs = self._of[ino]
        fhs.discard(fh)
        if not fhs:
            del self._of[ino]
        os.close(fh)

    def close(self) -> None:
        """Close every handle (at unmount, after the kernel let go)."""
        for fh in self._ino:
            os.close(fh)
        self._ino.clear()
        self._of.clear()
