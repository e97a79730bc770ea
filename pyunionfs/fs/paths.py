"""Resolution beneath a layer root that never follows a symlink stored in a layer.

Every access to a layer goes through a directory file descriptor opened one
component at a time with ``O_PATH | O_NOFOLLOW | O_DIRECTORY``: a component
that is a symlink fails with ENOTDIR/ELOOP instead of leading outside the layer,
and a directory swapped for a symlink after we looked cannot redirect us.  The
last component is then used with the ``*at`` calls and their no-follow flags.

Opening every component on every request would cost a syscall per level, so
directory fds are kept in a small LRU keyed by (layer, relative path).  Keys
are relative paths in the layer; code that renames or removes a directory in
a layer must call :meth:`DirFds.forget_tree`.
"""

from __future__ import annotations

import errno
import os
import sys
from collections import OrderedDict

from ..errors import fs_error

NAME_MAX = 255
PATH_MAX = 4096

# O_PATH: we only need a handle to walk from and to fstatat()/openat() against;
# it needs no read permission on the directory, like the kernel's own walk.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(name: bytes) -> None:
    """Refuse names the kernel would never send us, and over-long ones."""
    if len(name) > NAME_MAX:
        raise fs_error(errno.ENAMETOOLONG, name)
    if not name or b"/" in name or name in (b".", b".."):
        raise fs_error(errno.EINVAL, name)


def join(parent: bytes, name: bytes) -> bytes:
    """Join a relative path (b"" is the root) and a name."""
    return parent + b"/" + name if parent else name


def split(rel: bytes) -> tuple[bytes, bytes]:
    """Split a relative path into (parent, name); the root has no name."""
    head, _, tail = rel.rpartition(b"/")
    return head, tail


_FS_ENCODING = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def encode_names(names: list[str]) -> list[bytes]:
    """*names* (from ``os.listdir(fd)`` or ``os.listxattr``, which give str) as
    the bytes they were, as :func:`os.fsencode` would give each: encoded in one
    call, not one Python call per name (a directory of 200,000 names paid
    0.1 s for that loop).  Names never hold NUL, so NUL joins them."""
    if not names:
        return []
    return "\0".join(names).encode(*_FS_ENCODING).split(b"\0")


def proc_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that reaches *name* inside the directory behind *fd*.

    Calls without an ``*at`` form (the xattr family) use it: the kernel jumps
    through the /proc magic link straight to that directory, so no layer
    symlink on the way can be followed.
    """
    base = b"/proc/self/fd/%d" % fd
    return base if name is None else base + b"/" + name


class DirFds:
    """An LRU of O_PATH directory fds beneath a set of layer roots.

    Used only from the event-loop thread: an fd it returns may be closed by the
    next call that evicts it.  Work handed to a worker thread takes an owned
    copy with :meth:`dup` first.
    """

    def __init__(self, roots: list[int], capacity: int = 2048) -> None:
        self._roots = roots
        self._capacity = max(16, capacity)
        self._fds: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        # The directory asked for last: a listing or a run of lookups asks
        # for the same one again and again (an fd here is never evicted
        # before a newer one is returned, and closing resets it).
        self._last: tuple[int, bytes, int] = (-1, b"", -1)

    def get(self, layer: int, rel: bytes) -> int:
        """The fd of directory *rel* in *layer*; raise OSError if it is not one.

        The fd stays valid until it is evicted, which happens only from this
        method: callers use it at once and never keep it.
        """
        if not rel:
            return self._roots[layer]
        last = self._last
        if rel == last[1] and layer == last[0]:
            return last[2]
        key = (layer, rel)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            self._last = (layer, rel, fd)
            return fd
        # Walk up to the nearest cached ancestor, then open down one
        # component at a time (iteratively: trees may be thousands deep).
        missing: list[bytes] = []
        at = rel
        while True:
            head, _, tail = at.rpartition(b"/")
            missing.append(tail)
            if not head:
                fd = self._roots[layer]
                break
            cached = self._fds.get((layer, head))
            if cached is not None:
                fd = cached
                break
            at = head
        prefix = at.rpartition(b"/")[0]
        for name in reversed(missing):
            fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            prefix = join(prefix, name)
            self._fds[(layer, prefix)] = fd
        # Evict only now, so no fd used above was closed mid-walk.
        while len(self._fds) > self._capacity:
            _, victim = self._fds.popitem(last=False)
            os.close(victim)
        self._last = (layer, rel, fd)
        return fd

    def dup(self, layer: int, rel: bytes) -> int:
        """An fd of directory *rel* that the caller owns and must close."""
        return os.dup(self.get(layer, rel))

    def forget_tree(self, layer: int, rel: bytes) -> None:
        """Drop the fds of *rel* and everything below it in *layer*."""
        prefix = rel + b"/"
        doomed = [k for k in self._fds if k[0] == layer and (k[1] == rel or k[1].startswith(prefix))]
        self._last = (-1, b"", -1)
        for key in doomed:
            os.close(self._fds.pop(key))

    def clear(self) -> None:
        """Close every cached fd (cache drop, unmount)."""
        self._last = (-1, b"", -1)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
