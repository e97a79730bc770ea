"""The engine: each FUSE request answered by a call into the union core.

:class:`Engine` turns one parsed :class:`~.requests.Request` into one reply
(bytes, or buffers for writev) and nothing else: reading and writing
/dev/fuse, threads and the daemon's life are :mod:`.server`'s.  So it can
be driven by tests with request bytes alone.

Every call that touches the core's shared state holds the core's lock
(:mod:`pyunionfs.locking`); reads, writes and syncs of an open file work on
the handle's fd alone and take no lock, so data moves in parallel.  Errors
become errnos in one place, :meth:`Engine.handle`, with
:func:`pyunionfs.errors.to_errno`: an OSError keeps its errno, anything else
is a bug, logged and answered EIO, never the end of the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TypeVar

from ..config import MountConfig
from ..errors import UnsupportedKernel, fs_error, to_errno
from ..fs.syscalls import fallocate, syncfs
from ..fs.answers import Attr, KernelForget
from ..fs.writes import Caller, SetAttr, WritableUnionFS
from . import control
from . import protocol as P
from .abi import (
    FOPEN_CACHED_DIR,
    FSYNC_FDATASYNC,
    OPEN_KILL_SUIDGID,
    ROOT_ID,
    SETXATTR_ACL_KILL_SGID,
    WRITE_KILL_SUIDGID,
    FattrFlag,
    InitFlag,
    Opcode,
)
from .backing import Backings
from .killpriv import kill_suidgid, killable, killed
from .nodeids import NodeIds
from .openmodes import WRITES, OpenModes
from .requests import (
    Access,
    BatchForget,
    CopyFileRange,
    Create,
    Fallocate,
    Forget,
    Fsync,
    Getxattr,
    Init,
    Link,
    Lseek,
    Mkdir,
    Mknod,
    Name,
    Open,
    Read,
    Release,
    Rename,
    Request,
    Setattr,
    Setxattr,
    Statx,
    Symlink,
    Write,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Reply = bytes | list[P.Buffer] | None
Buffer = P.Buffer

#: Largest WRITE the kernel may send, and so the request buffer's size: 1 MiB
#: (256 pages) halves the requests of a large write against libfuse's 128 KiB.
MAX_WRITE = 1 << 20

#: What the engine asks for at INIT, where the kernel offers it.
WANTED = (
    InitFlag.ASYNC_READ  # several READs of one file at once (readahead)
    | InitFlag.ATOMIC_O_TRUNC  # O_TRUNC in OPEN, not a separate SETATTR
    | InitFlag.EXPORT_SUPPORT  # LOOKUP of "." and ".."
    | InitFlag.BIG_WRITES
    | InitFlag.DONT_MASK  # the core applies the umask, or a default ACL instead
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.ASYNC_DIO
    | InitFlag.PARALLEL_DIROPS
    | InitFlag.HANDLE_KILLPRIV_V2  # we clear suid/sgid: no getxattr before every write
    | InitFlag.MAX_PAGES
    | InitFlag.EXPLICIT_INVAL_DATA  # lowers never change; the upper only through us
    | InitFlag.SETXATTR_EXT  # ACL_KILL_SGID with an access ACL
    | InitFlag.ABORT_ERROR
)

#: SETATTR's valid bits as plain ints: an IntFlag operand costs 0.7 us per
#: ``&``, and a SETATTR tests ten of them.
_MODE, _UID, _GID, _SIZE, _ATIME, _MTIME, _ATIME_NOW, _MTIME_NOW, _FH, _KILL_SUIDGID = map(int, (
    FattrFlag.MODE, FattrFlag.UID, FattrFlag.GID, FattrFlag.SIZE, FattrFlag.ATIME, FattrFlag.MTIME,
    FattrFlag.ATIME_NOW, FattrFlag.MTIME_NOW, FattrFlag.FH, FattrFlag.KILL_SUIDGID))  # fmt: skip


class Engine:
    """Answers the requests of one mount with one :class:`WritableUnionFS`.

    *notify* writes an unsolicited message (an invalidation) to the kernel
    and says whether the kernel took it; *backings* decides passthrough.
    """

    def __init__(
        self,
        fs: WritableUnionFS,
        cfg: MountConfig,
        notify: Callable[[bytes], bool],
        backings: Backings,
    ) -> None:
        self.fs = fs
        self.cfg = cfg
        self.timeout = cfg.timeout
        self.notify = notify
        self.backings = backings
        #: Second node ids of objects whose inode was pinned to a lower file.
        self.ids = NodeIds()
        self.modes = OpenModes(fs, cfg, backings, self.ids, notify)
        self.agreed = InitFlag(0)
        self.ended = False
        #: Requests answered, by opcode (the bench and tests read them).
        self.counts: dict[int, int] = {}
        #: More numbers for the stats, by name (the server adds its own).
        self.gauges: dict[str, Callable[[], int]] = {
            "passthrough_opens": lambda: backings.passthrough_opens,
            "second_node_ids": self.ids.held,
        }
        fs.attrs_changed = self._attrs_changed
        self._table: dict[int, Callable[[Request], Reply]] = {
            Opcode.LOOKUP: self.lookup,
            Opcode.FORGET: self.forget,
            Opcode.BATCH_FORGET: self.batch_forget,
            Opcode.GETATTR: self.getattr,
            Opcode.STATX: self.statx,
            Opcode.SETATTR: self.setattr,
            Opcode.READLINK: self.readlink,
            Opcode.SYMLINK: self.symlink,
            Opcode.MKNOD: self.mknod,
            Opcode.MKDIR: self.mkdir,
            Opcode.UNLINK: self.unlink,
            Opcode.RMDIR: self.rmdir,
            Opcode.RENAME: self.rename,
            Opcode.RENAME2: self.rename,
            Opcode.LINK: self.link,
            Opcode.OPEN: self.open,
            Opcode.READ: self.read,
            Opcode.WRITE: self.write,
            Opcode.STATFS: self.statfs,
            Opcode.RELEASE: self.release,
            Opcode.FSYNC: self.fsync,
            Opcode.SETXATTR: self.setxattr,
            Opcode.GETXATTR: self.getxattr,
            Opcode.LISTXATTR: self.listxattr,
            Opcode.REMOVEXATTR: self.removexattr,
            Opcode.OPENDIR: self.opendir,
            Opcode.READDIR: self.readdir,
            Opcode.READDIRPLUS: self.readdir,
            Opcode.RELEASEDIR: self.releasedir,
            Opcode.FSYNCDIR: self.fsyncdir,
            Opcode.ACCESS: self.access,
            Opcode.CREATE: self.create,
            Opcode.TMPFILE: self.tmpfile,
            Opcode.INTERRUPT: _no_reply,
            Opcode.NOTIFY_REPLY: _no_reply,
            Opcode.DESTROY: self.destroy,
            Opcode.FALLOCATE: self.fallocate,
            Opcode.LSEEK: self.lseek,
            Opcode.COPY_FILE_RANGE: self.copy_file_range,
            Opcode.COPY_FILE_RANGE_64: self.copy_file_range,
            Opcode.SYNCFS: self.syncfs,
            Opcode.INIT: self.init,
        }

    # -- the one entry point -------------------------------------------------

    def handle(self, req: Request) -> Reply:
        """The reply to *req* (None for the requests that take none)."""
        op = req.opcode
        self.counts[op] = self.counts.get(op, 0) + 1
        if self.ids.core:
            ino = self.ids.core.get(req.nodeid)
            if ino is not None:
                req.alias, req.nodeid = req.nodeid, ino
        fn = self._table.get(op)
        if fn is None:
            # FLUSH, locks, IOCTL, POLL, BMAP...: ENOSYS makes
            # the kernel stop asking (and do locks itself, skip FLUSH on close).
            return P.reply_error(req.unique, errno.ENOSYS)
        try:
            out = fn(req)
        except Exception as exc:
            if op in (Opcode.FORGET, Opcode.BATCH_FORGET):
                log.exception("%s failed", Opcode(op).name)
                return None
            return self._failed(req, exc)
        if out is None or isinstance(out, list):
            return out
        return P.reply(req.unique, out)

    def _failed(self, req: Request, exc: Exception) -> bytes:
        """The error answer to *req*, whose handler raised *exc* (logged if it is a bug)."""
        code = to_errno(exc)
        if not isinstance(exc, OSError) or not exc.errno:
            log.exception("%s failed unexpectedly; answering EIO", name_of(req.opcode))
        elif code > 511:
            code = errno.EIO
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s #%d: %s", name_of(req.opcode), req.unique, exc, exc_info=code == errno.EEXIST)
        return P.reply_error(req.unique, code)

    # -- session ------------------------------------------------------------------

    def init(self, req: Request) -> bytes:
        args = _arg(req, Init)
        wanted = WANTED
        if self.cfg.acl:
            wanted |= InitFlag.POSIX_ACL
        if self.timeout > 0:
            wanted |= InitFlag.CACHE_SYMLINKS | InitFlag.NO_OPENDIR_SUPPORT  # (see opendir)
        if self.backings.enabled:
            wanted |= InitFlag.PASSTHROUGH
        if self.cfg.uring:
            wanted |= InitFlag.OVER_IO_URING
        try:
            self.agreed, out = P.negotiate(args, wanted, MAX_WRITE, max_stack_depth=1)
        except UnsupportedKernel as exc:
            log.error("%s", exc)
            raise fs_error(errno.EPROTO) from None
        if not self.agreed & InitFlag.PASSTHROUGH:
            self.backings.enabled = False
        log.debug("INIT: kernel 7.%d, agreed %r", args.minor, self.agreed)
        return out

    def destroy(self, req: Request) -> bytes:
        self.ended = True
        return b""

    # -- names and attributes ---------------------------------------------------

    def _entry(self, attr: Attr) -> bytes:
        nodeid = self.ids.kernel(attr.ino)
        if nodeid != attr.ino:
            self.ids.answered(nodeid)
        return P.entry_out(attr, self.fs.inodes.generation(attr.ino), self.timeout, self.timeout, nodeid)

    def _attr_timeout(self, req: Request) -> float:
        """How long the kernel may keep the attributes answered to *req*: not
        at all on an inode that was let go of (:mod:`.nodeids`), since the
        file's data changes through another inode then, the daemon unaware."""
        if self.ids.core and self.ids.kernel(req.nodeid) != req.kernel_nodeid:
            return 0.0
        return self.timeout

    def lookup(self, req: Request) -> bytes:
        name = _arg(req, Name).name
        try:
            with self.fs.lock:
                _, attr = self.fs.lookup(req.nodeid, name)
        except FileNotFoundError:
            # A negative entry the kernel may keep: a name appears only through
            # a request on that very name (lowers do not change), which replaces it.
            return P.entry_out(None, 0, self.timeout)
        return self._entry(attr)

    def forget(self, req: Request) -> None:
        with self.fs.lock:
            pin = self._forget(req.kernel_nodeid, _arg(req, Forget).nlookup)
        if pin is not None:
            os.close(pin)  # without the lock: it may free an unlinked file

    def batch_forget(self, req: Request) -> None:
        with self.fs.lock:
            pins = [self._forget(nodeid, count) for nodeid, count in _arg(req, BatchForget).forgets]
        for pin in pins:
            if pin is not None:
                os.close(pin)

    def _forget(self, nodeid: int, count: int) -> int | None:
        ids = self.ids
        ino = ids.core.get(nodeid, nodeid) if ids.core else nodeid
        if ino != nodeid:
            ids.forgot(nodeid, count)
        pin = self.fs.forget(ino, count)
        if ids.core and ino not in self.fs.inodes:
            ids.dropped(ino)
        return pin

    def getattr(self, req: Request) -> bytes:
        # fstat and stat answer alike (GETATTR_FH or not): the node is the object.
        with self.fs.lock:
            attr = self.fs.getattr(req.nodeid)
        return P.attr_out(attr, self._attr_timeout(req))

    def statx(self, req: Request) -> bytes:
        # Asked for when a caller wants more than GETATTR carries (the birth
        # time); the same attributes, plus the object's own btime.
        _arg(req, Statx)
        with self.fs.lock:
            attr = self.fs.getattr(req.nodeid)
            btime = self.fs.birth_time(req.nodeid)
        return P.statx_out(attr, btime, self._attr_timeout(req))

    def setattr(self, req: Request) -> bytes:
        a = _arg(req, Setattr)
        v = a.valid
        now = time.time_ns() if v & (_ATIME_NOW | _MTIME_NOW) else 0
        change = SetAttr(
            mode=a.mode if v & _MODE else None,
            uid=a.uid if v & _UID else None,
            gid=a.gid if v & _GID else None,
            size=a.size if v & _SIZE else None,
            atime_ns=now if v & _ATIME_NOW else (a.atime_ns if v & _ATIME else None),
            mtime_ns=now if v & _MTIME_NOW else (a.mtime_ns if v & _MTIME else None),
        )
        fh = a.fh if v & _FH else None
        if change.size is not None:
            self.modes.unpin(req.nodeid, req.kernel_nodeid)
        with self.fs.lock:
            attr = self.fs.setattr(req.nodeid, change, fh)
            in_group = attr.gid == req.gid
            if v & _KILL_SUIDGID and killable(attr.mode, in_group):
                attr = self.fs.setattr(req.nodeid, SetAttr(mode=killed(attr.mode, in_group)), fh)
        return P.attr_out(attr, self._attr_timeout(req))

    def readlink(self, req: Request) -> bytes:
        with self.fs.lock:
            return self.fs.readlink(req.nodeid)

    def access(self, req: Request) -> bytes:
        with self.fs.lock:
            self.fs.access(req.nodeid, _arg(req, Access).mask)
        return b""

    def statfs(self, req: Request) -> bytes:
        return P.statfs_out(self.fs.statfs())

    # -- new names ------------------------------------------------------------------

    def _caller(self, req: Request, umask: int = 0) -> Caller:
        return Caller(req.uid, req.gid, umask, req.pid)

    def mkdir(self, req: Request) -> bytes:
        a = _arg(req, Mkdir)
        with self.fs.lock:
            _, attr = self.fs.mkdir(req.nodeid, a.name, a.mode, self._caller(req, a.umask))
        return self._entry(attr)

    def mknod(self, req: Request) -> bytes:
        a = _arg(req, Mknod)
        with self.fs.lock:
            _, attr = self.fs.mknod(req.nodeid, a.name, a.mode, a.rdev, self._caller(req, a.umask))
        return self._entry(attr)

    def symlink(self, req: Request) -> bytes:
        a = _arg(req, Symlink)
        with self.fs.lock:
            _, attr = self.fs.symlink(req.nodeid, a.name, a.target, self._caller(req))
        return self._entry(attr)

    def link(self, req: Request) -> bytes:
        a = _arg(req, Link)
        with self.fs.lock:
            _, attr = self.fs.link(self.ids.core.get(a.oldnodeid, a.oldnodeid), req.nodeid, a.newname)
        return self._entry(attr)

    def unlink(self, req: Request) -> bytes:
        with self.fs.lock:
            self.fs.unlink(req.nodeid, _arg(req, Name).name)
        return b""

    def rmdir(self, req: Request) -> bytes:
        with self.fs.lock:
            self.fs.rmdir(req.nodeid, _arg(req, Name).name)
        return b""

    def rename(self, req: Request) -> bytes:
        a = _arg(req, Rename)
        with self.fs.lock:
            self.fs.rename(req.nodeid, a.name, a.newdir, a.newname, a.flags)
        return b""

    # -- files ----------------------------------------------------------------------

    def open(self, req: Request) -> bytes:
        a = _arg(req, Open)
        if a.flags & WRITES:
            self.modes.unpin(req.nodeid, req.kernel_nodeid)
        with self.fs.lock:
            fh = self.fs.open_file(req.nodeid, a.flags, self._caller(req))
        return self._answer_open(req, req.nodeid, fh, a.flags, a.open_flags)

    def create(self, req: Request) -> bytes:
        a = _arg(req, Create)
        with self.fs.lock:
            fh, node, attr = self.fs.create(req.nodeid, a.name, a.mode, a.flags, self._caller(req, a.umask))
        return self._answer_open(req, node.ino, fh, a.flags, a.open_flags, self._entry(attr))

    def tmpfile(self, req: Request) -> bytes:
        a = _arg(req, Create)
        with self.fs.lock:
            fh, node, attr = self.fs.tmpfile(req.nodeid, a.mode, a.flags, self._caller(req, a.umask))
        return self._answer_open(req, node.ino, fh, a.flags, 0, self._entry(attr))

    def _answer_open(self, req: Request, ino: int, fh: int, flags: int, open_flags: int, entry: bytes = b"") -> bytes:
        """The reply to an open that made handle *fh* (after *entry* for CREATE
        and TMPFILE); the handle is released again if the reply cannot be made."""
        try:
            if open_flags & OPEN_KILL_SUIDGID:
                kill_suidgid(fh, self.fs.stored_gid(req.gid))
                if self.fs.overrides is not None:
                    self._kill_recorded(req, ino, fh)
            # (The inode of an OPEN is the one the kernel named; CREATE's is in its entry.)
            nodeid = req.kernel_nodeid if ino == req.nodeid else self.ids.kernel(ino)
            return entry + self.modes.answer(ino, nodeid, fh, flags)
        except BaseException:
            with self.fs.lock:
                self.fs.release(fh)
            raise

    def read(self, req: Request) -> list[Buffer]:
        a = _arg(req, Read)
        return P.reply(req.unique, [os.pread(a.fh, a.size, a.offset)])

    def read_into(self, req: Request, buf: memoryview) -> bytes:
        """READ with the data read straight into *buf* (an io_uring entry's
        payload): the reply is the header alone (:func:`.protocol.reply_header`).
        Over the ring, :meth:`read` cost a new buffer and two copies per READ."""
        self.counts[req.opcode] = self.counts.get(req.opcode, 0) + 1
        try:
            a = _arg(req, Read)
            n = os.preadv(a.fh, (buf[: a.size],), a.offset)
        except Exception as exc:
            return self._failed(req, exc)
        return P.reply_header(req.unique, n)

    def write(self, req: Request) -> bytes:
        a = _arg(req, Write)
        if a.write_flags & WRITE_KILL_SUIDGID:
            kill_suidgid(a.fh, self.fs.stored_gid(req.gid))
            if self.fs.overrides is not None:
                self._kill_recorded(req, req.nodeid, a.fh)
        return P.write_out(os.pwrite(a.fh, a.data, a.offset))

    def _kill_recorded(self, req: Request, ino: int, fh: int) -> None:
        """The set-ID bits of a mode kept in a record (``xattr_permissions=``,
        see :mod:`pyunionfs.fs.override`) go as a stored mode's do: the stored
        mode no longer says them.  (fuse-overlayfs gets a SETATTR for it.)"""
        with self.fs.lock:
            attr = self.fs.getattr(ino)
            in_group = attr.gid == req.gid
            if stat.S_ISREG(attr.mode) and killable(attr.mode, in_group):
                self.fs.setattr(ino, SetAttr(mode=killed(attr.mode, in_group)), fh)

    def release(self, req: Request) -> bytes:
        a = _arg(req, Release)
        with self.fs.lock:
            fd = self.fs.detach(a.fh)
        if fd is not None:
            os.close(fd)  # without the lock: see HandleTable.detach
        self.backings.release(req.kernel_nodeid)
        return b""

    def fsync(self, req: Request) -> bytes:
        a = _arg(req, Fsync)
        if a.fsync_flags & FSYNC_FDATASYNC:
            os.fdatasync(a.fh)
        else:
            os.fsync(a.fh)
        return b""

    def fallocate(self, req: Request) -> bytes:
        a = _arg(req, Fallocate)
        fallocate(a.fh, a.mode, a.offset, a.length)
        return b""

    def lseek(self, req: Request) -> bytes:
        a = _arg(req, Lseek)
        # The handle's own fd position is never used (reads and writes are
        # positional), so seeking it is harmless.
        return P.lseek_out(os.lseek(a.fh, a.offset, a.whence))

    def copy_file_range(self, req: Request) -> bytes:
        a = _arg(req, CopyFileRange)
        n = os.copy_file_range(a.fh_in, a.fh_out, a.len, a.off_in, a.off_out)
        # The destination's cached pages for that range are stale now.
        if n:
            self.notify(P.notify_inval_inode(a.nodeid_out, a.off_out, n))
        if req.opcode == Opcode.COPY_FILE_RANGE_64:
            return P.copy_file_range_out(n)
        return P.write_out(n)

    def syncfs(self, req: Request) -> bytes:
        # The upper's filesystem holds everything written (the work dir is on it).
        up = self.fs.upper
        if up is not None:
            syncfs(up.work)
        return b""

    # -- directories ------------------------------------------------------------------

    def opendir(self, req: Request) -> bytes:
        if self.timeout > 0 and self.agreed & InitFlag.NO_OPENDIR_SUPPORT:
            # Zero-message opendir: ENOSYS once, and the kernel opens
            # directories without asking and never sends RELEASEDIR; it
            # then caches listings (FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE), as
            # below, and READDIR comes with handle 0 (readdir_at).  Two of
            # the four requests per directory of a walk (find, rm -rf).
            raise fs_error(errno.ENOSYS)
        with self.fs.lock:
            fh = self.fs.opendir(req.nodeid, self._caller(req))
        # Cached listings: the kernel drops them itself on every change made
        # through the mount, and lowers do not change.
        return P.open_out(fh, FOPEN_CACHED_DIR if self.timeout > 0 else 0)

    def readdir(self, req: Request) -> bytes:
        a = _arg(req, Read)
        plus = req.opcode == Opcode.READDIRPLUS
        # Entries are taken while they fit: each one READDIRPLUS answers counts
        # a lookup the kernel will FORGET, so only those are remembered.
        taken: list[tuple[int, bytes, Attr, bool]] = []
        used, size, dirent_size = 0, a.size, P.dirent_size
        remember, ids = self.fs.remember, self.ids
        with self.fs.lock:
            # (lean: entries the kernel holds already go with node ID 0, see pack_direntplus.)
            if a.fh:
                entries = self.fs.readdir(a.fh, a.offset, not plus, lean=True)
            else:  # opened without a message (see opendir)
                entries = self.fs.readdir_at(req.nodeid, a.offset, not plus, self._caller(req), lean=True)
            for off, name, node, attr in entries:
                used += dirent_size(len(name), plus)
                if used > size:
                    break
                # (A name without a node and not a dot cannot be looked up: no entry for the kernel.)
                taken.append((off, name, attr, node is None and off > 2))
                if plus and node is not None:
                    remember(node)
                    if ids.core:
                        ids.answered(ids.kernel(attr.ino))
            if plus:
                gen = self.fs.inodes.generation
                return P.pack_direntplus(((attr, None if bare else gen(attr.ino), off, name)
                                          for off, name, attr, bare in taken), a.size, self.timeout, self.timeout,
                                         self.ids.current)[0]
        return P.pack_dirents(((attr.ino, off, P.dtype(attr.mode), name) for off, name, attr, _ in taken), a.size)[0]

    def releasedir(self, req: Request) -> bytes:
        with self.fs.lock:
            self.fs.releasedir(_arg(req, Release).fh)
        return b""

    def fsyncdir(self, req: Request) -> bytes:
        fh = _arg(req, Fsync).fh
        with self.fs.lock:
            if fh:
                self.fs.fsyncdir(fh)
            else:  # opened without a message (see opendir)
                self.fs.fsyncdir_of(req.nodeid)
        return b""

    # -- extended attributes -------------------------------------------------------------

    def getxattr(self, req: Request) -> bytes:
        a = _arg(req, Getxattr)
        if req.nodeid == ROOT_ID and a.name.startswith(control.PREFIX):
            value = self._control(req, a.name)
        else:
            with self.fs.lock:
                value = self.fs.getxattr(req.nodeid, a.name, self._caller(req))
        return _sized(value, a.size)

    def listxattr(self, req: Request) -> bytes:
        a = _arg(req, Getxattr)
        with self.fs.lock:
            names = self.fs.listxattr(req.nodeid, self._caller(req))
        return _sized(b"".join(n + b"\0" for n in names), a.size)

    def setxattr(self, req: Request) -> bytes:
        a = _arg(req, Setxattr)
        if req.nodeid == ROOT_ID and a.name.startswith(control.PREFIX):
            raise fs_error(errno.EPERM)  # reserved for commands, never stored
        with self.fs.lock:
            self.fs.setxattr(req.nodeid, a.name, a.value, a.flags, self._caller(req))
            if a.setxattr_flags & SETXATTR_ACL_KILL_SGID:
                attr = self.fs.getattr(req.nodeid)
                if attr.mode & stat.S_ISGID:
                    self.fs.setattr(req.nodeid, SetAttr(mode=attr.mode & ~stat.S_ISGID), None)
        return b""

    def removexattr(self, req: Request) -> bytes:
        with self.fs.lock:
            self.fs.removexattr(req.nodeid, _arg(req, Name).name, self._caller(req))
        return b""

    def _control(self, req: Request, name: bytes) -> bytes:
        """A command to the daemon (see :mod:`.control`)."""
        if req.uid not in (0, os.geteuid()):
            raise fs_error(errno.EPERM)
        words = [f"{name_of(op)}={n}" for op, n in sorted(self.counts.items())]
        words += (f"{name}={gauge()}" for name, gauge in self.gauges.items())
        return control.answer(name, self.fs, words, self._kernel_forget)

    def _kernel_forget(self, forget: KernelForget) -> int:
        gone = 0
        for ino in forget.inodes:
            for nodeid in self.ids.all_of(ino):
                gone += not self.notify(P.notify_inval_inode(nodeid, 0, 0))
        for parent, name in forget.entries:
            gone += not self.notify(P.notify_inval_entry(parent, name))
        return gone

    def _attrs_changed(self, ino: int) -> None:
        """Drop the kernel's cached attributes of *ino* (takes no lock in the
        kernel: safe in the middle of a request)."""
        for nodeid in self.ids.all_of(ino):
            self.notify(P.notify_inval_inode(nodeid, -1, 0))


def name_of(op: int) -> str:
    """An opcode's name, or its number when unknown."""
    return op.name if isinstance(op, Opcode) else str(op)


def _no_reply(req: Request) -> None:
    """INTERRUPT: every request is short or cannot be stopped halfway (a
    copy-up finishes or is rolled back); NOTIFY_REPLY: never asked for."""
    return None


def _arg(req: Request, kind: type[_T]) -> _T:
    args = req.args
    if not isinstance(args, kind):
        raise fs_error(errno.EIO)
    return args


def _sized(value: bytes, size: int) -> bytes:
    """A GETXATTR/LISTXATTR answer: the size when asked with 0, ERANGE when
    the caller's buffer is too small."""
    if size == 0:
        return P.getxattr_out(len(value))
    if len(value) > size:
        raise fs_error(errno.ERANGE)
    return value
