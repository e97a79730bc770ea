"""The FUSE protocol as pure functions: requests parsed, replies built; no I/O.

The transport reads one message from /dev/fuse and hands it to
:func:`parse_request`; the engine dispatches on the :class:`~.requests.Request`
and answers with the builders below, whose bytes (or buffer lists, for
os.writev) the transport writes back.  The kernel takes each reply in one
write(2) whose length must equal the length in its header.

A message that cannot be parsed raises :class:`~pyunionfs.errors.ProtocolError`,
carrying the request's ``unique`` and opcode when the header could be read, so
the engine answers EIO (or nothing, for the opcodes that take no reply) and
logs it.  The kernel never sends such messages; the checks exist so that a bug
on either side costs one request, not the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from struct import error as StructError
from typing import Protocol, overload

from ..errors import ProtocolError, UnsupportedKernel
from . import abi
from . import structs as S
from .abi import FopenFlag, InitFlag, NotifyCode, Opcode
from .requests import DECODERS, DECODERS_SETXATTR_EXT, Init, Request

Buffer = bytes | bytearray | memoryview
_NS = 1_000_000_000

_OPCODES: dict[int, Opcode] = {int(op): op for op in Opcode}
_HEADER = S.IN_HEADER
_HSIZE = S.IN_HEADER.size
_NO_EXT = memoryview(b"")


def parse_request(buf: Buffer, *, setxattr_ext: bool = False) -> Request:
    """Parse one message read from /dev/fuse.

    *buf* may be longer than the message (a reused read buffer): only the
    length the header declares is read.  *setxattr_ext* must say whether
    SETXATTR_EXT was agreed at INIT.  Argument structs longer than this module
    knows are accepted (a newer kernel appends fields); shorter ones, names
    without their NUL and data shorter than declared raise ProtocolError.
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if len(mv) < _HSIZE:
        raise ProtocolError(f"message of {len(mv)} bytes is shorter than fuse_in_header ({_HSIZE})")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _HEADER.unpack_from(mv)
    if length > len(mv):
        raise ProtocolError(f"message declares {length} bytes, {len(mv)} present", unique, opcode)
    end = length - extlen * 8
    if end < _HSIZE:
        raise ProtocolError(f"message declares {length} bytes and {extlen * 8} of extensions", unique, opcode)
    raw = mv[_HSIZE:end]
    ext = mv[end:length] if extlen else _NO_EXT
    req = Request(_OPCODES.get(opcode, opcode), unique, nodeid, uid, gid, pid, length, None, raw, ext)
    decode = (DECODERS_SETXATTR_EXT if setxattr_ext else DECODERS).get(opcode)
    if decode is not None:
        try:
            req.args = decode(raw)
        except (StructError, ValueError) as e:
            name = req.opcode.name if isinstance(req.opcode, Opcode) else str(opcode)
            raise ProtocolError(f"{name} with {len(raw)} bytes of arguments: {e}", unique, opcode) from None
    return req


# -- replies --------------------------------------------------------------------


