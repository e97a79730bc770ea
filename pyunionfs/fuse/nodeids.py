"""Second node ids for one object: how an inode pinned to a lower file is let go.

FUSE names a kernel inode by its node id, which is our inode number
(:mod:`pyunionfs.fs.inodes`).  With ``passthrough=all`` a lower file opened
to read is served from that lower file by the kernel itself, and the kernel
then pins the inode to it: while those opens last, every open of the inode
must be passthrough to the same file (fs/fuse/iomode.c).  A write open, or
any open after the object was copied up, must reach the upper copy instead,
which that inode cannot.

So the object gets a new node id: the open is answered ESTALE, and the
kernel's path walk retries once with LOOKUP_REVAL (``do_filp_open``, and
``retry_estale`` in truncate, chmod and the other path calls).  The retry's
LOOKUP answers the new id, the kernel drops the old dentry and makes a new
inode, and the open goes to that.  The old inode lives on for the opens that
pinned it (and their reads keep going to the lower file: the documented
price of ``passthrough=all``).

The object keeps its inode number (``st_ino``): only the id the kernel uses
to name it in requests changes.  This table maps such ids to the object's
number and back, and counts the kernel's lookups of each, so that an id is
dropped when the kernel forgets it.  Node ids from it are far above every
inode number, so they never collide.
"""

from __future__ import annotations

import itertools
import threading

#: The first second node id (inode numbers stay below 2**63 + 2**62).
_BASE = 0xC000_0000_0000_0000


class NodeIds:
    """The node ids given anew to objects; thread-safe, empty in most mounts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Second node id -> the object's inode number.  Empty: no request
        #: pays more than a truth test.
        self.core: dict[int, int] = {}
        #: Inode number -> the node id lookups answer now.
        self._current: dict[int, int] = {}
        #: Second node id -> lookups of it the kernel has not forgotten.
        self._lookups: dict[int, int] = {}
        self._next = itertools.count(_BASE)

    def renew(self, ino: int, old: int) -> None:
        """Give object *ino* a new node id, unless one was given since the
        kernel got *old* (two opens that failed on one inode renew once)."""
        with self._lock:
            if self._current.get(ino, ino) != old:
                return
            new = next(self._next)
            self.core[new] = ino
            self._current[ino] = new
            self._lookups[new] = 0

    @property
    def current(self) -> dict[int, int]:
        """Inode number -> the second node id lookups answer now (read only)."""
        return self._current

    def kernel(self, ino: int) -> int:
        """The node id to answer for object *ino* now."""
        return self._current.get(ino, ino) if self._current else ino

    def answered(self, nodeid: int) -> None:
        """One more lookup of *nodeid* the kernel will forget (an entry answered)."""
        if nodeid in self._lookups:
            with self._lock:
                if nodeid in self._lookups:
                    self._lookups[nodeid] += 1

    def forgot(self, nodeid: int, count: int) -> None:
        """The kernel forgot *count* lookups of second id *nodeid*."""
        with self._lock:
            left = self._lookups.get(nodeid)
            if left is None:
                return
            left = max(left - count, 0)
            ino = self.core[nodeid]
            if left or self._current.get(ino) == nodeid:
                # (The id lookups answer stays while the object is known:
                # its first id may still be pinned.)
                self._lookups[nodeid] = left
                return
            del self.core[nodeid], self._lookups[nodeid]

    def dropped(self, ino: int) -> None:
        """Object *ino* is forgotten by the kernel under every id: start afresh."""
        with self._lock:
            nodeid = self._current.pop(ino, None)
            if nodeid is not None:
                self.core.pop(nodeid, None)
                self._lookups.pop(nodeid, None)

    def held(self) -> int:
        """How many second node ids the kernel holds now (for the stats)."""
        with self._lock:
            return sum(1 for n in self._lookups.values() if n > 0)

    def all_of(self, ino: int) -> list[int]:
        """Every node id the kernel may hold for object *ino* (for invalidations)."""
        if not self.core:
            return [ino]
        with self._lock:
            return [ino, *(nid for nid, core in self.core.items() if core == ino)]
