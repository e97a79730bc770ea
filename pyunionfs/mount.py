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
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator

import trio

from . import fuseshim  # before pyfuse3: it must bind to the shim's fuse_session_new
import pyfuse3  # noqa: E402

from .config import MountConfig
from .errors import MountError
from .operations import Operations
from .writes import WritableUnionFS

log = logging.getLogger(__name__)

FSNAME = "pyunionfs"


def mount_options(cfg: MountConfig) -> set[str]:
    """FUSE mount options for *cfg*.

    libfuse mounts with nodev,nosuid unless told otherwise (even as root), so
    ``dev`` and ``suid`` are passed when asked for: mount.fuse3 asks for both
    unless the fstab line says nodev/nosuid, as mount(8) does for any filesystem.
    """
    opts = {f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.readonly:
        opts.add("ro")
    opts.update(cfg.mount_flags)
    if cfg.debug:
        opts.add("debug")  # libfuse prints every request and reply to stderr
    return opts


def find_mount(mountpoint: bytes) -> tuple[str, str] | None:
    """(fstype, major:minor) of the mount at *mountpoint*, read from mountinfo.

    Reads /proc rather than stat()ing the mountpoint: a hung or dead daemon
    would make stat() hang or fail.
    """
    target = os.fsdecode(mountpoint)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            point = os.fsdecode(unescape_mountinfo(fields[4]))
            if point == target:
                found = (os.fsdecode(fields[sep + 1]), os.fsdecode(fields[2]))
    return found


def unescape_mountinfo(field: bytes) -> bytes:
    """Undo the octal escapes (space, tab, newline, backslash) of /proc mount tables."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what libfuse prints on fd 2 during mount, to report it in one line."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(ln.strip() for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip())


def _remove_empty_workdir(workdir: bytes) -> None:
    """A failed mount leaves nothing behind: take away the work directory it
    made (only ever empty directories; anything else stays)."""
    for sub in (b"work", b"index", b""):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(workdir, sub) if sub else workdir)


def _preflight(cfg: MountConfig) -> None:
    """Catch the common failures before libfuse does, with a better message."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run with --device /dev/fuse")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # libfuse opens it before it would fall back to fusermount3.
        raise MountError(
            "/dev/fuse is not readable and writable for this user: mount as root, or let users mount "
            "(chmod 0666 /dev/fuse, as Debian's default is)"
        )
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is missing; a mount by a user other than root needs it: apt-get install fuse3")
    if find_mount(cfg.mountpoint) is not None:
        raise MountError(f"{os.fsdecode(cfg.mountpoint)} is already a mount point")


#: Readahead for the mount, in KiB.  A FUSE mount gets 128 KiB; 1 MiB made
#: cold sequential reads 1.8x faster on this kind of machine.
READ_AHEAD_KB = 1024


async def _tune_readahead(mountpoint: bytes) -> None:
    """Raise the mount's readahead (its bdi's ``read_ahead_kb``; root only).

    The kernel sets it from our INIT reply, so it can be changed only after
    that: a stat of the mount root waits for it (from a thread, since this
    loop is what answers the stat).
    """
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        found = find_mount(mountpoint)
        if found is not None:
            knob = trio.Path(f"/sys/class/bdi/{found[1]}/read_ahead_kb")
            await knob.write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("readahead left as it was: %s", exc)


async def _serve(stop: list[bool], mountpoint: bytes) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    stop[0] = True
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        nursery.start_soon(_tune_readahead, mountpoint)
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            # The kernel ended the connection as aborted rather than unmounted
            # (an abort through fusectl; seen too when an unmount races with
            # the releases of files closed just before).  The mount is gone
            # either way: end as after an unmount, saying so.
            log.warning("the kernel aborted the FUSE connection: the mount is gone")
        nursery.cancel_scope.cancel()


def serve(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount *cfg*, serve until unmounted, return the exit status.

    If *ready_fd* is given, write ``ok`` (or the one-line error) to it as soon
    as the mount is live, then close it.
    """
    fs: WritableUnionFS | None = None
    fresh_workdir = cfg.workdir is not None and not os.path.lexists(cfg.workdir)
    try:
        _preflight(cfg)
        _raise_fd_limit()
        fs = WritableUnionFS(cfg)
        ops = Operations(fs)
        # timeout=0 asks for no kernel caching: listings too.
        fuseshim.set_cache_dirs(cfg.timeout > 0)
        fuseshim.set_posix_acl(cfg.acl)
        failed = False
        with _captured_stderr() as said:
            try:
                pyfuse3.init(ops, os.fsdecode(cfg.mountpoint), mount_options(cfg))
            except RuntimeError:
                failed = True
        if failed:  # what libfuse said is collected once its stderr is given back
            detail = said[-1].removeprefix("fuse: ") if said else "fuse_session_mount failed"
            raise MountError(f"cannot mount {os.fsdecode(cfg.mountpoint)}: {detail}")
        if not fuseshim.active():
            log.warning("pyfuse3 was loaded before the FUSE shim: no cached listings, no fallocate")
    except MountError as exc:
        if fs is not None:
            fs.close()
        if fresh_workdir and cfg.workdir is not None:
            _remove_empty_workdir(cfg.workdir)
        _report(ready_fd, str(exc))
        return 1
    _report(ready_fd, None)
    stop = [False]
    try:
        trio.run(_serve, stop, cfg.mountpoint)
    finally:
        # After an external umount the kernel is gone already; after a
        # signal we unmount ourselves (lazily, as libfuse does for root).
        pyfuse3.close(unmount=stop[0])
        fs.close()
    return 0


def _report(ready_fd: int | None, error: str | None) -> None:
    if ready_fd is None:
        if error:
            print(f"pyunionfs: {error}", file=sys.stderr)
        return
    with os.fdopen(ready_fd, "wb") as w:
        w.write(b"ok" if error is None else error.encode(errors="replace"))


def _raise_fd_limit() -> None:
    """Deep trees need one fd per level while a path is opened."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_file else null
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def mount(cfg: MountConfig, log_file: str | None = None) -> int:
    """Mount in the background and return once the mount is live (or failed)."""
    if cfg.foreground:
        faulthandler.register(signal.SIGUSR1)
        return serve(cfg)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        status = 1
        try:
            os.close(r)
            os.setsid()
            os.chdir("/")
            _detach_stdio(log_file)
            _setup_daemon_logging(cfg)
            faulthandler.enable()
            faulthandler.register(signal.SIGUSR1)
            status = serve(cfg, w)
        except BaseException:
            log.exception("daemon failed")
        finally:
            os._exit(status)
    os.close(w)
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
    the upper closed.  The daemon's connection directory under
    /sys/fs/fuse/connections disappears at that moment, when fusectl is mounted.
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
