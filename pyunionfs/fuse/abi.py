"""The numbers of the FUSE kernel protocol, 7.45 (Linux 6.18, ``include/uapi/linux/fuse.h``).

Opcodes, INIT capability bits, per-request flag bits, notification codes and
the ``/dev/fuse`` ioctls.  The byte layouts are in :mod:`.structs`; what the
engine does with them is in :mod:`.protocol`.

The kernel header is the authority; names here drop its ``FUSE_`` prefix inside
the enums (``InitFlag.ASYNC_READ`` is ``FUSE_ASYNC_READ``) and keep it on module
constants.  Comments say what the kernel does with a value, not what C calls it.
"""

from __future__ import annotations

import enum

#: The protocol this package speaks: 7.45.  The kernel uses the smaller of its
#: minor and ours, so replying 45 to a newer kernel is safe.
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45

#: The oldest kernel minor :func:`.protocol.negotiate` accepts.  7.31 is Linux
#: 5.4, the oldest kernel still in common use; every layout this package builds
#: or parses has had its current size since 7.23 (entry_out 128, attr_out 104,
#: init_out 64, write_in 40, mknod_in 16), and the capabilities the union relies
#: on are all older: POSIX_ACL (7.26), CACHE_SYMLINKS and MAX_PAGES (7.28),
#: EXPLICIT_INVAL_DATA (7.30).  Newer features (INIT_EXT 7.36, SETXATTR_EXT and
#: HANDLE_KILLPRIV_V2 7.33, PASSTHROUGH 7.40) are negotiated as bits, so an older
#: kernel simply does not offer them.
MIN_KERNEL_MINOR_VERSION = 31

#: The node id of the mount's root; fixed by the kernel, never looked up.
ROOT_ID = 1

#: The kernel refuses a read(2) of /dev/fuse with a smaller buffer.
MIN_READ_BUFFER = 8192

#: Largest xattr value (Linux XATTR_SIZE_MAX).  A SETXATTR carries one in full,
#: so the read buffer must hold it whatever max_write is: a request larger than
#: the buffer is failed by the kernel (E2BIG for SETXATTR, EIO for others).
XATTR_SIZE_MAX = 65536

#: Longest name the kernel takes (FUSE_NAME_MAX in fs/fuse/fuse_i.h: PATH_MAX - 1
#: since Linux 6.14, 1024 before).  LOOKUP and the notifications take more than
#: 1024 bytes only once INIT agreed MAX_PAGES with max_pages > 1.  A READDIR(PLUS)
#: record with a longer or empty name, or one holding ``/``, fails the whole
#: listing with EIO.
NAME_MAX = 4095

#: Variable-length records (dirents, extensions) are padded to 8 bytes.
REC_ALIGN = 8

#: Set in ``fuse_in_header.unique`` when the kernel resends a request after
#: FUSE_NOTIFY_RESEND (needs InitFlag.HAS_RESEND).  Replies echo the unique as is.
UNIQUE_RESEND = 1 << 63

#: uid/gid in the request header when the mount is idmapped (InitFlag.ALLOW_IDMAP)
#: and the caller's ids do not map.
INVALID_UIDGID = 0xFFFFFFFF

#: Highest errno a reply may carry.  The kernel rejects ``error <= -512``
#: (-ERESTARTSYS and the other kernel-internal codes) and ``error > 0`` with
#: EINVAL on write(2), and the request then stays unanswered.
MAX_ERRNO = 511