class AttrLike(Protocol):
    """What fuse_attr is built from (``pyunionfs.union.Attr`` fits)."""

    @property
    def ino(self) -> int: ...
    @property
    def mode(self) -> int: ...
    @property
    def nlink(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def rdev(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def blksize(self) -> int: ...
    @property
    def blocks(self) -> int: ...
    @property
    def atime_ns(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def ctime_ns(self) -> int: ...


class StatvfsLike(Protocol):
    """What fuse_kstatfs is built from (``os.statvfs_result`` fits)."""

    @property
    def f_bsize(self) -> int: ...
    @property
    def f_frsize(self) -> int: ...
    @property
    def f_blocks(self) -> int: ...
    @property
    def f_bfree(self) -> int: ...
    @property
    def f_bavail(self) -> int: ...
    @property
    def f_files(self) -> int: ...
    @property
    def f_ffree(self) -> int: ...
    @property
    def f_namemax(self) -> int: ...


_OUT = S.OUT_HEADER
_OSIZE = S.OUT_HEADER.size


def reply_error(unique: int, err: int) -> bytes:
    """The answer "failed with errno *err*" (positive, 1..511) to request *unique*.

    The kernel refuses a reply whose error is positive or at most -512 (its
    internal codes, -ERESTARTSYS and beyond) with EINVAL on write(2) and leaves
    the request unanswered, its caller hanging: hence ValueError here instead.
    """
    if not 0 < err <= abi.MAX_ERRNO:
        raise ValueError(f"errno {err} outside 1..{abi.MAX_ERRNO}")
    return _OUT.pack(_OSIZE, -err, unique)


@overload
def reply(unique: int, payload: bytes | bytearray | memoryview = b"") -> bytes: ...
@overload
def reply(unique: int, payload: Sequence[Buffer]) -> list[Buffer]: ...
def reply(unique: int, payload: Buffer | Sequence[Buffer] = b"") -> bytes | list[Buffer]:
    """A success answer to request *unique*.

    A single buffer gives one ``bytes`` (a copy: fine for the small structs);
    a sequence of buffers gives a list, the header first, for os.writev, so a
    large READ answer is not copied.  Buffers must be byte-formatted.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return _OUT.pack(_OSIZE + len(payload), 0, unique) + payload
    return [_OUT.pack(_OSIZE + sum(map(len, payload)), 0, unique), *payload]


def reply_header(unique: int, size: int) -> bytes:
    """The header alone of a success answer whose *size* bytes of data the
    caller has already put where the kernel reads them (an io_uring entry's
    payload: see :func:`pyunionfs.fuse.uring.scatter`)."""
    return _OUT.pack(_OSIZE + size, 0, unique)


def _split(seconds: float) -> tuple[int, int]:
    """A cache timeout as (seconds, nanoseconds); negative means 0."""
    if seconds <= 0:
        return 0, 0
    s = int(seconds)
    return s, int((seconds - s) * 1e9)


def _attr_fields(a: AttrLike) -> tuple[int, ...]:
    """fuse_attr's fields in order.  rdev: the kernel decodes it with
    new_decode_dev, whose encoding equals the low 32 bits of glibc's dev_t for
    every major the kernel has (12 bits)."""
    at, atn = divmod(a.atime_ns, _NS)
    mt, mtn = divmod(a.mtime_ns, _NS)
    ct, ctn = divmod(a.ctime_ns, _NS)
    return (
        a.ino, a.size, a.blocks, at, mt, ct, atn, mtn, ctn,
        a.mode, a.nlink, a.uid, a.gid, a.rdev & 0xFFFFFFFF, a.blksize, 0,
    )  # fmt: skip


_NO_ATTR = (0,) * 16


def entry_out(
    attr: AttrLike | None,
    generation: int = 0,
    entry_timeout: float = 0.0,
    attr_timeout: float = 0.0,
    nodeid: int = 0,
) -> bytes:
    """fuse_entry_out (128 bytes): LOOKUP, MKNOD, MKDIR, SYMLINK, LINK answers.

    Every entry answered with a nonzero node id counts one lookup the kernel
    will FORGET later.  ``attr=None`` is a negative entry: "no such name",
    cached for *entry_timeout* (an ENOENT error is not cached).  The node id
    is ``attr.ino`` unless *nodeid* is given (a second id, see :mod:`.nodeids`).
    """
    es, ens = _split(entry_timeout)
    if attr is None:
        return S.ENTRY_OUT.pack(0, 0, es, 0, ens, 0, *_NO_ATTR)
    at, atns = _split(attr_timeout)
    return S.ENTRY_OUT.pack(nodeid or attr.ino, generation, es, at, ens, atns, *_attr_fields(attr))


def attr_out(attr: AttrLike, timeout: float = 0.0) -> bytes:
    """fuse_attr_out (104 bytes): GETATTR and SETATTR answers."""
    s, ns = _split(timeout)
    return S.ATTR_OUT.pack(s, ns, *_attr_fields(attr))


#: statx(2) mask bits: what a statx_out always carries, and the birth time.
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800


def statx_out(attr: AttrLike, btime_ns: int | None, timeout: float = 0.0) -> bytes:
    """fuse_statx_out (288 bytes): a STATX answer, the basic fields and, when
    known, the birth time (which GETATTR cannot carry)."""
    s, ns = _split(timeout)
    mask = STATX_BASIC_STATS | (STATX_BTIME if btime_ns is not None else 0)
    bt, btn = divmod(btime_ns or 0, _NS)
    at, atn = divmod(attr.atime_ns, _NS)
    mt, mtn = divmod(attr.mtime_ns, _NS)
    ct, ctn = divmod(attr.ctime_ns, _NS)
    return S.STATX_OUT.pack(
        s, ns, 0,
        mask, attr.blksize, 0, attr.nlink, attr.uid, attr.gid, attr.mode & 0xFFFF, attr.ino, attr.size,
        attr.blocks, 0, at, atn, bt, btn, ct, ctn, mt, mtn,
        os.major(attr.rdev), os.minor(attr.rdev), 0, 0,
    )  # fmt: skip


def open_out(fh: int, flags: int = 0, backing_id: int = 0) -> bytes:
    """fuse_open_out (16 bytes): OPEN and OPENDIR answers; CREATE sends entry_out + open_out.

    With FOPEN_PASSTHROUGH the kernel does the I/O on the backing file
    *backing_id* (from FUSE_DEV_IOC_BACKING_OPEN) and fails the open (EIO) if
    any flag outside FOPEN_PASSTHROUGH_MASK is set; that is refused here.
    """
    if flags & abi.FOPEN_PASSTHROUGH:
        if backing_id <= 0:
            raise ValueError("FOPEN_PASSTHROUGH needs a backing id")
        if flags & ~abi.FOPEN_PASSTHROUGH_MASK:
            raise ValueError(f"{FopenFlag(flags & ~abi.FOPEN_PASSTHROUGH_MASK)!r} cannot go with FOPEN_PASSTHROUGH")
    return S.OPEN_OUT.pack(fh, flags, backing_id)


def write_out(size: int) -> bytes:
    """fuse_write_out: bytes written (WRITE) or copied (COPY_FILE_RANGE)."""
    return S.WRITE_OUT.pack(size)


def copy_file_range_out(size: int) -> bytes:
    """fuse_copy_file_range_out: bytes copied, for COPY_FILE_RANGE_64."""
    return S.COPY_FILE_RANGE_OUT.pack(size)


def getxattr_out(size: int) -> bytes:
    """fuse_getxattr_out: the size a GETXATTR/LISTXATTR with size 0 asks for."""
    return S.GETXATTR_OUT.pack(size)


def lseek_out(offset: int) -> bytes:
    """fuse_lseek_out: where SEEK_DATA/SEEK_HOLE landed."""
    return S.LSEEK_OUT.pack(offset)


def statfs_out(st: StatvfsLike) -> bytes:
    """fuse_statfs_out (80 bytes) from an os.statvfs result."""
    return S.STATFS_OUT.pack(
        st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize
    )


# -- INIT ---------------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def init_out(
    flags: int,
    max_write: int,
    *,
    max_readahead: int = 0,
    max_background: int = 0,
    congestion_threshold: int = 0,
    time_gran: int = 1,
    max_pages: int = 0,
    max_stack_depth: int = 0,
    request_timeout: int = 0,
) -> bytes:
    """fuse_init_out (64 bytes), the flags split into flags and flags2.

    0 for max_background/congestion_threshold keeps the kernel's defaults
    (12 and 9); time_gran 1 says timestamps are kept to the nanosecond.
    """
    return S.INIT_OUT.pack(
        abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, max_readahead, flags & 0xFFFFFFFF,
        max_background, congestion_threshold, max_write, time_gran, max_pages, 0,
        flags >> 32, max_stack_depth, request_timeout,
    )  # fmt: skip


def negotiate(
    init_in: Init,
    wanted_flags: int,
    max_write: int,
    *,
    required: int = 0,
    max_readahead: int | None = None,
    max_background: int = 0,
    congestion_threshold: int = 0,
    max_stack_depth: int = 1,
    request_timeout: int = 0,
) -> tuple[InitFlag, bytes]:
    """Answer the kernel's INIT: the flags agreed and the fuse_init_out bytes.

    Only what the kernel offered is asked for: the kernel does not check the
    reply against its offer, and a bit it did not offer may mean something it
    cannot do.  INIT_EXT is added when a high bit is wanted, since that is the
    only way flags2 is read.  Refused with :class:`UnsupportedKernel` (answer
    EPROTO): a major other than 7, a minor below
    :data:`~.abi.MIN_KERNEL_MINOR_VERSION`, or a *required* bit not offered.

    *max_write* below 4096 is raised to 4096 (the kernel does the same); with
    MAX_PAGES the kernel is told the pages that takes, else it keeps its
    default of 32 pages per request.  With PASSTHROUGH, *max_stack_depth* (1
    or 2) is how deep a stack of filesystems may lie under backing files: 1
    allows backing files on a plain filesystem and this mount under overlayfs,
    2 allows backing files on overlayfs.  WRITEBACK_CACHE and PASSTHROUGH
    exclude each other (the kernel silently drops passthrough).
    """
    if init_in.major != abi.KERNEL_VERSION:
        raise UnsupportedKernel(f"kernel speaks FUSE {init_in.major}.{init_in.minor}, this daemon speaks 7.x")
    if init_in.minor < abi.MIN_KERNEL_MINOR_VERSION:
        need = abi.MIN_KERNEL_MINOR_VERSION
        raise UnsupportedKernel(f"kernel speaks FUSE 7.{init_in.minor}, 7.{need} or newer needed")
    offered = int(init_in.flags)
    missing = required & ~offered
    if missing:
        raise UnsupportedKernel(f"kernel does not offer {InitFlag(missing)!r}")
    wanted = wanted_flags | required
    if wanted & InitFlag.WRITEBACK_CACHE and wanted & InitFlag.PASSTHROUGH:
        raise ValueError("WRITEBACK_CACHE and PASSTHROUGH exclude each other")
    if wanted >> 32:
        wanted |= InitFlag.INIT_EXT
    flags = wanted & offered & ~InitFlag.INIT_RESERVED
    max_write = max(4096, max_write)
    max_pages = 0
    if flags & InitFlag.MAX_PAGES:
        max_pages = min(0xFFFF, -(-max_write // _PAGE_SIZE))
    depth = 0
    if flags & InitFlag.PASSTHROUGH:
        if not 1 <= max_stack_depth <= 2:
            raise ValueError(f"max_stack_depth {max_stack_depth} outside 1..2")
        depth = max_stack_depth
    readahead = init_in.max_readahead if max_readahead is None else min(max_readahead, init_in.max_readahead)
    timeout = request_timeout if flags & InitFlag.REQUEST_TIMEOUT else 0
    out = init_out(
        flags,
        max_write,
        max_readahead=readahead,
        max_background=max_background,
        congestion_threshold=congestion_threshold,
        max_pages=max_pages,
        max_stack_depth=depth,
        request_timeout=timeout,
    )
    return InitFlag(flags), out


def read_buffer_size(max_write: int) -> int:
    """How large the buffer for reading requests must be.

    A WRITE brings max_write bytes after its headers and a SETXATTR up to
    64 KiB; a request larger than the buffer is failed by the kernel.  One
    page covers the headers and a name, as libfuse reckons.
    """
    return max(abi.MIN_READ_BUFFER, max(4096, max_write, abi.XATTR_SIZE_MAX) + _PAGE_SIZE)


# -- directory listings ---------------------------------------------------------------

_PADS = [b"\0" * n for n in range(8)]
_DIRENT = S.DIRENT
_DIRENTPLUS = S.DIRENTPLUS


def dirent_size(namelen: int, plus: bool = False) -> int:
    """Bytes one READDIR (or READDIRPLUS) record takes, padded to 8."""
    return ((_DIRENTPLUS.size if plus else _DIRENT.size) + namelen + 7) & ~7


def dtype(mode: int) -> int:
    """The DT_* type of a dirent from an st_mode."""
    return (mode & 0o170000) >> 12


def pack_dirents(entries: Iterable[tuple[int, int, int, bytes]], size: int) -> tuple[bytes, int]:
    """A READDIR answer from (ino, off, type, name) entries, at most *size* bytes.

    *off* is the cookie the kernel sends back to continue *after* this entry.
    Returns the bytes and how many entries fit; the first that does not fit
    ends the listing (from an iterator it is consumed: pass a sequence to
    resume from it).  Names must be 1..:data:`~.abi.NAME_MAX` bytes without
    ``/``, else the kernel fails the whole listing with EIO.
    """
    parts: list[bytes] = []
    used = n = 0
    for ino, off, typ, name in entries:
        namelen = len(name)
        rec = _DIRENT.size + namelen
        pad = -rec & 7
        if used + rec + pad > size:
            break
        parts += (_DIRENT.pack(ino, off, namelen, typ), name, _PADS[pad])
        used += rec + pad
        n += 1
    return b"".join(parts), n


def pack_direntplus(
    entries: Iterable[tuple[AttrLike, int | None, int, bytes]],
    size: int,
    entry_timeout: float = 0.0,
    attr_timeout: float = 0.0,
    nodeids: Mapping[int, int] | None = None,
) -> tuple[bytes, int]:
    """A READDIRPLUS answer from (attr, generation, off, name) entries, at most *size* bytes.

    Each record is an entry_out and a dirent, so the kernel fills its dentry
    and inode caches as a LOOKUP would: every packed entry counts one lookup
    of ``attr.ino``, except ``.`` and ``..``, which the kernel skips, and
    entries whose generation is None: their node ID is 0, which tells the
    kernel to make no entry (a name listed that cannot be looked up).
    Returns the bytes and how many fit, as :func:`pack_dirents`.  *nodeids*
    maps inode numbers that the kernel now knows by a second node id to it.
    """
    es, ens = _split(entry_timeout)
    at, atns = _split(attr_timeout)
    parts: list[bytes] = []
    used = n = 0
    for attr, generation, off, name in entries:
        namelen = len(name)
        rec = _DIRENTPLUS.size + namelen
        pad = -rec & 7
        if used + rec + pad > size:
            break
        nodeid = 0 if generation is None else nodeids.get(attr.ino, attr.ino) if nodeids else attr.ino
        head = _DIRENTPLUS.pack(
            nodeid, generation or 0, es, at, ens, atns, *_attr_fields(attr), attr.ino, off, namelen, dtype(attr.mode)
        )
        parts += (head, name, _PADS[pad])
        used += rec + pad
        n += 1
    return b"".join(parts), n


# -- notifications ----------------------------------------------------------------------


def _notify(code: NotifyCode, *parts: bytes) -> bytes:
    """An unsolicited message: unique 0, the notify code where the error goes."""
    body = b"".join(parts)
    return _OUT.pack(_OSIZE + len(body), code, 0) + body


def notify_inval_inode(ino: int, off: int = 0, length: int = 0) -> bytes:
    """Drop the inode's cached attributes and pages from *off* for *length*
    bytes (0 or less: to the end; *off* negative: attributes only)."""
    return _notify(NotifyCode.INVAL_INODE, S.NOTIFY_INVAL_INODE_OUT.pack(ino, off, length))


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    """Drop the cached name *name* in *parent* (EXPIRE_ONLY: mark it stale only)."""
    return _notify(NotifyCode.INVAL_ENTRY, S.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags), name, b"\0")


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """*name* in *parent*, which was *child*, is gone: drop it as an unlink would."""
    return _notify(NotifyCode.DELETE, S.NOTIFY_DELETE_OUT.pack(parent, child, len(name)), name, b"\0")


def notify_store(nodeid: int, offset: int, data: Buffer) -> list[Buffer]:
    """Put *data* into the inode's page cache at *offset* (buffers for os.writev)."""
    head = S.NOTIFY_STORE_OUT.pack(nodeid, offset, len(data))
    return [_OUT.pack(_OSIZE + len(head) + len(data), NotifyCode.STORE, 0), head, data]


def notify_retrieve(notify_unique: int, nodeid: int, offset: int, size: int) -> bytes:
    """Ask for cached pages back; they come as a NOTIFY_REPLY request with unique *notify_unique*."""
    return _notify(NotifyCode.RETRIEVE, S.NOTIFY_RETRIEVE_OUT.pack(notify_unique, nodeid, offset, size))


def notify_poll(kh: int) -> bytes:
    """Wake the poller that POLL registered as *kh*."""
    return _notify(NotifyCode.POLL, S.NOTIFY_POLL_WAKEUP_OUT.pack(kh))


def notify_resend() -> bytes:
    """Have the kernel send again every request not yet answered (needs HAS_RESEND)."""
    return _notify(NotifyCode.RESEND)


def notify_inc_epoch() -> bytes:
    """Make every cached name stale at once (7.44)."""
    return _notify(NotifyCode.INC_EPOCH)


def notify_prune(nodeids: Sequence[int]) -> bytes:
    """Ask the kernel to forget these inodes if unused (6.19; EINVAL before)."""
    return _notify(
        NotifyCode.PRUNE, S.NOTIFY_PRUNE_OUT.pack(len(nodeids)), b"".join(S.FORGET_IN.pack(i) for i in nodeids)
    )
