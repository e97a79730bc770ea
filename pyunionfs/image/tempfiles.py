"""Temporaries written beside an output, and when a later command may remove them.

``commit -o LAYER.tar`` builds ``.LAYER.tar.tmp-PID`` (and ``.LAYER.tar.gz.tmp-PID``)
beside its output, on the output's filesystem so that the finished file is
renamed into place whole.  A command killed meanwhile leaves them behind; the
next command writing the same output removes them.

How it tells a killed command's temporary from a live one's: the writer holds
a flock(2) on its temporary for as long as it writes, and a flock ends with
the process however it ends.  A temporary nobody holds is removed when the
process its name records is gone too (which covers the instant between
creating the file and locking it, and temporaries of older versions that
took no flock).  Nothing but names of this exact form is ever touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from collections.abc import Iterator, Sequence


def temp_beside(path: str, pid: int | None = None) -> str:
    """The temporary name of *path* for process *pid* (default: this one), as
    :mod:`.layertar` writes it."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid() if pid is None else pid}")


def sweep(outputs: Sequence[str]) -> list[str]:
    """Remove the temporaries of *outputs* that killed commands left; return their paths."""
    removed = []
    for out in outputs:
        head, tail = os.path.split(os.path.abspath(out))
        pattern = re.compile(r"\." + re.escape(tail) + r"\.tmp-([0-9]+)")
        try:
            names = os.listdir(head)
        except OSError:
            continue
        for name in names:
            found = pattern.fullmatch(name)
            path = os.path.join(head, name)
            if found and _abandoned(path, int(found[1])):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
    return removed


def _abandoned(path: str, pid: int) -> bool:
    """Whether the regular file *path* is flocked by nobody and its writer *pid* is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its writer is alive
    finally:
        os.close(fd)
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's: alive
    return True


@contextlib.contextmanager
def held_temporaries(outputs: Sequence[str]) -> Iterator[list[str]]:
    """Sweep the leftovers of *outputs*, then create and flock this process's
    temporaries of each for the block (the writer opens them again by name and
    truncates: the same file).  Those still there afterwards (the command failed
    before renaming them into place) are removed."""
    sweep(outputs)
    held: list[tuple[int, str]] = []
    try:
        for out in outputs:
            tmp = temp_beside(out)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except OSError:
                continue  # the writer meets the same error and says it in its words
            held.append((fd, tmp))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield [tmp for _, tmp in held]
    finally:
        for fd, tmp in held:
            with contextlib.suppress(OSError):
                st, now = os.fstat(fd), os.lstat(tmp)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    os.unlink(tmp)
            os.close(fd)
