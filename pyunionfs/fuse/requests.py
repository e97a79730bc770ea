"""What each FUSE request carries, and how its argument bytes decode.

Small slotted dataclasses, one per argument layout, built once per request by
:func:`.protocol.parse_request` through :data:`DECODERS` (what does not
decode is a :class:`~pyunionfs.errors.ProtocolError`).  Names are ``bytes``
without their trailing NUL; WRITE (and IOCTL, NOTIFY_REPLY) data is a
memoryview into the buffer the request was read into (no copy), valid only
until that buffer is reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from struct import Struct

from . import structs as S
from .abi import InitFlag, Opcode


# -- argument objects ---------------------------------------------------------


@dataclass(slots=True)
class Name:
    """LOOKUP, UNLINK, RMDIR, REMOVEXATTR: one name."""

    name: bytes


@dataclass(slots=True)
class Forget:
    """FORGET: drop nlookup of the lookups counted on the header's nodeid."""

    nlookup: int


@dataclass(slots=True)
class BatchForget:
    """BATCH_FORGET: (nodeid, nlookup) pairs, each like one FORGET."""

    forgets: list[tuple[int, int]]


@dataclass(slots=True)
class Getattr:
    """GETATTR: flags (GETATTR_FH: fh is valid, the caller did fstat)."""

    flags: int
    fh: int


@dataclass(slots=True)
class Setattr:
    """SETATTR: ``valid`` (FattrFlag) says which of the other fields are meant.

    Times are in nanoseconds since the epoch (negative before 1970).
    """

    valid: int
    fh: int
    size: int
    lock_owner: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    uid: int
    gid: int


@dataclass(slots=True)
class Symlink:
    """SYMLINK: the new entry's name, then what the link points to."""

    name: bytes
    target: bytes


@dataclass(slots=True)
class Mknod:
    """MKNOD: rdev is usable as a dev_t for os.mknod as it is."""

    mode: int
    rdev: int
    umask: int
    name: bytes


@dataclass(slots=True)
class Mkdir:
    """MKDIR: mode already umasked by the kernel unless DONT_MASK was agreed."""

    mode: int
    umask: int
    name: bytes


@dataclass(slots=True)
class Rename:
    """RENAME and RENAME2 (flags: RENAME_NOREPLACE/EXCHANGE/WHITEOUT; 0 for RENAME)."""

    newdir: int
    name: bytes
    newname: bytes
    flags: int


@dataclass(slots=True)
class Link:
    """LINK: a new name, in the header's nodeid, for the inode oldnodeid."""

    oldnodeid: int
    newname: bytes


@dataclass(slots=True)
class Open:
    """OPEN, OPENDIR: open(2) flags and OPEN_KILL_SUIDGID."""

    flags: int
    open_flags: int


@dataclass(slots=True)
class Create:
    """CREATE, and TMPFILE (whose name is ``/``)."""

    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes


@dataclass(slots=True)
class Read:
    """READ, READDIR, READDIRPLUS: size is the most the reply may carry."""

    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@dataclass(slots=True)
class Write:
    """WRITE: data is a view into the request buffer, ``len(data) == size``."""

    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: memoryview


@dataclass(slots=True)
class Release:
    """RELEASE, RELEASEDIR: the last close of an open file handle."""

    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(slots=True)
class Flush:
    """FLUSH: a close(2) of one descriptor of the open file (there may be more)."""

    fh: int
    lock_owner: int


@dataclass(slots=True)
class Fsync:
    """FSYNC, FSYNCDIR (FSYNC_FDATASYNC: data only)."""

    fh: int
    fsync_flags: int


@dataclass(slots=True)
class Setxattr:
    """SETXATTR: flags are XATTR_CREATE/XATTR_REPLACE; setxattr_flags only with SETXATTR_EXT."""

    name: bytes
    value: bytes
    flags: int
    setxattr_flags: int


@dataclass(slots=True)
class Getxattr:
    """GETXATTR, LISTXATTR (name ``b""``): size 0 asks how large the answer is."""

    size: int
    name: bytes


@dataclass(slots=True)
class Access:
    """ACCESS: mask of R_OK/W_OK/X_OK (F_OK is 0)."""

    mask: int


@dataclass(slots=True)
class Init:
    """INIT: the kernel's protocol version and its offer, as one 64-bit InitFlag."""

    major: int
    minor: int
    max_readahead: int
    flags: InitFlag


@dataclass(slots=True)
class Interrupt:
    """INTERRUPT: the unique of an earlier request whose caller got a signal."""

    unique: int


