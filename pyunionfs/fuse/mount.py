"""Mount lifecycle: daemonizing, readiness, signals, clean unmount.

``pyunionfs mount`` must return only when the mount is live and must report a
failed mount as one line with a non-zero status.  So the command forks before
anything else runs; the child mounts, then tells the parent through a pipe
either ``ok`` or the error line, and serves requests until unmounted.  The
parent exits with the child's verdict.  Nothing of the child keeps the
caller's stdout/stderr open, so ``$(pyunionfs mount ...)`` and
``subprocess.run(..., capture_output=True)`` return at once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import gc
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable

from ..config import MountConfig
from ..errors import MountError
from ..fs.writes import WritableUnionFS
from .inuse import Claim, claim
from .mountinfo import READ_AHEAD_KB, find_mount, unescape_mountinfo

__all__ = ["READ_AHEAD_KB", "find_mount", "mount", "serve", "unescape_mountinfo", "unmount"]

log = logging.getLogger(__name__)

FSNAME = "pyunionfs"


def _remove_empty_workdir(workdir: bytes) -> None:
    """A failed mount leaves nothing behind: take away the work directory it
    made (only ever empty directories; anything else stays)."""
    for sub in (b"work", b"index", b""):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(workdir, sub) if sub else workdir)


def _preflight(cfg: MountConfig) -> None:
    """Catch the common failures before the engine does, with a better message."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run with --device /dev/fuse")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError(
            "/dev/fuse is not readable and writable for this user: mount as root, or let users mount "
            "(chmod 0666 /dev/fuse, as Debian's default is)"
        )
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is missing; a mount by a user other than root needs it: apt-get install fuse3")
    if find_mount(cfg.mountpoint) is not None:
        raise MountError(f"{os.fsdecode(cfg.mountpoint)} is already a mount point")


def _claim_layers(cfg: MountConfig) -> Claim:
    """Take the upper and the work directory for this daemon's life, as the
    kernel marks them in use: before anything cleans ``work/`` (a second
    daemon's cleaning would delete the first one's copy-up in progress).
    The work directory is made here if missing, so that it can be held."""
    if cfg.upper is None or cfg.workdir is None or cfg.readonly:
        return Claim([])
    try:
        os.makedirs(cfg.workdir, 0o700, exist_ok=True)
    except OSError as exc:
        raise MountError(
            f"cannot create work directory {os.fsdecode(cfg.workdir)}: {exc.strerror} (choose one with -o workdir=DIR)"
        ) from None
    return claim([("upper", cfg.upper), ("work directory", cfg.workdir)], "mount")


def _hold_mountpoint(mountpoint: bytes) -> Claim:
    """A shared flock on the directory under the mountpoint, held until the
    daemon exits: :func:`unmount` waits for it, so that a mount of the same
    upper right after ``pyunionfs umount`` finds the upper free."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Claim([])  # not readable: unmount then cannot wait for us, nothing worse
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return Claim([fd])


def _engine_serve(cfg: MountConfig) -> Callable[[MountConfig, WritableUnionFS, Callable[[], None]], int]:
    """The ``serve`` of the engine *cfg* names (imported only when used)."""
    if cfg.engine == "pyfuse3":
        try:
            from . import pyfuse3_engine
        except ImportError as exc:
            raise MountError(
                f"engine=pyfuse3 needs pyfuse3 ({exc}): pip install 'pyunionfs[pyfuse3]'"
            ) from None
        return pyfuse3_engine.serve
    from . import server

    return server.serve


def serve(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount *cfg*, serve until unmounted, return the exit status.

    If *ready_fd* is given, write ``ok`` (or the one-line error) to it as soon
    as the mount is live, then close it.
    """
    fs: WritableUnionFS | None = None
    fresh_workdir = cfg.workdir is not None and not os.path.lexists(cfg.workdir)
    live = False
    held = Claim([])
    at_mountpoint = Claim([])

    def on_live() -> None:
        nonlocal live
        live = True
        _report(ready_fd, None)

    try:
        _preflight(cfg)
        _raise_fd_limit()
        engine_serve = _engine_serve(cfg)
        held = _claim_layers(cfg)
        at_mountpoint = _hold_mountpoint(cfg.mountpoint)
        fs = WritableUnionFS(cfg)
        _tune_gc()
        return engine_serve(cfg, fs, on_live)
    except MountError as exc:
        if live:
            log.error("%s", exc)
            return 1
        if fs is not None:
            fs.close()
            fs = None
        if fresh_workdir and cfg.workdir is not None:
            _remove_empty_workdir(cfg.workdir)
        _report(ready_fd, str(exc))
        return 1
    finally:
        if fs is not None:
            with fs.lock:
                fs.close()
        held.release()  # nothing more is written: the upper is free for the next mount
        at_mountpoint.release()  # last: unmount() waits for this one


def _report(ready_fd: int | None, error: str | None) -> None:
    if ready_fd is None:
        if error:
            print(f"pyunionfs: {error}", file=sys.stderr)
        return
    with os.fdopen(ready_fd, "wb") as w:
        w.write(b"ok" if error is None else error.encode(errors="replace"))