class Opcode(enum.IntEnum):
    """``fuse_in_header.opcode``: what the kernel asks.

    FORGET and BATCH_FORGET get no reply; NOTIFY_REPLY answers our own
    NOTIFY_RETRIEVE and gets none either; INTERRUPT may be answered (EAGAIN to
    ask for a resend) or ignored.  Every other request waits for exactly one
    reply.  An ENOSYS reply makes the kernel stop sending many of them for the
    rest of the mount (it keeps a ``no_<op>`` bit), which is the cheap way to
    decline an operation.
    """

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37  # block devices (fuseblk) only
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41  # no reply: it is the answer to NOTIFY_RETRIEVE
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45  # rename with flags (RENAME_NOREPLACE, _EXCHANGE, _WHITEOUT)
    LSEEK = 46  # SEEK_DATA / SEEK_HOLE
    COPY_FILE_RANGE = 47  # reply: write_out (32-bit count)
    SETUPMAPPING = 48  # virtio-fs DAX only, never on /dev/fuse
    REMOVEMAPPING = 49  # virtio-fs DAX only
    SYNCFS = 50
    TMPFILE = 51  # O_TMPFILE: a CREATE whose name is "/"
    STATX = 52
    COPY_FILE_RANGE_64 = 53  # 7.45: reply copy_file_range_out (64-bit count)
    CUSE_INIT = 4096  # character devices in userspace, not a filesystem


#: Requests the engine must not answer, even with an error: the kernel expects
#: no reply to them.  (INTERRUPT may be answered with EAGAIN, to have the
#: interrupt sent again later, but needs no answer.)
NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.NOTIFY_REPLY, Opcode.INTERRUPT})

#: Byte-swapped INIT opcodes: a server seeing these reads the other endianness.
CUSE_INIT_BSWAP_RESERVED = 1048576  # CUSE_INIT << 8
FUSE_INIT_BSWAP_RESERVED = 436207616  # FUSE_INIT << 24


class InitFlag(enum.IntFlag):
    """INIT capabilities as one 64-bit set: ``flags | flags2 << 32``.

    The kernel offers a set in fuse_init_in; the server answers the subset it
    wants in fuse_init_out.  The high word travels in ``flags2`` only when
    INIT_EXT is set in the low word (both ways).  The kernel does not check the
    reply against its offer, so asking only for what was offered is the
    server's job (:func:`.protocol.negotiate`).
    """

    ASYNC_READ = 1 << 0  # several READs of one file in flight at once
    POSIX_LOCKS = 1 << 1  # server implements GETLK/SETLK; else the kernel does locks locally
    FILE_OPS = 1 << 2  # never implemented
    ATOMIC_O_TRUNC = 1 << 3  # O_TRUNC comes with OPEN instead of a separate SETATTR
    EXPORT_SUPPORT = 1 << 4  # server answers LOOKUP of "." and ".." (NFS export)
    BIG_WRITES = 1 << 5  # WRITEs of more than one page
    DONT_MASK = 1 << 6  # the kernel does not apply the umask; server gets mode and umask
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10  # server implements flock(2) locks
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12  # drop cached pages when mtime/size change on getattr
    DO_READDIRPLUS = 1 << 13  # READDIRPLUS: names with their attributes
    READDIRPLUS_AUTO = 1 << 14  # the kernel picks READDIR or READDIRPLUS per call
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16  # the kernel caches writes; excludes PASSTHROUGH
    NO_OPEN_SUPPORT = 1 << 17  # an ENOSYS to OPEN means "opens need no message"
    PARALLEL_DIROPS = 1 << 18  # lookups and readdirs in one directory in parallel
    HANDLE_KILLPRIV = 1 << 19  # server clears suid/sgid on write/chown/truncate
    POSIX_ACL = 1 << 20  # the kernel enforces POSIX ACLs (implies default_permissions)
    ABORT_ERROR = 1 << 21  # reads after an abort fail with ECONNABORTED, not ENODEV
    MAX_PAGES = 1 << 22  # init_out.max_pages is valid (larger requests)
    CACHE_SYMLINKS = 1 << 23  # the kernel caches READLINK answers
    NO_OPENDIR_SUPPORT = 1 << 24  # ENOSYS to OPENDIR means "no message needed"
    EXPLICIT_INVAL_DATA = 1 << 25  # cached pages dropped only on NOTIFY_INVAL_INODE
    MAP_ALIGNMENT = 1 << 26  # DAX (virtio-fs) only
    SUBMOUNTS = 1 << 27  # virtio-fs only
    HANDLE_KILLPRIV_V2 = 1 << 28  # like HANDLE_KILLPRIV, with the VFS's exact rules
    SETXATTR_EXT = 1 << 29  # SETXATTR carries the 16-byte setxattr_in
    INIT_EXT = 1 << 30  # flags2 and the rest of fuse_init_in/out are valid
    INIT_RESERVED = 1 << 31  # reserved, never set
    # bits 32..63 travel in flags2
    SECURITY_CTX = 1 << 32  # CREATE/MKDIR/MKNOD/SYMLINK carry an LSM context extension
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34  # creations carry the caller's matching supplementary group
    HAS_EXPIRE_ONLY = 1 << 35  # NOTIFY_INVAL_ENTRY may merely expire an entry
    DIRECT_IO_ALLOW_MMAP = 1 << 36  # shared mmap of FOPEN_DIRECT_IO files
    PASSTHROUGH = 1 << 37  # FOPEN_PASSTHROUGH: the kernel does I/O on a backing file
    NO_EXPORT_SUPPORT = 1 << 38  # refuse NFS export
    HAS_RESEND = 1 << 39  # NOTIFY_RESEND; resent requests carry UNIQUE_RESEND
    ALLOW_IDMAP = 1 << 40  # idmapped mounts allowed (needs default_permissions)
    OVER_IO_URING = 1 << 41  # requests over io_uring (only if the module enables it)
    REQUEST_TIMEOUT = 1 << 42  # init_out.request_timeout aborts the mount on a stuck request


