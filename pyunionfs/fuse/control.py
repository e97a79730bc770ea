"""Commands to a live mount, sent through an xattr of its root (as s3ql does).

Why an xattr: it reaches the daemon of exactly that mount through the kernel,
needs no socket or pid file, and carries the caller's credentials.  Why a
*get*: getxattr works on read-only mounts too (setxattr gets EROFS before it
reaches us), and the kernel takes no lock on the root for it, so the daemon
may make the kernel forget names in the root while answering.

The names live under ``user.pyunionfs.`` on the mount's root only; they are
never stored, listed or copied up.  Only root and the user running the daemon
may send them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import MountError, fs_error

if TYPE_CHECKING:  # (the command-line side imports this module, not the core)
    from ..fs.answers import KernelForget
    from ..fs.writes import WritableUnionFS

log = logging.getLogger(__name__)

PREFIX = b"user.pyunionfs."
#: Drop the daemon's caches and make the kernel forget what it cached of the
#: mount; the answer says how much was dropped.
DROP_CACHES = PREFIX + b"drop_caches"
#: What the native engine has answered: ``OPCODE=count`` words for every
#: request kind seen, ``passthrough_opens=N`` (tests and the bench read
#: it to see which requests a workload costs) and ``second_node_ids=N``
#: (second node ids the kernel holds now, see
#: :mod:`.nodeids`); and what open handles hold
#: now (``UnionFS.usage``): ``open_files``, ``open_dirs``, the bounds
#: ``handles_max`` and ``handles_per_uid_max``, and the directory listings
#: they share, ``listings`` and ``listed_names``, of which ``held_listings``
#: and ``held_names`` are held for directories opened without a message;
#: ``nodes`` and ``resident_nodes``: the inodes the kernel holds, as objects
#: and as columns (see ``fs/residents.py``).
STATS = PREFIX + b"stats"


def stats(mountpoint: bytes) -> dict[str, int]:
    """The request counts of the daemon behind *mountpoint* (native engine only)."""
    text = os.getxattr(mountpoint, STATS).decode()
    return {k: int(v) for k, _, v in (w.partition("=") for w in text.split())}


def drop_caches(mountpoint: bytes) -> str:
    """Ask the daemon behind *mountpoint* to drop every cache; its one-line answer."""
    from .mountinfo import find_mount

    found = find_mount(mountpoint)
    if found is None or found[0] != "fuse.pyunionfs":
        raise MountError(f"{os.fsdecode(mountpoint)} is not a pyunionfs mount")
    try:
        return os.getxattr(mountpoint, DROP_CACHES).decode()
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise MountError(f"{os.fsdecode(mountpoint)}: only root or the mount's owner may drop its caches") from None
        raise MountError(f"{os.fsdecode(mountpoint)}: {exc.strerror}") from None


def answer(
    name: bytes, fs: WritableUnionFS, counts: list[str], kernel_forget: Callable[[KernelForget], int]
) -> bytes:
    """The native engine's answer to command *name* (its caller checked),
    with *counts* the engine's own ``name=N`` words; *kernel_forget* makes
    the kernel forget what :meth:`~pyunionfs.fs.union.UnionFS.drop_caches`
    dropped and returns how many of those it no longer had."""
    if name == STATS:
        with fs.lock:
            usage = [f"{k}={v}" for k, v in fs.usage().items()]
        return " ".join(counts + usage).encode()
    if name != DROP_CACHES:
        raise fs_error(errno.ENODATA)
    with fs.lock:
        forget = fs.drop_caches()
    # Without the lock: an invalidation waits for requests on the same
    # names to finish, which other workers answer meanwhile.
    failed = kernel_forget(forget)
    log.info("caches dropped: %d inodes, %d names (%d already gone)", len(forget.inodes), len(forget.entries), failed)
    return b"dropped the caches of %d inodes and %d names" % (len(forget.inodes), len(forget.entries))
