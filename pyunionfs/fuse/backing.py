"""FUSE passthrough: which opens the kernel serves from a backing file itself.

With ``FOPEN_PASSTHROUGH`` and a backing id (``FUSE_DEV_IOC_BACKING_OPEN`` on
an fd of ours), the kernel reads, writes and maps the file without asking
the daemon.  Its rules (fs/fuse/iomode.c, backing.c) decide the design:

* every open of an inode that is alive while another is open in passthrough
  mode must name the *same* backing (the same registered file), and an open
  without passthrough then fails with EIO;
* while an inode is open in cached mode (our READ/WRITE answers, the page
  cache), a passthrough open fails with EIO.

So each inode is in one mode at a time, decided at its first open and kept
while any open of it lasts (:class:`Backings` counts them):

* **upper files** go passthrough, on one backing per inode (registered from
  the first open's fd: the kernel gives every passthrough open a backing
  file of its own, opened from the registered file's path with that open's
  flags), so read-only and read-write opens share it and see each other's writes at
  once, as one kernel inode does;
* **lower files** are served in cached mode by default.  A lower file may be
  copied up while it is open (a write open of it): the new open must then
  reach the copy, which cannot be the backing the earlier opens hold, and a
  read-only open made before the copy-up must see the copy's data
  afterwards, as on the kernel's overlayfs (its files re-open the real file
  after a copy-up; ours re-point the daemon's handle,
  :meth:`~pyunionfs.copyups.CopyUps._repoint`).  In cached mode both hold;
  in passthrough neither could.  Lower files are read-only and the kernel
  caches their pages across opens, so only the first read of each page goes
  through the daemon;
* with ``passthrough=all`` (and on a read-only mount), **lower files of at
  least** :data:`LOWER_MIN` **bytes opened to read** go passthrough on the
  lower file itself (a metadata-only copy's on its data's), and the
  first rule is met another way: an open that must reach the copy while the
  inode is pinned to the lower file (a write open, or any open once the
  object is copied up) is refused by :meth:`Backings.open`, and answered ESTALE after
  the object gets a new node id (:mod:`.nodeids`); the kernel's retry then opens
  a new inode.  The second rule is given up: opens made before the copy-up
  keep reading the lower file (docs/semantics.md);
* an inode still open cached after its copy-up stays cached until its last
  close; its next open goes passthrough;
* an open with O_APPEND starts cached mode: the kernel gives each
  passthrough open a backing file of its own opened with the open's flags
  and never changes them, so ``fcntl(F_SETFL)`` clearing O_APPEND would not
  be honoured (the kernel's overlayfs and cached mode honour it).  An
  appender that joins an inode already in passthrough mode must be
  passthrough too; for that one descriptor, clearing O_APPEND later has no
  effect (docs/semantics.md, "Where pyunionfs differs");
* a file with a set-user-ID bit (or set-group-ID and group-execute) starts
  cached too: the kernel writes a passthrough file with the daemon's
  credentials, which keep those bits where a user's write must clear them.

Pages the kernel cached in cached mode may be stale after passthrough writes
(which bypass that cache): the first cached open of an inode that was
written in passthrough mode is answered without ``FOPEN_KEEP_CACHE``, which
makes the kernel drop them.  Where a backing cannot be registered (no
CAP_SYS_ADMIN in the initial user namespace, an upper on a stack too deep),
the inode is served in cached mode, and after EPERM passthrough is off for
the mount.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import structs as S
from .abi import DEV_IOC_BACKING_CLOSE, DEV_IOC_BACKING_OPEN

log = logging.getLogger(__name__)

#: Gives an fd of the object for a new backing (an OSError: cached mode).
_Opener = Callable[[], int]


#: What an open asks for: cached mode, or passthrough on the upper or a lower file.
CACHED, UPPER, LOWER = 0, 1, 2

#: The smallest lower file that ``passthrough=all`` serves in passthrough: a
#: backing costs two ioctls per open, more than the page cache of a small
#: file read warm, where cached mode asks the daemon nothing.
LOWER_MIN = 64 * 1024


@dataclass(slots=True)
class _Mode:
    """The mode of one inode while it has opens: its backing, or cached."""

    opens: int
    backing_id: int  # 0: cached mode
    fd: int = -1  # our fd of the backing file (passthrough mode)
    lower: bool = False  # the backing is a lower file


class Backings:
    """Passthrough state of one FUSE connection; thread-safe."""

    def __init__(self, devfd: int, enabled: bool) -> None:
        self._devfd = devfd
        self.enabled = enabled
        self._lock = threading.Lock()
        self._modes: dict[int, _Mode] = {}
        #: Inodes written through passthrough since their last cached open.
        self._stale: set[int] = set()
        #: Opens answered with passthrough (tests and the bench read it).
        self.passthrough_opens = 0

    def open(self, ino: int, want: int, open_backing: _Opener) -> tuple[int, int] | None:
        """The mode of a new open of *ino* (already opened by the core).

        *want* is :data:`CACHED`, :data:`UPPER` or :data:`LOWER`: the mode
        this open would start.  Returns ``(backing_id, keep_cache)``: a
        nonzero id means answer with FOPEN_PASSTHROUGH and that id; 0 means
        cached mode, with FOPEN_KEEP_CACHE when *keep_cache*.  *open_backing*
        gives an fd of the file for a new backing (an OSError: cached mode).  None:
        the inode is pinned to a lower file that this open must not read.
        """
        with self._lock:
            mode = self._modes.get(ino)
            if mode is not None:
                if mode.lower and want != LOWER:
                    return None
                mode.opens += 1
                if mode.backing_id:
                    self.passthrough_opens += 1
                return mode.backing_id, 1
            if not (self.enabled and want):
                self._modes[ino] = _Mode(1, 0)
                keep = ino not in self._stale
                self._stale.discard(ino)
                return 0, int(keep)
            backing = self._register(open_backing)
            if backing is None:
                self._modes[ino] = _Mode(1, 0)
                self._stale.discard(ino)
                return 0, 0
            self._modes[ino] = _Mode(1, backing[0], backing[1], want == LOWER)
            if want == UPPER:
                self._stale.add(ino)
            self.passthrough_opens += 1
            return backing[0], 1

    def pinned(self, ino: int) -> bool:
        """Whether *ino* is open in passthrough on a lower file now."""
        mode = self._modes.get(ino)
        return mode is not None and mode.lower

    def _register(self, open_backing: _Opener) -> tuple[int, int] | None:
        try:
            fd = open_backing()
        except OSError as exc:
            log.debug("no backing file (%s): cached mode", exc)
            return None
        try:
            backing_id = fcntl.ioctl(self._devfd, DEV_IOC_BACKING_OPEN, bytearray(S.BACKING_MAP.pack(fd, 0)), True)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EPERM:
                log.info("passthrough refused (%s): the daemon serves reads and writes itself", exc.strerror)
                self.enabled = False
            else:
                log.debug("backing open failed (%s): cached mode", exc)
            return None
        return backing_id, fd

    def release(self, ino: int) -> None:
        """One open of *ino* ended (its RELEASE)."""
        with self._lock:
            mode = self._modes.get(ino)
            if mode is None:
                return
            mode.opens -= 1
            if mode.opens > 0:
                return
            del self._modes[ino]
            if mode.backing_id:
                self._close(mode)

    def _close(self, mode: _Mode) -> None:
        try:
            fcntl.ioctl(self._devfd, DEV_IOC_BACKING_CLOSE, struct.pack("=i", mode.backing_id))
        except OSError as exc:  # the connection ended: the kernel dropped them all
            log.debug("backing close of %d: %s", mode.backing_id, exc)
        os.close(mode.fd)

    def mode_of(self, ino: int) -> str:
        """``passthrough``, ``cached`` or ``closed`` (for tests and logs)."""
        with self._lock:
            mode = self._modes.get(ino)
        if mode is None:
            return "closed"
        return "passthrough" if mode.backing_id else "cached"

    def close(self) -> None:
        """Release every backing (at the end of the connection)."""
        with self._lock:
            modes, self._modes = list(self._modes.values()), {}
        for mode in modes:
            if mode.backing_id:
                self._close(mode)
