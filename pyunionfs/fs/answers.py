"""What the core answers the engines with: an object's attributes, and what
the kernel must forget after a drop of the caches.

Their own module because the parts of the core that answer requests build
them (:mod:`.union`, :mod:`.creates`, :mod:`.openfiles`, :mod:`.attributes`)
and both engines read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KernelForget:
    """What the kernel should drop after :meth:`.union.UnionFS.drop_caches`."""

    #: Attributes and cached pages (file data, directory listings) of these.
    inodes: list[int]
    #: (parent inode, name) of names to drop, present or known missing.
    entries: list[tuple[int, bytes]]


@dataclass(slots=True)
class Attr:
    """What stat(2) shows for one object through the mount.

    Not frozen: one is built per entry of every listing, and a frozen
    dataclass's ``__init__`` costs five times as much.
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
