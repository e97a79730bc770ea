"""One upper, one user at a time: the flock(2)s that say a directory is in use.

The kernel's overlayfs marks its upper and work directories in use for the
life of a mount and refuses a second mount of either with EBUSY ("upperdir
is in-use").  pyunionfs does the same with flock(2) on the directories
themselves: a daemon takes both exclusively before it cleans ``work/`` and
holds them until it exits, so a second mount is refused before it can delete
the first one's copy-up in progress.

Why flock on the directories (and not a lock file): nothing is created, so
nothing is left behind; the lock belongs to the open file description, so it
ends with the process however the process ends (kill -9 included) and no
stale lock can ever refuse a mount; and any pyunionfs command can test it
without talking to the daemon.

``commit`` takes the upper shared (several commits may read it together,
none while a mount or an ``apply`` changes it); ``apply`` takes its target
exclusively.  A kernel overlayfs mount using the directory is found in the
mount table and refused the same way (it holds no flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence

from ..errors import MountError
from .mountinfo import unescape_mountinfo

#: How long a claim waits for a holder to let go (a daemon whose mount just ended).
GRACE = 2.0

#: What each command says it needs a directory for, in the refusal.
HINTS = {
    "mount": "an upper and a work directory serve one mount at a time (unmount the other one first)",
    "commit": "a layer is committed from an upper nothing changes (unmount it first)",
    "apply": "a layer is applied to a directory nothing else uses (unmount it first)",
}


class Claim:
    """Directories held (flocked) by this process until :meth:`release`."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(dirs: Sequence[tuple[str, bytes]], purpose: str, *, shared: bool = False) -> Claim:
    """Flock each (what, path) directory, exclusively unless *shared*, without waiting.

    Raises MountError, one line naming the directory and who holds it, if
    any is in use; then nothing is held.  *purpose* is a key of :data:`HINTS`.
    """
    fds: list[int] = []
    try:
        for what, path in dirs:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise MountError(f"{what} {os.fsdecode(path)}: {exc.strerror}") from None
            fds.append(fd)
            st = os.fstat(fd)
            kernel = _kernel_overlay_using(st)
            if kernel is not None:
                raise MountError(f"{what} {os.fsdecode(path)} is in use by the kernel's overlayfs mounted at "
                                 f"{os.fsdecode(kernel)}: {HINTS[purpose]}")
            if not _lock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
                raise MountError(f"{what} {os.fsdecode(path)} is in use by {_holder(st)}: {HINTS[purpose]}")
    except BaseException:
        Claim(fds).release()
        raise
    return Claim(fds)


def _lock(fd: int, how: int) -> bool:
    """flock *fd*; whether it was had within :data:`GRACE` seconds.

    Why wait at all: ``umount`` of a FUSE mount returns before its daemon has
    seen the connection end and let go of its claim (tens of milliseconds,
    more under load), so ``umount M && pyunionfs mount ... M`` with the same
    upper -- what the kernel's synchronous unmount lets scripts do -- would
    be refused now and then.  A mount really in use is refused after the grace.
    """
    deadline = time.monotonic() + GRACE
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


@contextlib.contextmanager
def claimed(dirs: Sequence[tuple[str, bytes]], purpose: str, *, shared: bool = False) -> Iterator[Claim]:
    """:func:`claim` for the length of a block."""
    with claim(dirs, purpose, shared=shared) as held:
        yield held


def _holder(st: os.stat_result) -> str:
    """Who holds a flock on the file *st* is of, as /proc/locks tells (best effort)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or fields[1] != "FLOCK":
                continue  # a waiter, or a POSIX lock: not ours
            major, minor, ino = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(ino)) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
                pid = int(fields[4])
                if pid > 0:
                    return f"process {pid}{_command(pid)}"
    return "another process"


def _command(pid: int) -> str:
    """`` (pyunionfs mount)`` for a pyunionfs process, else its program's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "pyunionfs":  # the script, or python's -m argument
            word = argv[i + 1] if i + 1 < len(argv) else ""
            # the fuse-overlayfs form (pyunionfs -o ... MNT) only ever mounts
            return f" (pyunionfs {word if word.isalpha() else 'mount'})"
    return f" ({os.path.basename(argv[0])})" if argv else ""


def _kernel_overlay_using(st: os.stat_result) -> bytes | None:
    """The mountpoint of a kernel overlayfs whose upperdir= or workdir= is the directory *st* is of."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        sep = fields.index(b"-")
        if fields[sep + 1] != b"overlay":
            continue
        for opt in fields[-1].split(b","):
            key, _, value = opt.partition(b"=")
            if key not in (b"upperdir", b"workdir"):
                continue
            try:
                other = os.stat(unescape_mountinfo(value))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return unescape_mountinfo(fields[4])
    return None