@dataclass(slots=True)
class Lock:
    """GETLK, SETLK, SETLKW (LK_FLOCK in lk_flags: a flock(2) lock)."""

    fh: int
    owner: int
    start: int
    end: int
    type: int
    pid: int
    lk_flags: int


@dataclass(slots=True)
class Bmap:
    """BMAP (fuseblk only)."""

    block: int
    blocksize: int


@dataclass(slots=True)
class Ioctl:
    """IOCTL: data holds in_size bytes the caller passed in."""

    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: memoryview


@dataclass(slots=True)
class Poll:
    """POLL: kh names the poll for a later NOTIFY_POLL."""

    fh: int
    kh: int
    flags: int
    events: int


@dataclass(slots=True)
class NotifyReply:
    """NOTIFY_REPLY: cached data answering our NOTIFY_RETRIEVE (header unique = notify_unique)."""

    offset: int
    size: int
    data: memoryview


@dataclass(slots=True)
class Fallocate:
    """FALLOCATE: mode is FALLOC_FL_* bits."""

    fh: int
    offset: int
    length: int
    mode: int


@dataclass(slots=True)
class Lseek:
    """LSEEK: only SEEK_DATA and SEEK_HOLE reach the server."""

    fh: int
    offset: int
    whence: int


@dataclass(slots=True)
class CopyFileRange:
    """COPY_FILE_RANGE (reply write_out) and COPY_FILE_RANGE_64 (reply copy_file_range_out)."""

    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    len: int
    flags: int


@dataclass(slots=True)
class Statx:
    """STATX: sx_flags are AT_STATX_* sync flags, sx_mask the STATX_* fields wanted."""

    getattr_flags: int
    fh: int
    sx_flags: int
    sx_mask: int


Args = (
    Name | Forget | BatchForget | Getattr | Setattr | Symlink | Mknod | Mkdir | Rename | Link | Open | Create
    | Read | Write | Release | Flush | Fsync | Setxattr | Getxattr | Access | Init | Interrupt | Lock | Bmap
    | Ioctl | Poll | NotifyReply | Fallocate | Lseek | CopyFileRange | Statx
)  # fmt: skip


@dataclass(slots=True)
class Request:
    """One message from the kernel.

    ``opcode`` is an :class:`Opcode` when known, else the bare number (answer
    ENOSYS).  ``args`` is None for opcodes without arguments (READLINK, STATFS,
    DESTROY, SYNCFS...) and for those this module does not decode; ``raw`` then
    holds their argument bytes.  ``ext`` holds the request extensions (security
    context, supplementary groups) that follow the arguments when the matching
    INIT capability was agreed; it is empty otherwise.
    """

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    len: int
    args: Args | None
    raw: memoryview
    ext: memoryview
    #: The node id the kernel sent, where it was a second id of the object
    #: ``nodeid`` now names (see :mod:`.nodeids`); 0 otherwise.
    alias: int = 0

    @property
    def kernel_nodeid(self) -> int:
        """The node id the kernel named (its inode's: what passthrough keys on)."""
        return self.alias or self.nodeid

    @property
    def known(self) -> bool:
        """Whether the opcode is one of protocol 7.45's."""
        return isinstance(self.opcode, Opcode)


# -- decoders -----------------------------------------------------------------
#
# Each takes the argument bytes (header and extensions cut off) and returns the
# argument object; a too-short buffer surfaces as struct.error, a missing NUL
# as ValueError (bytes.index), both turned into ProtocolError by parse_request.

_NS = 1_000_000_000


def _names(body: memoryview, start: int, count: int) -> list[bytes]:
    """*count* NUL-terminated names from *start* on."""
    b = bytes(body[start:])
    out = []
    pos = 0
    for _ in range(count):
        end = b.index(0, pos)
        out.append(b[pos:end])
        pos = end + 1
    return out


def _name(body: memoryview, start: int = 0) -> bytes:
    b = bytes(body[start:])
    return b[: b.index(0)]


def _tail(body: memoryview, start: int, size: int, what: str) -> memoryview:
    """*size* bytes from *start*, or ValueError: data shorter than its declared size."""
    data = body[start : start + size]
    if len(data) != size:
        raise ValueError(f"{what} declares {size} bytes, {len(data)} present")
    return data


def _lookup(body: memoryview) -> Name:
    return Name(_name(body))


def _forget(body: memoryview) -> Forget:
    return Forget(*S.FORGET_IN.unpack_from(body))