#: The cyclic collector's thresholds while serving (gc.set_threshold):
#: a young collection every 10,000 objects kept, not every 700.
GC_THRESHOLDS = (10_000, 10, 10)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector to what it can free.

    What the daemon keeps is a node, an entry and its packed lstat for every
    name the kernel holds: tens of thousands of objects after ``ls -lR``,
    hundreds of thousands in a big directory, none of them in a cycle.  With
    CPython's default thresholds the collector walks them again and again as
    they pile up: READDIRPLUS of a 200,000-entry directory (in process, no
    mount) spent 0.59 s of its 4.3 s in 889 collections, the longest a 129 ms
    pause; with these thresholds 0.17 s in 60, the longest 26 ms.  What was
    made before serving (modules, the layers' state) is frozen out of every
    collection.  Garbage cycles are still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _raise_fd_limit() -> None:
    """As many fds as the system allows: the daemon holds one per open file
    of every user (and deep trees need one per level while a path is
    opened).  Up to ``fs.nr_open`` where the hard limit may be raised
    (CAP_SYS_RESOURCE), else to the hard limit.  The core shares what it
    gets fairly between callers (:mod:`.handles`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            most = int(f.read())
    except (OSError, ValueError):
        most = hard
    if hard != resource.RLIM_INFINITY and most > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
            return
        except (OSError, ValueError):
            pass  # no CAP_SYS_RESOURCE: the hard limit is ours
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_log(log_file: str) -> int:
    """Open the daemon's log (appending) in the caller's directory, before the
    daemon changes to ``/``; a path that cannot be written is a one-line error."""
    path = os.path.abspath(log_file)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MountError(f"log file {path}: {exc.strerror}") from None


def _detach_stdio(log_fd: int | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = null if log_fd is None else log_fd
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def mount(cfg: MountConfig, log_file: str | None = None) -> int:
    """Mount in the background and return once the mount is live (or failed).

    *log_file* (relative to the caller's directory) receives a background
    daemon's log; a foreground one logs where :func:`mount_configured` said.
    """
    if cfg.foreground:
        faulthandler.register(signal.SIGUSR1)
        return serve(cfg)
    try:
        _preflight(cfg)  # here too: the daemon has no /dev/null to detach onto without /dev
        log_fd = None if log_file is None else open_log(log_file)
    except MountError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        status = 1
        try:
            os.close(r)
            os.setsid()
            os.chdir("/")
            _detach_stdio(log_fd)
            _setup_daemon_logging(cfg)
            faulthandler.enable()
            faulthandler.register(signal.SIGUSR1)
            status = serve(cfg, w)
        except BaseException:
            log.exception("daemon failed")
        finally:
            os._exit(status)
    os.close(w)
    if log_fd is not None:
        os.close(log_fd)
    with os.fdopen(r, "rb") as rf:
        verdict = rf.read()
    if verdict == b"ok":
        return 0
    os.waitpid(pid, 0)
    print(f"pyunionfs: {verdict.decode(errors='replace') or 'the mount daemon died during start-up'}", file=sys.stderr)
    return 1


def _setup_daemon_logging(cfg: MountConfig) -> None:
    logging.basicConfig(
        level=logging.DEBUG if cfg.debug else logging.INFO,
        format="%(asctime)s pyunionfs[%(process)d] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def unmount(mountpoint: bytes, lazy: bool = False, wait: float = 30.0) -> None:
    """Unmount a pyunionfs mount and wait until its daemon has let go (not when *lazy*).

    Waiting matters: only when the daemon is gone is everything it wrote to
    the upper closed, and the upper free for the next mount.  The daemon
    holds a shared flock on the directory under the mountpoint until then
    (:func:`_hold_mountpoint`), which we can reach once it is unmounted; and
    its connection directory under /sys/fs/fuse/connections goes away at
    unmount, when fusectl is mounted.
    """
    found = find_mount(mountpoint)
    if found is None:
        raise MountError(f"{os.fsdecode(mountpoint)} is not mounted")
    fstype, devno = found
    if fstype != f"fuse.{FSNAME}":
        raise MountError(f"{os.fsdecode(mountpoint)} is not a pyunionfs mount (it is {fstype})")
    import subprocess

    # Root needs no setuid helper (and may not have fuse3's fusermount3).
    if os.geteuid() == 0:
        cmd = ["umount"] + (["-l"] if lazy else []) + [os.fsdecode(mountpoint)]
    else:
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [os.fsdecode(mountpoint)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit status {res.returncode}"
        raise MountError(f"cannot unmount {os.fsdecode(mountpoint)}: {msg}")
    if lazy:
        return  # detached: the daemon lets go when the last user closes, which may be never
    conn = f"/sys/fs/fuse/connections/{devno.split(':')[1]}"
    deadline = time.monotonic() + wait
    while os.path.exists(conn) and time.monotonic() < deadline:
        time.sleep(0.02)
    _wait_for_daemon(mountpoint, deadline)


def _wait_for_daemon(mountpoint: bytes, deadline: float) -> None:
    """Wait (until *deadline*) for the daemons' shared flocks on the directory
    now uncovered at *mountpoint* to go, that is for the daemons to exit."""
    if find_mount(mountpoint) is not None:
        return  # another mount is under it: what we would open is not the daemon's directory
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            except OSError:
                return
    finally:
        os.close(fd)


def mount_configured(cfg: MountConfig, log_file: str | None) -> int:
    """Mount *cfg* (in the background unless cfg.foreground); the exit status.

    In the foreground the log goes to stderr or *log_file*, set up here
    because the daemon's own set-up is for the background case."""
    if cfg.foreground:
        stream = None if log_file is None else os.fdopen(open_log(log_file), "a", buffering=1)
        logging.basicConfig(
            level=logging.DEBUG if cfg.debug else logging.INFO,
            format="%(asctime)s pyunionfs %(levelname)s %(name)s: %(message)s",
            stream=stream,
        )
    return mount(cfg, log_file)