#: Obsolete alias kept by the header.
DIRECT_IO_RELAX = InitFlag.DIRECT_IO_ALLOW_MMAP


class FopenFlag(enum.IntFlag):
    """``fuse_open_out.open_flags``: how the kernel treats one open file."""

    DIRECT_IO = 1 << 0  # bypass the page cache for this open
    KEEP_CACHE = 1 << 1  # keep cached pages from earlier opens
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3  # the kernel may cache this directory's listing
    STREAM = 1 << 4  # no file position at all
    NOFLUSH = 1 << 5  # no FLUSH on close (unless writeback cache)
    PARALLEL_DIRECT_WRITES = 1 << 6  # direct writes to one inode in parallel
    PASSTHROUGH = 1 << 7  # I/O goes to the backing file named by backing_id


#: The only flags the kernel accepts together with FOPEN_PASSTHROUGH
#: (fs/fuse/iomode.c); with any other (KEEP_CACHE, CACHE_DIR, ...) the open fails
#: with EIO.  Measured on this kernel, see the facts note.
FOPEN_PASSTHROUGH_MASK = int(
    FopenFlag.PASSTHROUGH | FopenFlag.DIRECT_IO | FopenFlag.PARALLEL_DIRECT_WRITES | FopenFlag.NOFLUSH
)

#: The open answers made on every OPEN and OPENDIR, as plain ints: an
#: IntFlag operand makes each ``|`` and ``&`` an enum operation (0.7 us,
#: against 0.03 for ints).
FOPEN_KEEP_CACHE = int(FopenFlag.KEEP_CACHE)
FOPEN_PASSTHROUGH = int(FopenFlag.PASSTHROUGH)
FOPEN_CACHED_DIR = int(FopenFlag.CACHE_DIR | FopenFlag.KEEP_CACHE)


