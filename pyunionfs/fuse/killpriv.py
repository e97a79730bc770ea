"""Set-ID bits and file capabilities that a caller's write must clear.

With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves this to the daemon (and in
exchange stops asking for ``security.capability`` before every write): it
flags a WRITE, a truncating OPEN or a SETATTR made by a caller without
CAP_FSETID, and the daemon, which writes as root and so keeps the bits
itself, must clear them as the VFS would (``setattr_should_drop_suidgid``).
"""

from __future__ import annotations

import errno
import os
import stat

_CAPABILITY = b"security.capability"


def killable(mode: int, in_group: bool = False) -> bool:
    """Whether a write by a caller without CAP_FSETID changes *mode* (the
    VFS's setattr_should_drop_suidgid): set-user-ID always goes, set-group-ID
    where group-executable or the caller is not in the file's group."""
    return bool(mode & stat.S_ISUID or (mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group)))


def killed(mode: int, in_group: bool = False) -> int:
    out = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP or not in_group:
        out &= ~stat.S_ISGID
    return out


def kill_suidgid(fd: int, gid: int) -> None:
    """What a write, or an O_TRUNC open, by a caller without CAP_FSETID (of
    group *gid*) does to the file (HANDLE_KILLPRIV_V2 leaves it to us): no
    set-user-ID bit, no set-group-ID bit where it must go, no file
    capabilities.  The request carries the caller's primary group only."""
    st = os.fstat(fd)
    in_group = st.st_gid == gid
    if stat.S_ISREG(st.st_mode) and killable(st.st_mode, in_group):
        os.fchmod(fd, stat.S_IMODE(killed(st.st_mode, in_group)))
    try:
        os.removexattr(fd, _CAPABILITY)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM):
            raise