def _batch_forget(body: memoryview) -> BatchForget:
    (count,) = S.BATCH_FORGET_IN.unpack_from(body)
    start = S.BATCH_FORGET_IN.size
    items = _tail(body, start, count * S.FORGET_ONE.size, "BATCH_FORGET")
    return BatchForget(list(S.FORGET_ONE.iter_unpack(items)))


def _getattr(body: memoryview) -> Getattr:
    return Getattr(*S.GETATTR_IN.unpack_from(body))


def _setattr(body: memoryview) -> Setattr:
    valid, fh, size, owner, at, mt, ct, atn, mtn, ctn, mode, uid, gid = S.SETATTR_IN.unpack_from(body)
    return Setattr(valid, fh, size, owner, at * _NS + atn, mt * _NS + mtn, ct * _NS + ctn, mode, uid, gid)


def _symlink(body: memoryview) -> Symlink:
    name, target = _names(body, 0, 2)
    return Symlink(name, target)


def _mknod(body: memoryview) -> Mknod:
    mode, rdev, umask = S.MKNOD_IN.unpack_from(body)
    return Mknod(mode, rdev, umask, _name(body, S.MKNOD_IN.size))


def _mkdir(body: memoryview) -> Mkdir:
    mode, umask = S.MKDIR_IN.unpack_from(body)
    return Mkdir(mode, umask, _name(body, S.MKDIR_IN.size))


def _rename(body: memoryview) -> Rename:
    (newdir,) = S.RENAME_IN.unpack_from(body)
    name, newname = _names(body, S.RENAME_IN.size, 2)
    return Rename(newdir, name, newname, 0)


def _rename2(body: memoryview) -> Rename:
    newdir, flags = S.RENAME2_IN.unpack_from(body)
    name, newname = _names(body, S.RENAME2_IN.size, 2)
    return Rename(newdir, name, newname, flags)


def _link(body: memoryview) -> Link:
    (old,) = S.LINK_IN.unpack_from(body)
    return Link(old, _name(body, S.LINK_IN.size))


def _open(body: memoryview) -> Open:
    return Open(*S.OPEN_IN.unpack_from(body))


def _create(body: memoryview) -> Create:
    flags, mode, umask, open_flags = S.CREATE_IN.unpack_from(body)
    return Create(flags, mode, umask, open_flags, _name(body, S.CREATE_IN.size))


def _read(body: memoryview) -> Read:
    return Read(*S.READ_IN.unpack_from(body))


def _write(body: memoryview) -> Write:
    fh, offset, size, write_flags, owner, flags = S.WRITE_IN.unpack_from(body)
    return Write(fh, offset, size, write_flags, owner, flags, _tail(body, S.WRITE_IN.size, size, "WRITE"))


def _release(body: memoryview) -> Release:
    return Release(*S.RELEASE_IN.unpack_from(body))


def _flush(body: memoryview) -> Flush:
    return Flush(*S.FLUSH_IN.unpack_from(body))


def _fsync(body: memoryview) -> Fsync:
    return Fsync(*S.FSYNC_IN.unpack_from(body))


def _setxattr_with(head: Struct) -> Callable[[memoryview], Setxattr]:
    """SETXATTR's decoder for one of its two heads (8 bytes, or 16 with SETXATTR_EXT)."""

    def decode(body: memoryview) -> Setxattr:
        fields = head.unpack_from(body)
        size, flags = fields[0], fields[1]
        name = _name(body, head.size)
        value = _tail(body, head.size + len(name) + 1, size, "SETXATTR")
        return Setxattr(name, bytes(value), flags, fields[2] if len(fields) > 2 else 0)

    return decode


def _getxattr(body: memoryview) -> Getxattr:
    (size,) = S.GETXATTR_IN.unpack_from(body)
    return Getxattr(size, _name(body, S.GETXATTR_IN.size))


def _listxattr(body: memoryview) -> Getxattr:
    (size,) = S.GETXATTR_IN.unpack_from(body)
    return Getxattr(size, b"")


def _init(body: memoryview) -> Init:
    # Kernels before 7.36 send 16 bytes; flags2 counts only with INIT_EXT.
    major, minor, readahead, flags = S.INIT_IN_COMPAT.unpack_from(body)
    if flags & InitFlag.INIT_EXT and len(body) >= S.INIT_IN_FLAGS2.size:
        flags |= S.INIT_IN_FLAGS2.unpack_from(body)[0] << 32
    return Init(major, minor, readahead, InitFlag(flags))


def _access(body: memoryview) -> Access:
    return Access(*S.ACCESS_IN.unpack_from(body))