class FattrFlag(enum.IntFlag):
    """``fuse_setattr_in.valid``: which fields of a SETATTR are meant."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6  # the request came through an open file: fh is valid
    ATIME_NOW = 1 << 7  # set atime to the server's "now" (utimensat UTIME_NOW)
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11  # with HANDLE_KILLPRIV_V2: clear suid/sgid as part of this change


class NotifyCode(enum.IntEnum):
    """``fuse_out_header.error`` of an unsolicited message (``unique`` 0).

    The kernel answers a notification's write(2) directly: 0, or an errno such
    as ENOENT (nothing cached) or EINVAL (unknown code, or before INIT).
    """

    POLL = 1
    INVAL_INODE = 2  # drop cached attributes and a range of cached pages
    INVAL_ENTRY = 3  # drop a cached name (or only expire it, FUSE_EXPIRE_ONLY)
    STORE = 4  # push data into the page cache
    RETRIEVE = 5  # ask for cached data back; answered with NOTIFY_REPLY
    DELETE = 6  # a name is gone: drop it as an unlink would, with the child's link
    RESEND = 7  # resend every request still waiting for an answer
    INC_EPOCH = 8  # 7.44: make every cached dentry stale at once
    PRUNE = 9  # 6.19 (still 7.45): ask the kernel to forget unused inodes


# -- flag bits of individual requests ---------------------------------------

RELEASE_FLUSH = 1 << 0  # release_in.release_flags: flush first (last close)
RELEASE_FLOCK_UNLOCK = 1 << 1  # drop flock locks of lock_owner
GETATTR_FH = 1 << 0  # getattr_in.getattr_flags: fh is valid (fstat)
LK_FLOCK = 1 << 0  # lk_in.lk_flags: a flock(2) lock, not a POSIX one
WRITE_CACHE = 1 << 0  # write_in.write_flags: writeback from the page cache, fh guessed
WRITE_LOCKOWNER = 1 << 1  # lock_owner is valid
WRITE_KILL_SUIDGID = 1 << 2  # clear suid/sgid (HANDLE_KILLPRIV_V2)
WRITE_KILL_PRIV = WRITE_KILL_SUIDGID  # obsolete alias
READ_LOCKOWNER = 1 << 1  # read_in.read_flags: lock_owner is valid
FSYNC_FDATASYNC = 1 << 0  # fsync_in.fsync_flags: data only
ATTR_SUBMOUNT = 1 << 0  # fuse_attr.flags: the inode is a submount root (virtio-fs)
ATTR_DAX = 1 << 1  # fuse_attr.flags: DAX for this inode
OPEN_KILL_SUIDGID = 1 << 0  # open_in/create_in.open_flags: O_TRUNC must clear suid/sgid
SETXATTR_ACL_KILL_SGID = 1 << 0  # setxattr_in.setxattr_flags: setting the ACL clears sgid
EXPIRE_ONLY = 1 << 0  # notify_inval_entry_out.flags: expire, keep the dentry
POLL_SCHEDULE_NOTIFY = 1 << 0
SETUPMAPPING_FLAG_WRITE = 1 << 0
SETUPMAPPING_FLAG_READ = 1 << 1

IOCTL_COMPAT = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_RETRY = 1 << 2
IOCTL_32BIT = 1 << 3
IOCTL_DIR = 1 << 4
IOCTL_COMPAT_X32 = 1 << 5
IOCTL_MAX_IOV = 256

#: Extension types after a request's arguments (``fuse_in_header.total_extlen``).
#: Types 0..31 are security contexts (the value is their count).
EXT_MAX_NR_SECCTX = 31
EXT_GROUPS = 32

#: FUSE over io_uring: the ``cmd_op`` of an IORING_OP_URING_CMD on /dev/fuse
#: (``enum fuse_uring_cmd``; pyunionfs/fuse/uring.py).
IO_URING_CMD_REGISTER = 1
IO_URING_CMD_COMMIT_AND_FETCH = 2

# -- /dev/fuse ioctls ---------------------------------------------------------

DEV_IOC_MAGIC = 229


def _ioc(direction: int, nr: int, size: int) -> int:
    """An ioctl number as the kernel's _IOC() builds it (x86, arm, riscv)."""
    return direction << 30 | size << 16 | DEV_IOC_MAGIC << 8 | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

#: Attach a second /dev/fuse fd to an existing connection (arg: the first fd as
#: uint32), so several threads read requests without sharing one fd's queue.
DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)  # 0x8004e500
#: Register a backing file for passthrough (arg: fuse_backing_map, 16 bytes).
#: The backing id is the ioctl's return value: pass a mutable buffer to
#: fcntl.ioctl so it returns the int, not a copy of the buffer.
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, 16)  # 0x4010e501
#: Release a backing id (arg: int32 id).
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)  # 0x4004e502
#: Ask for INIT to be answered while mount(2) is still running (6.19; ENOTTY
#: where unsupported).
DEV_IOC_SYNC_INIT = _ioc(_IOC_NONE, 3, 0)  # 0xe503
