"""Who asks: the credentials a FUSE request carries, and what they may see.

The kernel checks permissions itself (``default_permissions``) before most
requests reach us, so the core needs a caller only where the answer itself
depends on identity: the owner of what it creates, the fairness bound of
the handles it holds (:mod:`.handles`), and whether ``trusted.*`` xattr
names are listed.

``trusted.*``: the kernel shows those names only to callers capable of
CAP_SYS_ADMIN in the initial user namespace (``ovl_can_list`` on its
overlayfs, the ``trusted`` xattr handler's ``list`` on ext4 and tmpfs), and
answers getxattr of one with ENODATA, setxattr and removexattr with EPERM,
before any filesystem is asked (``xattr_permission``).  Through FUSE those
three never reach the daemon from such a caller; listxattr does, unfiltered,
so the daemon decides.

How it decides (:func:`has_sys_admin`): the request header gives the
caller's thread id, and ``/proc/TID/status`` its effective capabilities, as
daemons like fuse-overlayfs do.  It is racy (the thread may have changed
its capabilities, or exited and its id been reused, since it asked), so the
uid in the status must still be the request's; where the status cannot be
read (the caller is gone, or in a pid namespace we cannot see: pid 0), uid 0
stands for "capable", the usual approximation.  A caller in another user
namespace is never capable here, whatever its capabilities there, as
``ns_capable(&init_user_ns, ...)`` answers.  Deciding by uid 0 alone would be
wrong both ways: root in a container without CAP_SYS_ADMIN must not see
``trusted.*``, a non-root process granted CAP_SYS_ADMIN must.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

CAP_SYS_ADMIN = 21


@dataclass(slots=True)
class Caller:
    """Who asks: new entries belong to them (the kernel checked permissions).

    Not frozen: one is made for most requests, and a frozen dataclass's
    ``__init__`` costs three times as much.  Nothing changes one."""

    uid: int
    gid: int
    #: The caller's umask: the kernel leaves it to us (FUSE_DONT_MASK), as a
    #: default ACL of the parent replaces it.
    umask: int = 0
    #: The calling thread's id in the daemon's pid namespace (0: unknown).
    pid: int = 0

    def sys_admin(self) -> bool:
        """Whether the caller holds CAP_SYS_ADMIN (see :func:`has_sys_admin`)."""
        return has_sys_admin(self.pid, self.uid)


#: The caller the core assumes when none is given: the daemon itself (unit
#: tests, internal calls) -- privileged, and not bound by a per-uid share.
DAEMON = Caller(0, 0)


def _user_ns(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        return None


_OWN_USER_NS = _user_ns("self")


def has_sys_admin(pid: int, uid: int) -> bool:
    """Whether thread *pid* (asking as *uid*) has CAP_SYS_ADMIN in our user
    namespace; uid 0 where that cannot be known (see the module's docstring)."""
    if pid <= 0:
        return uid == 0
    fd = -1
    with contextlib.suppress(OSError):
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    if fd < 0:
        return uid == 0
    try:
        text = os.read(fd, 8192)
    except OSError:
        return uid == 0
    finally:
        os.close(fd)
    fields = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
    try:
        fsuid = int(fields[b"Uid"].split()[3])
        caps = int(fields[b"CapEff"].strip(), 16)
    except (KeyError, IndexError, ValueError):
        return uid == 0
    if fsuid != uid:
        return uid == 0  # not the thread that asked any more (its id was reused)
    if not caps & (1 << CAP_SYS_ADMIN):
        return False
    ns = _user_ns(pid)
    return ns is not None and ns == _OWN_USER_NS
