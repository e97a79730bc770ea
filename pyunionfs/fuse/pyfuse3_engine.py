"""The reference engine: pyfuse3 + trio over the same core (``-o engine=pyfuse3``).

It shows what the transport costs and that the core does not depend on one
engine.  It needs the ``pyfuse3`` extra (pyfuse3 builds against libfuse3) and
lacks what pyfuse3 3.5 cannot ask libfuse for: cached directory listings,
FUSE_DONT_MASK (the kernel applies the umask, so a default ACL's mode is
umasked too), handle_killpriv_v2, passthrough, fallocate and
XATTR_CREATE/XATTR_REPLACE (pyfuse3 drops the flags).  The native engine
(:mod:`.engine`) has them all.

Each handler translates pyfuse3's arguments to a :class:`~.union.UnionFS` call
and its answer back to pyfuse3's types.  Union logic lives in the core; errno
mapping lives in :func:`~.errors.fuse_errors`, applied to every handler here.
Handlers document only where they deviate from pyfuse3's contract.

Handlers call the core on the event loop, holding the core's lock
(:mod:`.locking`): measured on this kind of machine, sending short syscalls to
threads made reads ~3x slower.  The requests that may copy a large file up
go through :meth:`Operations._call`, which runs them again in a worker thread
when the core says it would have to wait (:class:`~pyunionfs.errors.WouldBlock`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, RequestContext

from ..config import MountConfig
from ..errors import MountError, WouldBlock, fs_error, fuse_errors
from ..fs.locking import no_blocking
from ..fs.answers import Attr, KernelForget
from ..fs.writes import Caller, SetAttr, WritableUnionFS
from . import control
from .mountinfo import set_readahead

log = logging.getLogger(__name__)
T = TypeVar("T")


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over one :class:`UnionFS`."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: WritableUnionFS, acl: bool = True) -> None:
        super().__init__()
        #: FUSE_POSIX_ACL (pyfuse3 asks for it when set, before INIT).
        self.enable_acl = acl
        self.fs = fs
        self.timeout = fs.cfg.timeout
        fs.attrs_changed = _forget_attrs

    def _entry(self, attr: Attr) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = attr.ino
        e.generation = self.fs.inodes.generation(attr.ino)
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the core: at once on the event loop, or, when it
        would wait for a long copy-up (:class:`~pyunionfs.errors.WouldBlock`, raised
        before anything changed), again in a worker thread, so that other
        requests go on meanwhile.  Always under the core's lock."""
        try:
            with self.fs.lock, no_blocking():
                return fn(*args)
        except WouldBlock:
            pass
        return await trio.to_thread.run_sync(self._locked, functools.partial(fn, *args))

    def _locked(self, call: Callable[[], T]) -> T:
        with self.fs.lock:
            return call()

    # -- names and attributes ---------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        try:
            with self.fs.lock:
                _, attr = self.fs.lookup(parent_inode, name)
        except FileNotFoundError:
            # A negative entry the kernel may keep: a name appears only
            # through a request on that very name (lowers do not change),
            # which replaces it.  Saves the misses of imports and PATH walks.
            e = EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = self.timeout
            return e
        return self._entry(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Must not raise: it answers no request.
        try:
            for ino, count in inode_list:
                with self.fs.lock:
                    pin = self.fs.forget(ino, count)
                if pin is not None:
                    os.close(pin)  # without the lock: it may free an unlinked file
        except Exception:
            log.exception("forget failed")

    @fuse_errors
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        with self.fs.lock:
            return self._entry(self.fs.getattr(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        with self.fs.lock:
            return self.fs.readlink(inode)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        with self.fs.lock:
            self.fs.access(inode, mode)
        return True

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    # -- directories -------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        with self.fs.lock:
            return self.fs.opendir(inode, _caller(ctx))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # pyfuse3 always answers READDIRPLUS: names and full attributes in one
        # pass.  The kernel holds a reference on each entry it accepts.
        with self.fs.lock:
            for next_id, name, node, attr in self.fs.readdir(fh, start_id):
                if node is None and next_id > 2:
                    continue  # a name that cannot be looked up: pyfuse3 cannot list it without an entry
                if not pyfuse3.readdir_reply(token, name, self._entry(attr), next_id):
                    return
                if node is not None:
                    self.fs.remember(node)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        with self.fs.lock:
            self.fs.releasedir(fh)

    # -- files -------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        # Lowers do not change under a mount (overlayfs's rule too), and the
        # upper changes only through us, so the kernel may keep cached pages
        # across opens.
        return FileInfo(fh=await self._call(self.fs.open_file, inode, flags, _caller(ctx)), keep_cache=True)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        caller = _caller(ctx)
        fh, _, attr = await self._call(self.fs.create, parent_inode, name, mode, flags, caller)
        return FileInfo(fh=fh, keep_cache=True), self._entry(attr)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.fs.write(fh, off, buf)

    @fuse_errors
    async def release(self, fh: int) -> None:
        with self.fs.lock:
            fd = self.fs.detach(fh)
        if fd is not None:
            os.close(fd)  # without the lock: see HandleTable.detach

    # No flush handler: data reaches the upper at each write, so close has
    # nothing to do; pyfuse3's default answers ENOSYS, after which the kernel
    # stops sending FLUSH at all (one request less per close).

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        with self.fs.lock:
            self.fs.fsyncdir(fh)

    # -- names ---------------------------------------------------------------

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext) -> EntryAttributes:
        with self.fs.lock:
            _, attr = self.fs.mkdir(parent_inode, name, mode, _caller(ctx))
        return self._entry(attr)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext) -> EntryAttributes:
        with self.fs.lock:
            _, attr = self.fs.mknod(parent_inode, name, mode, rdev, _caller(ctx))
        return self._entry(attr)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: RequestContext) -> EntryAttributes:
        with self.fs.lock:
            _, attr = self.fs.symlink(parent_inode, name, target, _caller(ctx))
        return self._entry(attr)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: RequestContext) -> EntryAttributes:
        _, attr = await self._call(self.fs.link, inode, new_parent_inode, new_name)
        return self._entry(attr)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        await self._call(self.fs.unlink, parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        await self._call(self.fs.rmdir, parent_inode, name)

    @fuse_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: RequestContext,
    ) -> None:
        await self._call(self.fs.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- attributes and extended attributes ------------------------------------

    @fuse_errors
    async def setattr(
        self, inode: int, attr: EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: RequestContext
    ) -> EntryAttributes:
        change = SetAttr(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._entry(await self._call(self.fs.setattr, inode, change, fh))

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name.startswith(control.PREFIX):
            return await self._control(name, ctx)
        with self.fs.lock:
            return self.fs.getxattr(inode, name, _caller(ctx))

    async def _control(self, name: bytes, ctx: RequestContext) -> bytes:
        """A command to the daemon (see :mod:`.control`)."""
        if ctx.uid not in (0, os.geteuid()):
            raise fs_error(errno.EPERM)
        if name != control.DROP_CACHES:
            raise fs_error(errno.ENODATA)
        with self.fs.lock:
            forget = self.fs.drop_caches()
        # In a thread: an invalidation waits for requests on the same names
        # to finish, which needs the event loop free to answer them.
        failed = await trio.to_thread.run_sync(_kernel_forget, forget)
        log.info("caches dropped: %d inodes, %d names (%d already gone)",
                 len(forget.inodes), len(forget.entries), failed)
        return b"dropped the caches of %d inodes and %d names" % (len(forget.inodes), len(forget.entries))

    @fuse_errors
    async def listxattr(self, inode: int, ctx: RequestContext) -> Sequence[bytes]:
        with self.fs.lock:
            return self.fs.listxattr(inode, _caller(ctx))

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        if inode == pyfuse3.ROOT_INODE and name.startswith(control.PREFIX):
            raise fs_error(errno.EPERM)  # reserved for commands, never stored
        await self._call(self.fs.setxattr, inode, name, value, 0, _caller(ctx))

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        await self._call(self.fs.removexattr, inode, name, _caller(ctx))


def _caller(ctx: RequestContext) -> Caller:
    """Who sent the request (pyfuse3's context carries the same header fields)."""
    return Caller(ctx.uid, ctx.gid, ctx.umask, ctx.pid)


def _forget_attrs(ino: int) -> None:
    """Drop the kernel's cached attributes of *ino*: takes no lock in the
    kernel, so it is safe in the middle of a request."""
    with contextlib.suppress(OSError):  # ENOENT: the kernel no longer has it
        pyfuse3.invalidate_inode(ino, attr_only=True)


def _kernel_forget(forget: KernelForget) -> int:
    """Make the kernel drop what *forget* lists; how many it no longer had."""
    gone = 0
    for ino in forget.inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError:
            gone += 1  # forgotten meanwhile
    for parent, name in forget.entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError:
            gone += 1
    return gone


# -- the daemon's life with pyfuse3 ---------------------------------------------------

FSNAME = "pyunionfs"


def mount_options(cfg: MountConfig) -> set[str]:
    """libfuse's mount options for *cfg*.

    libfuse mounts with nodev,nosuid unless told otherwise (even as root), so
    ``dev`` and ``suid`` are passed when asked for: mount.fuse3 asks for both
    unless the fstab line says nodev/nosuid, as mount(8) does for any filesystem.
    """
    fsname = cfg.fsname.replace("\\", "\\\\").replace(",", "\\,")  # libfuse's option parser unescapes
    opts = {f"fsname={fsname}", f"subtype={FSNAME}", "default_permissions"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.readonly:
        opts.add("ro")
    opts.update(cfg.mount_flags)
    if cfg.debug:
        opts.add("debug")  # libfuse prints every request and reply to stderr
    return opts


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


async def _tune_readahead(mountpoint: bytes) -> None:
    """Raise the mount's readahead once INIT is answered: a stat of the mount
    root waits for that (from a thread, since this loop is what answers it)."""
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except OSError:
        return
    set_readahead(mountpoint)


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
            # An abort through fusectl (seen too when an unmount races with
            # the releases of files closed just before): the mount is gone.
            log.warning("the kernel aborted the FUSE connection: the mount is gone")
        nursery.cancel_scope.cancel()


def serve(cfg: MountConfig, fs: WritableUnionFS, on_live: Callable[[], None]) -> int:
    """Mount *fs* with pyfuse3 and serve it until unmounted (see :func:`.server.serve`)."""
    ops = Operations(fs, acl=cfg.acl)
    failed = False
    with _captured_stderr() as said:
        try:
            pyfuse3.init(ops, os.fsdecode(cfg.mountpoint), mount_options(cfg))
        except RuntimeError:
            failed = True
    if failed:  # what libfuse said is collected once its stderr is given back
        detail = said[-1].removeprefix("fuse: ") if said else "fuse_session_mount failed"
        raise MountError(f"cannot mount {os.fsdecode(cfg.mountpoint)}: {detail}")
    on_live()
    stop = [False]
    try:
        trio.run(_serve, stop, cfg.mountpoint)
    finally:
        # After an external umount the kernel is gone already; after a
        # signal we unmount ourselves (lazily, as libfuse does for root).
        with fs.lock:
            pyfuse3.close(unmount=stop[0])
    return 0
