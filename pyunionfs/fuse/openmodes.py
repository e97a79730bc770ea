"""How each open is answered: passthrough on the upper or a lower file, or cached.

:mod:`.backing` keeps the kernel's rules (one mode per inode while it has
opens) and :mod:`.nodeids` the second node ids; this module decides, per
open, which mode the file asks for, and lets go of an inode pinned to a
lower file when a change of data must reach the copy instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import NoReturn

from ..config import MountConfig
from ..errors import fs_error
from ..fs.writes import WritableUnionFS
from . import protocol as P
from .abi import FOPEN_KEEP_CACHE, FOPEN_PASSTHROUGH
from .backing import CACHED, LOWER, LOWER_MIN, UPPER, Backings
from .nodeids import NodeIds

#: Open flags that change data: a copy-up, and never a lower backing.
WRITES = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


def wanted(st_mode: int, upper: bool, metacopy: bool, size: int, flags: int, lower_too: bool) -> int:
    """The mode an open with *flags* starts for a file shown with *st_mode*
    (the mode shown, set-ID bits included), whose object is in the upper (or
    a lower, or a metadata-only copy); *lower_too*: ``passthrough=all``."""
    if not stat.S_ISREG(st_mode):
        return CACHED
    if upper and not metacopy:  # (a metadata-only copy reads from a lower file: as lower files)
        # The kernel opens each passthrough file's backing file with the
        # open's flags and never updates them: a later F_SETFL clearing
        # O_APPEND would not be honoured, so appenders start cached.
        # Passthrough writes run with the daemon's credentials, which keep
        # set-ID bits a caller's write must clear (we clear them on WRITE,
        # see .killpriv): such files start cached.  (Modes change only
        # through us, and every change refreshes the node's entry.)
        return CACHED if flags & os.O_APPEND or st_mode & (stat.S_ISUID | stat.S_ISGID) else UPPER
    if lower_too and size >= LOWER_MIN and not flags & WRITES:
        return LOWER
    return CACHED


class OpenModes:
    """The open answers of one mount (thread-safe: the core under its lock)."""

    def __init__(
        self, fs: WritableUnionFS, cfg: MountConfig, backings: Backings, ids: NodeIds, notify: Callable[[bytes], bool]
    ) -> None:
        self.fs = fs
        self.lower_too = cfg.lower_passthrough
        self.backings = backings
        self.ids = ids
        self.notify = notify

    def answer(self, ino: int, nodeid: int, fh: int, flags: int) -> bytes:
        """fuse_open_out for handle *fh* of *ino*, which the kernel names
        *nodeid*; ESTALE where that inode is pinned to a lower file this open
        must not read (after the object got a new node id)."""
        fs = self.fs
        node = fs.inodes.get(ino)
        want = CACHED
        if node is not None and self.backings.enabled:
            entry = node.entry
            mode = entry.st.st_mode
            if fs.overrides is not None:
                with fs.lock:  # the mode shown is the record's (a set-ID bit may be only there)
                    mode = fs.attr_of(ino, entry, node.path).mode
            # (On a read-only mount the upper is one more layer nothing writes.)
            upper = fs.stack.layers[entry.layers[0]].writable and not fs.readonly
            want = wanted(mode, upper, entry.data is not None, entry.st.st_size, flags, self.lower_too)

        def open_backing() -> int:
            # The kernel opens each passthrough open's own backing file from
            # the registered file's path, with that open's flags: the handle's
            # fd serves opens of every mode, read-only or not.
            return os.dup(fh)

        answer = self.backings.open(nodeid, want, open_backing)
        if answer is None:
            self._let_go(ino, nodeid)
        backing_id, keep = answer
        if backing_id:
            return P.open_out(fh, FOPEN_PASSTHROUGH, backing_id)
        return P.open_out(fh, FOPEN_KEEP_CACHE if keep else 0)

    def unpin(self, ino: int, nodeid: int) -> None:
        """Before a change of data to *ino* through *nodeid* (a write open, a
        truncate): if that inode is pinned to a lower file, copy the object
        up, give it a new node id and raise ESTALE, so that the kernel
        retries on a new inode (see :mod:`.nodeids`).  The copy-up comes
        first so that no read-only open of the new inode pins it again
        before the retry arrives."""
        if not self.backings.pinned(nodeid):
            return
        with self.fs.lock:
            self.fs.copyups.node(self.fs.node(ino))
        self._let_go(ino, nodeid)

    def _let_go(self, ino: int, nodeid: int) -> NoReturn:
        """Give *ino* a new node id and answer ESTALE.  The attributes the
        kernel keeps for the old inode are dropped: from now on it gets them
        uncached (the engine answers them with timeout 0), as the file
        changes through the new inode without the daemon (passthrough)."""
        self.ids.renew(ino, nodeid)
        self.notify(P.notify_inval_inode(nodeid, -1, 0))
        raise fs_error(errno.ESTALE)
