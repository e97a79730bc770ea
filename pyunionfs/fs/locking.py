"""The union core's one lock, and when it may be let go.

The core (``UnionFS`` and everything under it) keeps state that requests
share: the inode table, the resolution cache, the directory-fd cache, the
handle table, the upper's index.  Engines call it from several threads (a
FUSE engine's workers; the pyfuse3 engine's event loop plus a worker thread
for long copy-ups), so every call into the core is made holding
:attr:`UnionFS.lock <pyunionfs.union.UnionFS.lock>`: one lock, which is the
start the FUSE-engine design asks for; finer ones only where a measurement
says so.

The core itself lets the lock go in exactly two places, both in
:mod:`.copyups`: around the data copy of a large copy-up, and while waiting
for another request's copy-up of the same object.  So one long copy does not
stall the requests on other objects.  A thread that must not block (an event
loop serving every request) says so with :func:`no_blocking`; there those two
places raise :class:`~pyunionfs.errors.WouldBlock` instead, before anything
was changed, and the engine runs the whole request again in a worker thread.

Called without the lock (unit tests, single-threaded tools), the core works
the same: letting go of a lock it does not hold is a no-op.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class BigLock:
    """A re-entrant lock that its owner can let go of entirely for a while.

    ``threading.RLock`` cannot be released fully from inside a nested call
    without private API; this one knows its owner and depth.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> BigLock:
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
        else:
            self._lock.acquire()
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def owned(self) -> bool:
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Let go of the lock (however deeply held) for the block; a no-op
        for a thread that does not hold it."""
        if not self.owned():
            yield
            return
        depth = self._depth
        self._owner, self._depth = None, 0
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._owner, self._depth = threading.get_ident(), depth


_state = threading.local()


def may_block() -> bool:
    """Whether the current thread may wait for long (default: yes)."""
    return getattr(_state, "may_block", True)


@contextlib.contextmanager
def no_blocking() -> Iterator[None]:
    """Within the block, the core raises :class:`~pyunionfs.errors.WouldBlock` rather than wait."""
    before = may_block()
    _state.may_block = False
    try:
        yield
    finally:
        _state.may_block = before