def _interrupt(body: memoryview) -> Interrupt:
    return Interrupt(*S.INTERRUPT_IN.unpack_from(body))


def _lock(body: memoryview) -> Lock:
    return Lock(*S.LK_IN.unpack_from(body))


def _bmap(body: memoryview) -> Bmap:
    return Bmap(*S.BMAP_IN.unpack_from(body))


def _ioctl(body: memoryview) -> Ioctl:
    fh, flags, cmd, arg, in_size, out_size = S.IOCTL_IN.unpack_from(body)
    return Ioctl(fh, flags, cmd, arg, in_size, out_size, _tail(body, S.IOCTL_IN.size, in_size, "IOCTL"))


def _poll(body: memoryview) -> Poll:
    return Poll(*S.POLL_IN.unpack_from(body))


def _notify_reply(body: memoryview) -> NotifyReply:
    offset, size = S.NOTIFY_RETRIEVE_IN.unpack_from(body)
    return NotifyReply(offset, size, _tail(body, S.NOTIFY_RETRIEVE_IN.size, size, "NOTIFY_REPLY"))


def _fallocate(body: memoryview) -> Fallocate:
    return Fallocate(*S.FALLOCATE_IN.unpack_from(body))


def _lseek(body: memoryview) -> Lseek:
    return Lseek(*S.LSEEK_IN.unpack_from(body))


def _copy_file_range(body: memoryview) -> CopyFileRange:
    return CopyFileRange(*S.COPY_FILE_RANGE_IN.unpack_from(body))


def _statx(body: memoryview) -> Statx:
    return Statx(*S.STATX_IN.unpack_from(body))


_Decoder = Callable[[memoryview], Args]

#: Opcodes with arguments this module decodes.  Those absent with no arguments
#: (READLINK, STATFS, DESTROY, SYNCFS) or only for other transports
#: (SETUPMAPPING, REMOVEMAPPING: virtio-fs; CUSE_INIT) get ``args=None``.
DECODERS: dict[int, _Decoder] = {
    Opcode.LOOKUP: _lookup,
    Opcode.FORGET: _forget,
    Opcode.GETATTR: _getattr,
    Opcode.SETATTR: _setattr,
    Opcode.SYMLINK: _symlink,
    Opcode.MKNOD: _mknod,
    Opcode.MKDIR: _mkdir,
    Opcode.UNLINK: _lookup,
    Opcode.RMDIR: _lookup,
    Opcode.RENAME: _rename,
    Opcode.LINK: _link,
    Opcode.OPEN: _open,
    Opcode.READ: _read,
    Opcode.WRITE: _write,
    Opcode.RELEASE: _release,
    Opcode.FSYNC: _fsync,
    Opcode.SETXATTR: _setxattr_with(S.SETXATTR_IN_COMPAT),
    Opcode.GETXATTR: _getxattr,
    Opcode.LISTXATTR: _listxattr,
    Opcode.REMOVEXATTR: _lookup,
    Opcode.FLUSH: _flush,
    Opcode.INIT: _init,
    Opcode.OPENDIR: _open,
    Opcode.READDIR: _read,
    Opcode.RELEASEDIR: _release,
    Opcode.FSYNCDIR: _fsync,
    Opcode.GETLK: _lock,
    Opcode.SETLK: _lock,
    Opcode.SETLKW: _lock,
    Opcode.ACCESS: _access,
    Opcode.CREATE: _create,
    Opcode.INTERRUPT: _interrupt,
    Opcode.BMAP: _bmap,
    Opcode.IOCTL: _ioctl,
    Opcode.POLL: _poll,
    Opcode.NOTIFY_REPLY: _notify_reply,
    Opcode.BATCH_FORGET: _batch_forget,
    Opcode.FALLOCATE: _fallocate,
    Opcode.READDIRPLUS: _read,
    Opcode.RENAME2: _rename2,
    Opcode.LSEEK: _lseek,
    Opcode.COPY_FILE_RANGE: _copy_file_range,
    Opcode.TMPFILE: _create,
    Opcode.STATX: _statx,
    Opcode.COPY_FILE_RANGE_64: _copy_file_range,
}

#: The same, for a connection that agreed on InitFlag.SETXATTR_EXT: the kernel
#: then sends the 16-byte setxattr_in, and nothing in the message says which
#: form it is.
DECODERS_SETXATTR_EXT: dict[int, _Decoder] = {**DECODERS, Opcode.SETXATTR: _setxattr_with(S.SETXATTR_IN)}
