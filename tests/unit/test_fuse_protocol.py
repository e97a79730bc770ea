"""fuse.abi, fuse.structs, fuse.requests, fuse.protocol: the FUSE 7.45 wire format, no kernel.

Requests are built here byte by byte with the layouts and parsed back; replies
are built and unpacked.  Sizes are the header's (include/uapi/linux/fuse.h,
7.45): its FUSE_COMPAT_* sizes, the comment on fuse_notify_retrieve_in, and the
sizes that follow from its field lists (checked once against the C header with
a compiler when the layouts were written).
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from pyunionfs.errors import ProtocolError, UnsupportedKernel
from pyunionfs.fs.union import Attr
from pyunionfs.fuse import abi
from pyunionfs.fuse import structs as S
from pyunionfs.fuse.abi import FopenFlag, InitFlag, NotifyCode, Opcode
from pyunionfs.fuse.protocol import (
    attr_out,
    copy_file_range_out,
    dirent_size,
    dtype,
    entry_out,
    getxattr_out,
    init_out,
    lseek_out,
    negotiate,
    notify_delete,
    notify_inc_epoch,
    notify_inval_entry,
    notify_inval_inode,
    notify_poll,
    notify_prune,
    notify_resend,
    notify_retrieve,
    notify_store,
    open_out,
    pack_direntplus,
    pack_dirents,
    parse_request,
    read_buffer_size,
    reply,
    reply_error,
    statfs_out,
    write_out,
)
from pyunionfs.fuse.requests import (
    Access,
    BatchForget,
    Bmap,
    CopyFileRange,
    Create,
    Fallocate,
    Flush,
    Forget,
    Fsync,
    Getattr,
    Getxattr,
    Init,
    Interrupt,
    Link,
    Lock,
    Lseek,
    Mkdir,
    Mknod,
    Name,
    Open,
    Poll,
    Read,
    Release,
    Rename,
    Setattr,
    Setxattr,
    Statx,
    Symlink,
)

# -- sizes and numbers ----------------------------------------------------------

SIZES = {
    "IN_HEADER": 40,
    "OUT_HEADER": 16,
    "ATTR": 88,
    "ENTRY_OUT": 128,  # FUSE_COMPAT_ENTRY_OUT_SIZE 120 before 7.9
    "ATTR_OUT": 104,  # FUSE_COMPAT_ATTR_OUT_SIZE 96
    "GETATTR_IN": 16,
    "SETATTR_IN": 88,
    "STATX_IN": 24,
    "STATX": 256,
    "STATX_OUT": 288,
    "FORGET_IN": 8,
    "BATCH_FORGET_IN": 8,
    "FORGET_ONE": 16,
    "MKNOD_IN": 16,  # FUSE_COMPAT_MKNOD_IN_SIZE 8
    "MKDIR_IN": 8,
    "RENAME_IN": 8,
    "RENAME2_IN": 16,
    "LINK_IN": 8,
    "CREATE_IN": 16,
    "OPEN_IN": 8,
    "OPEN_OUT": 16,
    "RELEASE_IN": 24,
    "FLUSH_IN": 24,
    "READ_IN": 40,
    "WRITE_IN": 40,  # FUSE_COMPAT_WRITE_IN_SIZE 24
    "WRITE_OUT": 8,
    "FSYNC_IN": 16,
    "FALLOCATE_IN": 32,
    "LSEEK_IN": 24,
    "LSEEK_OUT": 8,
    "COPY_FILE_RANGE_IN": 56,
    "COPY_FILE_RANGE_OUT": 8,
    "SETXATTR_IN": 16,
    "SETXATTR_IN_COMPAT": 8,  # FUSE_COMPAT_SETXATTR_IN_SIZE
    "GETXATTR_IN": 8,
    "GETXATTR_OUT": 8,
    "ACCESS_IN": 8,
    "INTERRUPT_IN": 8,
    "LK_IN": 48,
    "LK_OUT": 24,
    "BMAP_IN": 16,
    "BMAP_OUT": 8,
    "IOCTL_IN": 32,
    "IOCTL_OUT": 16,
    "POLL_IN": 24,
    "POLL_OUT": 8,
    "SYNCFS_IN": 8,
    "SETUPMAPPING_IN": 40,
    "REMOVEMAPPING_IN": 4,
    "REMOVEMAPPING_ONE": 16,
    "INIT_IN": 64,
    "INIT_IN_COMPAT": 16,
    "INIT_OUT": 64,  # FUSE_COMPAT_22_INIT_OUT_SIZE 24, FUSE_COMPAT_INIT_OUT_SIZE 8
    "STATFS_OUT": 80,  # FUSE_COMPAT_STATFS_SIZE 48
    "DIRENT": 24,  # FUSE_NAME_OFFSET
    "DIRENTPLUS": 152,  # FUSE_NAME_OFFSET_DIRENTPLUS
    "NOTIFY_POLL_WAKEUP_OUT": 8,
    "NOTIFY_INVAL_INODE_OUT": 24,
    "NOTIFY_INVAL_ENTRY_OUT": 16,
    "NOTIFY_DELETE_OUT": 24,
    "NOTIFY_STORE_OUT": 24,
    "NOTIFY_RETRIEVE_OUT": 32,
    "NOTIFY_RETRIEVE_IN": 40,
    "NOTIFY_PRUNE_OUT": 16,
    "BACKING_MAP": 16,
    "EXT_HEADER": 8,
    "SECCTX_HEADER": 8,
    "SECCTX": 8,
    "SUPP_GROUPS": 4,
}


def test_layout_sizes():
    layouts = {n: v for n, v in vars(S).items() if isinstance(v, struct.Struct)}
    assert set(layouts) == set(SIZES) | {"INIT_IN_FLAGS2"}, "every layout has a size checked here"
    for name, size in SIZES.items():
        assert layouts[name].size == size, name
        assert layouts[name].format.startswith("<"), name
    assert S.NOTIFY_RETRIEVE_IN.size == S.WRITE_IN.size  # "Matches the size of fuse_write_in"
    assert S.DIRENTPLUS.size == S.ENTRY_OUT.size + S.DIRENT.size
    assert S.ENTRY_OUT.size == 40 + S.ATTR.size and S.ATTR_OUT.size == 16 + S.ATTR.size


def test_opcodes_are_all_of_7_45():
    assert {int(op) for op in Opcode} == set(range(1, 7)) | set(range(8, 19)) | set(range(20, 54)) | {4096}
    assert (Opcode.INIT, Opcode.BATCH_FORGET, Opcode.RENAME2, Opcode.STATX) == (26, 42, 45, 52)
    assert Opcode.COPY_FILE_RANGE_64 == 53 and Opcode.CUSE_INIT == 4096
    assert abi.FUSE_INIT_BSWAP_RESERVED == Opcode.INIT << 24
    assert {Opcode.FORGET, Opcode.BATCH_FORGET} <= abi.NO_REPLY and Opcode.LOOKUP not in abi.NO_REPLY


def test_flag_bits():
    assert InitFlag.PASSTHROUGH == 1 << 37 and InitFlag.INIT_EXT == 1 << 30
    assert InitFlag.HANDLE_KILLPRIV_V2 == 1 << 28 and InitFlag.SETXATTR_EXT == 1 << 29
    assert InitFlag.DO_READDIRPLUS == 1 << 13 and InitFlag.READDIRPLUS_AUTO == 1 << 14
    assert InitFlag.REQUEST_TIMEOUT == 1 << 42 and abi.DIRECT_IO_RELAX == InitFlag.DIRECT_IO_ALLOW_MMAP
    assert FopenFlag.PASSTHROUGH == 1 << 7 and FopenFlag.PARALLEL_DIRECT_WRITES == 1 << 6
    assert abi.FattrFlag.KILL_SUIDGID == 1 << 11 and abi.FattrFlag.CTIME == 1 << 10
    assert not abi.FOPEN_PASSTHROUGH_MASK & FopenFlag.KEEP_CACHE
    assert (NotifyCode.INVAL_INODE, NotifyCode.DELETE, NotifyCode.PRUNE) == (2, 6, 9)


def test_ioctl_numbers():
    # The values the facts note measured; _IOR/_IOW(229, nr, size) by the kernel's formula.
    assert abi.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert abi.DEV_IOC_BACKING_CLOSE == 0x4004E502
    assert abi.DEV_IOC_CLONE == 0x8004E500
    assert abi.DEV_IOC_SYNC_INIT == 0xE503


# -- requests ---------------------------------------------------------------------


def msg(opcode: int, body: bytes = b"", *, unique: int = 7, nodeid: int = 1, ext: bytes = b"") -> bytes:
    """A request as the kernel writes it: header, arguments, extensions."""
    assert len(ext) % 8 == 0
    n = S.IN_HEADER.size + len(body) + len(ext)
    return S.IN_HEADER.pack(n, opcode, unique, nodeid, 1000, 100, 4242, len(ext) // 8, 0) + body + ext


SEC = 1_000_000_000
CASES = [
    (Opcode.LOOKUP, b"name\0", Name(b"name")),
    (Opcode.FORGET, S.FORGET_IN.pack(3), Forget(3)),
    (Opcode.GETATTR, S.GETATTR_IN.pack(abi.GETATTR_FH, 99), Getattr(abi.GETATTR_FH, 99)),
    (
        Opcode.SETATTR,
        S.SETATTR_IN.pack(0x3F, 5, 4096, 0, -1, 2, 3, 999_999_999, 7, 8, 0o644, 1000, 100),
        Setattr(0x3F, 5, 4096, 0, -1 * SEC + 999_999_999, 2 * SEC + 7, 3 * SEC + 8, 0o644, 1000, 100),
    ),
    (Opcode.SYMLINK, b"link\0../target\0", Symlink(b"link", b"../target")),
    (Opcode.MKNOD, S.MKNOD_IN.pack(0o20644, os.makedev(1, 3), 0o22) + b"null\0", Mknod(0o20644, 259, 0o22, b"null")),
    (Opcode.MKDIR, S.MKDIR_IN.pack(0o755, 0o22) + b"d\0", Mkdir(0o755, 0o22, b"d")),
    (Opcode.UNLINK, b"f\0", Name(b"f")),
    (Opcode.RMDIR, b"d\0", Name(b"d")),
    (Opcode.RENAME, S.RENAME_IN.pack(9) + b"a\0b\0", Rename(9, b"a", b"b", 0)),
    (Opcode.RENAME2, S.RENAME2_IN.pack(9, 2) + b"old\0new\0", Rename(9, b"old", b"new", 2)),
    (Opcode.LINK, S.LINK_IN.pack(12) + b"hard\0", Link(12, b"hard")),
    (Opcode.OPEN, S.OPEN_IN.pack(os.O_RDWR, abi.OPEN_KILL_SUIDGID), Open(os.O_RDWR, abi.OPEN_KILL_SUIDGID)),
    (Opcode.OPENDIR, S.OPEN_IN.pack(os.O_DIRECTORY, 0), Open(os.O_DIRECTORY, 0)),
    (Opcode.READ, S.READ_IN.pack(4, 8192, 4096, 0, 0, os.O_RDONLY), Read(4, 8192, 4096, 0, 0, os.O_RDONLY)),
    (Opcode.READDIR, S.READ_IN.pack(4, 3, 4096, 0, 0, 0), Read(4, 3, 4096, 0, 0, 0)),
    (Opcode.READDIRPLUS, S.READ_IN.pack(4, 0, 8192, 0, 0, 0), Read(4, 0, 8192, 0, 0, 0)),
    (Opcode.RELEASE, S.RELEASE_IN.pack(4, os.O_RDONLY, abi.RELEASE_FLUSH, 77), Release(4, 0, abi.RELEASE_FLUSH, 77)),
    (Opcode.RELEASEDIR, S.RELEASE_IN.pack(5, 0, 0, 0), Release(5, 0, 0, 0)),
    (Opcode.FSYNC, S.FSYNC_IN.pack(4, abi.FSYNC_FDATASYNC), Fsync(4, abi.FSYNC_FDATASYNC)),
    (Opcode.FSYNCDIR, S.FSYNC_IN.pack(5, 0), Fsync(5, 0)),
    (Opcode.SETXATTR, S.SETXATTR_IN_COMPAT.pack(3, 1) + b"user.a\0xyz", Setxattr(b"user.a", b"xyz", 1, 0)),
    (Opcode.GETXATTR, S.GETXATTR_IN.pack(0) + b"user.a\0", Getxattr(0, b"user.a")),
    (Opcode.LISTXATTR, S.GETXATTR_IN.pack(4096), Getxattr(4096, b"")),
    (Opcode.REMOVEXATTR, b"user.a\0", Name(b"user.a")),
    (Opcode.FLUSH, S.FLUSH_IN.pack(4, 77), Flush(4, 77)),
    (Opcode.GETLK, S.LK_IN.pack(4, 77, 0, 99, 1, 42, 0), Lock(4, 77, 0, 99, 1, 42, 0)),
    (Opcode.SETLK, S.LK_IN.pack(4, 77, 0, 99, 1, 42, abi.LK_FLOCK), Lock(4, 77, 0, 99, 1, 42, abi.LK_FLOCK)),
    (Opcode.SETLKW, S.LK_IN.pack(4, 77, 5, 6, 0, 42, 0), Lock(4, 77, 5, 6, 0, 42, 0)),
    (Opcode.ACCESS, S.ACCESS_IN.pack(os.W_OK), Access(os.W_OK)),
    (Opcode.CREATE, S.CREATE_IN.pack(os.O_WRONLY, 0o100644, 0o22, 0) + b"new\0", Create(1, 0o100644, 0o22, 0, b"new")),
    (Opcode.TMPFILE, S.CREATE_IN.pack(os.O_RDWR, 0o100600, 0, 0) + b"/\0", Create(2, 0o100600, 0, 0, b"/")),
    (Opcode.INTERRUPT, S.INTERRUPT_IN.pack(6), Interrupt(6)),
    (Opcode.BMAP, S.BMAP_IN.pack(10, 4096), Bmap(10, 4096)),
    (Opcode.POLL, S.POLL_IN.pack(4, 8, 1, 0x41), Poll(4, 8, 1, 0x41)),
    (
        Opcode.BATCH_FORGET,
        S.BATCH_FORGET_IN.pack(2) + S.FORGET_ONE.pack(5, 1) + S.FORGET_ONE.pack(6, 3),
        BatchForget([(5, 1), (6, 3)]),
    ),
    (Opcode.FALLOCATE, S.FALLOCATE_IN.pack(4, 0, 1 << 20, 1), Fallocate(4, 0, 1 << 20, 1)),
    (Opcode.LSEEK, S.LSEEK_IN.pack(4, 100, os.SEEK_DATA), Lseek(4, 100, os.SEEK_DATA)),
    (Opcode.COPY_FILE_RANGE, S.COPY_FILE_RANGE_IN.pack(1, 2, 3, 4, 5, 6, 0), CopyFileRange(1, 2, 3, 4, 5, 6, 0)),
    (
        Opcode.COPY_FILE_RANGE_64,
        S.COPY_FILE_RANGE_IN.pack(1, 0, 3, 4, 0, 1 << 33, 0),
        CopyFileRange(1, 0, 3, 4, 0, 1 << 33, 0),
    ),
    (Opcode.STATX, S.STATX_IN.pack(0, 0, 0, 0x7FF), Statx(0, 0, 0, 0x7FF)),
]


@pytest.mark.parametrize(("opcode", "body", "expected"), CASES, ids=[c[0].name for c in CASES])
def test_parse_each_opcode(opcode, body, expected):
    req = parse_request(msg(opcode, body, unique=0x1234, nodeid=55))
    assert req.opcode is opcode and req.known
    assert (req.unique, req.nodeid, req.uid, req.gid, req.pid) == (0x1234, 55, 1000, 100, 4242)
    assert req.len == 40 + len(body) and bytes(req.raw) == body and len(req.ext) == 0
    assert req.args == expected


def test_decoded_opcodes_are_all_tested():
    from pyunionfs.fuse.requests import DECODERS

    tested = {c[0] for c in CASES} | {Opcode.WRITE, Opcode.INIT, Opcode.IOCTL, Opcode.NOTIFY_REPLY}
    assert set(DECODERS) == tested


@pytest.mark.parametrize(("opcode", "body", "expected"), CASES, ids=[c[0].name for c in CASES])
def test_args_one_byte_short(opcode, body, expected):
    with pytest.raises(ProtocolError) as info:
        parse_request(msg(opcode, body[:-1], unique=99))
    assert (info.value.unique, info.value.opcode, info.value.errno) == (99, opcode, errno.EIO)


def test_mknod_rdev_is_a_dev_t():
    req = parse_request(msg(Opcode.MKNOD, S.MKNOD_IN.pack(0o20600, os.makedev(8, 300), 0) + b"sda\0"))
    assert (os.major(req.args.rdev), os.minor(req.args.rdev)) == (8, 300)


def test_write_data_is_a_view_not_a_copy():
    data = bytes(range(256)) * 20
    buf = bytearray(msg(Opcode.WRITE, S.WRITE_IN.pack(4, 512, len(data), abi.WRITE_CACHE, 0, os.O_WRONLY) + data))
    w = parse_request(buf).args
    assert (w.fh, w.offset, w.size, w.write_flags, w.flags) == (4, 512, len(data), abi.WRITE_CACHE, os.O_WRONLY)
    assert isinstance(w.data, memoryview) and w.data.obj is buf and w.data == data
    buf[80] ^= 0xFF
    assert w.data[0] == 0xFF  # same memory
    with pytest.raises(ProtocolError, match="WRITE declares 5120 bytes"):
        parse_request(msg(Opcode.WRITE, S.WRITE_IN.pack(4, 0, len(data), 0, 0, 0) + data[:-1]))


def test_ioctl_and_notify_reply_carry_data():
    io = parse_request(msg(Opcode.IOCTL, S.IOCTL_IN.pack(4, 0, 0x5401, 0, 3, 0) + b"abc")).args
    assert (io.cmd, io.in_size, bytes(io.data)) == (0x5401, 3, b"abc")
    nr = parse_request(msg(Opcode.NOTIFY_REPLY, S.NOTIFY_RETRIEVE_IN.pack(4096, 2) + b"hi", unique=5)).args
    assert (nr.offset, nr.size, bytes(nr.data)) == (4096, 2, b"hi")


def test_setxattr_ext_form():
    body = S.SETXATTR_IN.pack(2, 0, abi.SETXATTR_ACL_KILL_SGID) + b"system.posix_acl_access\0\1\2"
    req = parse_request(msg(Opcode.SETXATTR, body), setxattr_ext=True)
    assert req.args == Setxattr(b"system.posix_acl_access", b"\1\2", 0, abi.SETXATTR_ACL_KILL_SGID)
    # The value may hold NULs; only its declared size counts.
    req = parse_request(msg(Opcode.SETXATTR, S.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.b\0\0x\0"))
    assert req.args.value == b"\0x\0"
    with pytest.raises(ProtocolError, match="SETXATTR declares 9"):
        parse_request(msg(Opcode.SETXATTR, S.SETXATTR_IN_COMPAT.pack(9, 0) + b"user.b\0short"))


def test_init_forms():
    offer = 0x73FFFFFB | 0x5FD << 32  # what this kernel offered (facts note)
    full = S.INIT_IN.pack(7, 45, 131072, 0x73FFFFFB, 0x5FD)
    init = parse_request(msg(Opcode.INIT, full)).args
    assert init == Init(7, 45, 131072, InitFlag(offer))
    assert InitFlag.PASSTHROUGH in init.flags and InitFlag.OVER_IO_URING not in init.flags
    # Before 7.36: 16 bytes, no flags2.
    old = parse_request(msg(Opcode.INIT, S.INIT_IN_COMPAT.pack(7, 31, 131072, 0x3FFFFFB))).args
    assert old == Init(7, 31, 131072, InitFlag(0x3FFFFFB))
    # flags2 counts only with INIT_EXT.
    no_ext = parse_request(msg(Opcode.INIT, S.INIT_IN.pack(7, 45, 0, 1, 0x20))).args
    assert no_ext.flags == InitFlag.ASYNC_READ
    with pytest.raises(ProtocolError):
        parse_request(msg(Opcode.INIT, full[:15]))


def test_short_and_oversize_messages():
    good = msg(Opcode.GETATTR, S.GETATTR_IN.pack(0, 0), unique=3)
    with pytest.raises(ProtocolError, match="shorter than fuse_in_header") as info:
        parse_request(good[:39])
    assert info.value.unique is None and info.value.opcode is None
    with pytest.raises(ProtocolError, match="declares 56 bytes, 55 present") as info:
        parse_request(good[:-1])
    assert (info.value.unique, info.value.opcode) == (3, Opcode.GETATTR)
    bogus = S.IN_HEADER.pack(20, Opcode.GETATTR, 3, 1, 0, 0, 0, 0, 0) + bytes(16)
    with pytest.raises(ProtocolError):
        parse_request(bogus)
    # A reused buffer longer than the message: only the declared length is read.
    req = parse_request(bytearray(good) + b"\xff" * 100)
    assert req.len == 56 and len(req.raw) == 16 and req.args == Getattr(0, 0)
    # Arguments longer than this module knows (a newer kernel's): accepted.
    req = parse_request(msg(Opcode.GETATTR, S.GETATTR_IN.pack(1, 9) + bytes(8)))
    assert req.args == Getattr(1, 9)


def test_extensions_are_cut_off():
    ext = S.EXT_HEADER.pack(16, abi.EXT_GROUPS) + S.SUPP_GROUPS.pack(1) + struct.pack("<I", 27)
    req = parse_request(msg(Opcode.MKDIR, S.MKDIR_IN.pack(0o755, 0) + b"sub\0", ext=ext))
    assert req.args == Mkdir(0o755, 0, b"sub") and bytes(req.ext) == ext
    bad = bytearray(msg(Opcode.STATFS))
    S.IN_HEADER.pack_into(bad, 0, 40, Opcode.STATFS, 1, 1, 0, 0, 0, 1, 0)  # 8 bytes of extensions, none there
    with pytest.raises(ProtocolError, match="extensions"):
        parse_request(bad)


def test_unknown_and_argless_opcodes():
    req = parse_request(msg(9999, b"whatever", unique=11))
    assert req.opcode == 9999 and not isinstance(req.opcode, Opcode) and not req.known
    assert req.args is None and bytes(req.raw) == b"whatever" and req.unique == 11
    for op in (Opcode.READLINK, Opcode.STATFS, Opcode.DESTROY, Opcode.SETUPMAPPING):
        req = parse_request(msg(op))
        assert req.opcode is op and req.known and req.args is None
    assert parse_request(msg(Opcode.SYNCFS, S.SYNCFS_IN.pack())).args is None


def test_resend_bit_is_kept_in_unique():
    req = parse_request(msg(Opcode.GETATTR, bytes(16), unique=abi.UNIQUE_RESEND | 42))
    assert req.unique == abi.UNIQUE_RESEND | 42  # the reply must echo it


# -- replies ----------------------------------------------------------------------


def test_reply_error():
    assert reply_error(8, errno.ENOENT) == S.OUT_HEADER.pack(16, -errno.ENOENT, 8)
    assert reply_error(8, errno.ENOSYS)[4:8] == struct.pack("<i", -38)
    for bad in (0, -2, 512):
        with pytest.raises(ValueError):
            reply_error(8, bad)


def test_reply_framing():
    assert reply(5) == S.OUT_HEADER.pack(16, 0, 5)
    out = reply(5, write_out(4096))
    assert isinstance(out, bytes) and S.OUT_HEADER.unpack_from(out) == (24, 0, 5)
    assert reply(5, memoryview(b"abc")) == S.OUT_HEADER.pack(19, 0, 5) + b"abc"
    data = memoryview(bytearray(70000))
    parts = reply(6, [b"x" * 10, data])
    assert isinstance(parts, list) and parts[2] is data
    assert S.OUT_HEADER.unpack(parts[0]) == (16 + 10 + 70000, 0, 6) == (sum(map(len, parts)), 0, 6)


def attr(**kw):
    base = dict(
        ino=42, mode=0o100644, nlink=1, uid=1000, gid=100, rdev=0, size=12345, blksize=4096, blocks=32,
        atime_ns=1_700_000_000_123_456_789, mtime_ns=5, ctime_ns=-1,
    )  # fmt: skip
    base.update(kw)
    return Attr(**base)


def test_entry_and_attr_out():
    e = entry_out(attr(), generation=3, entry_timeout=1.5, attr_timeout=2.0)
    assert len(e) == 128
    f = S.ENTRY_OUT.unpack(e)
    assert f[:6] == (42, 3, 1, 2, 500_000_000, 0)
    ino, size, blocks, at, mt, ct, atn, mtn, ctn, mode, nlink, uid, gid, rdev, blksize, flags = f[6:]
    assert (ino, size, blocks, mode, nlink, uid, gid, rdev, blksize, flags) == (
        42, 12345, 32, 0o100644, 1, 1000, 100, 0, 4096, 0,
    )  # fmt: skip
    assert (at, atn) == (1_700_000_000, 123_456_789) and (mt, mtn) == (0, 5)
    assert (ct, ctn) == (-1, 999_999_999)  # one ns before the epoch: time64_t -1 plus 999999999 ns
    a = attr_out(attr(rdev=os.makedev(8, 300)), timeout=0.25)
    assert len(a) == 104 and S.ATTR_OUT.unpack(a)[:2] == (0, 250_000_000)
    assert S.ATTR_OUT.unpack(a)[2 + 13] == (8 << 8) | (300 & 0xFF) | ((300 & ~0xFF) << 12)  # new_encode_dev
    neg = S.ENTRY_OUT.unpack(entry_out(None, entry_timeout=10))
    assert neg[0] == 0 and neg[2] == 10 and set(neg[6:]) == {0}
    assert S.ENTRY_OUT.unpack(entry_out(attr(), entry_timeout=-1))[2] == 0


def test_open_out():
    assert S.OPEN_OUT.unpack(open_out(9, FopenFlag.KEEP_CACHE)) == (9, 2, 0)
    pt = FopenFlag.PASSTHROUGH | FopenFlag.NOFLUSH
    assert S.OPEN_OUT.unpack(open_out(9, pt, backing_id=3)) == (9, pt, 3)
    with pytest.raises(ValueError, match="KEEP_CACHE"):
        open_out(9, FopenFlag.PASSTHROUGH | FopenFlag.KEEP_CACHE, backing_id=3)
    with pytest.raises(ValueError, match="backing id"):
        open_out(9, FopenFlag.PASSTHROUGH)


def test_small_replies():
    assert S.WRITE_OUT.unpack(write_out(7)) == (7,) and len(write_out(7)) == 8
    assert copy_file_range_out(1 << 33) == struct.pack("<Q", 1 << 33)
    assert getxattr_out(300) == struct.pack("<II", 300, 0)
    assert lseek_out(4096) == struct.pack("<Q", 4096)
    st = os.statvfs("/")
    out = statfs_out(st)
    assert len(out) == 80
    assert S.STATFS_OUT.unpack(out) == (
        st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize,
    )  # fmt: skip


# -- INIT negotiation ---------------------------------------------------------------

OFFER = InitFlag(0x73FFFFFB | 0x5FD << 32)  # this kernel's offer (facts note)
WANT = (
    InitFlag.ASYNC_READ | InitFlag.DONT_MASK | InitFlag.POSIX_ACL | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO | InitFlag.PARALLEL_DIROPS | InitFlag.CACHE_SYMLINKS | InitFlag.MAX_PAGES
    | InitFlag.EXPLICIT_INVAL_DATA | InitFlag.HANDLE_KILLPRIV_V2 | InitFlag.SETXATTR_EXT | InitFlag.EXPORT_SUPPORT
    | InitFlag.PASSTHROUGH | InitFlag.OVER_IO_URING | InitFlag.SUBMOUNTS
)  # fmt: skip


def unpack_init_out(out: bytes) -> dict[str, int]:
    names = ["major", "minor", "max_readahead", "flags", "max_background", "congestion_threshold", "max_write"]
    names += ["time_gran", "max_pages", "map_alignment", "flags2", "max_stack_depth", "request_timeout"]
    assert len(out) == 64
    return dict(zip(names, S.INIT_OUT.unpack(out), strict=True))


def test_negotiate_asks_only_what_is_offered():
    flags, out = negotiate(Init(7, 45, 131072, OFFER), WANT, max_write=1 << 20, max_stack_depth=2)
    assert flags == (WANT | InitFlag.INIT_EXT) & OFFER
    assert InitFlag.OVER_IO_URING not in flags and InitFlag.SUBMOUNTS not in flags  # not offered here
    assert InitFlag.PASSTHROUGH in flags and InitFlag.INIT_EXT in flags
    o = unpack_init_out(out)
    assert (o["major"], o["minor"], o["max_readahead"], o["max_write"], o["time_gran"]) == (7, 45, 131072, 1 << 20, 1)
    assert o["flags"] | o["flags2"] << 32 == flags and o["flags2"] == 1 << 5
    assert o["max_pages"] == (1 << 20) // os.sysconf("SC_PAGE_SIZE") and o["max_stack_depth"] == 2
    assert (o["max_background"], o["congestion_threshold"], o["request_timeout"], o["map_alignment"]) == (0, 0, 0, 0)


def test_negotiate_with_an_old_kernel():
    old = Init(7, 31, 65536, InitFlag(0x3FFFFFB))  # 5.4: no INIT_EXT, no flags2
    flags, out = negotiate(old, WANT, max_write=1000, max_readahead=1 << 20)
    assert flags == WANT & InitFlag(0x3FFFFFB) and not flags >> 32 and InitFlag.INIT_EXT not in flags
    o = unpack_init_out(out)
    assert (o["flags2"], o["max_stack_depth"], o["max_write"], o["max_readahead"]) == (0, 0, 4096, 65536)


def test_negotiate_refusals():
    for bad in (Init(8, 0, 0, OFFER), Init(6, 45, 0, OFFER), Init(7, abi.MIN_KERNEL_MINOR_VERSION - 1, 0, OFFER)):
        with pytest.raises(UnsupportedKernel) as info:
            negotiate(bad, WANT, 1 << 17)
        assert info.value.errno == errno.EPROTO
    with pytest.raises(UnsupportedKernel, match="OVER_IO_URING"):
        negotiate(Init(7, 45, 0, OFFER), 0, 1 << 17, required=InitFlag.OVER_IO_URING)
    with pytest.raises(ValueError, match="exclude"):
        negotiate(Init(7, 45, 0, OFFER), InitFlag.WRITEBACK_CACHE | InitFlag.PASSTHROUGH, 1 << 17)
    with pytest.raises(ValueError, match="max_stack_depth"):
        negotiate(Init(7, 45, 0, OFFER), InitFlag.PASSTHROUGH, 1 << 17, max_stack_depth=3)
    # Not a refusal: a depth is irrelevant when passthrough is not wanted.
    assert negotiate(Init(7, 45, 0, OFFER), InitFlag.ASYNC_READ, 1 << 17, max_stack_depth=0)[0] == InitFlag.ASYNC_READ


def test_negotiate_request_timeout_only_when_agreed():
    o = unpack_init_out(negotiate(Init(7, 45, 0, OFFER), InitFlag.REQUEST_TIMEOUT, 1 << 17, request_timeout=30)[1])
    assert o["request_timeout"] == 30
    o = unpack_init_out(negotiate(Init(7, 45, 0, OFFER), 0, 1 << 17, request_timeout=30)[1])
    assert o["request_timeout"] == 0


def test_init_out_and_buffer_size():
    o = unpack_init_out(init_out(InitFlag.INIT_EXT | InitFlag.PASSTHROUGH, 4096, max_stack_depth=1))
    assert (o["flags"], o["flags2"], o["max_stack_depth"]) == (1 << 30, 1 << 5, 1)
    assert read_buffer_size(1 << 20) >= (1 << 20) + S.IN_HEADER.size + S.WRITE_IN.size
    assert read_buffer_size(4096) >= abi.XATTR_SIZE_MAX + S.IN_HEADER.size + S.SETXATTR_IN.size + 256


# -- directory listings -----------------------------------------------------------------


def unpack_dirents(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(buf):
        ino, off, namelen, typ = S.DIRENT.unpack_from(buf, pos)
        name_end = pos + 24 + namelen
        out.append((ino, off, typ, buf[pos + 24 : name_end]))
        rec = dirent_size(namelen)
        assert buf[name_end : pos + rec] == b"\0" * (pos + rec - name_end)
        pos += rec
    return out


def test_dirent_sizes():
    assert [dirent_size(n) for n in (1, 7, 8, 9, 16, 255)] == [32, 32, 32, 40, 40, 280]
    assert [dirent_size(n, plus=True) for n in (1, 8, 9)] == [160, 160, 168]
    assert dtype(0o040755) == 4 and dtype(0o100644) == 8 and dtype(0o120777) == 10


def test_pack_dirents_budget():
    entries = [(10 + i, i + 1, 8, b"n" * (i + 1)) for i in range(12)]  # names of 1..12 bytes
    sizes = [dirent_size(len(e[3])) for e in entries]
    buf, n = pack_dirents(entries, sum(sizes))
    assert n == 12 and len(buf) == sum(sizes) and len(buf) % 8 == 0
    assert unpack_dirents(buf) == entries
    buf, n = pack_dirents(entries, sum(sizes) - 1)  # the last padded record no longer fits
    assert n == 11 and len(buf) == sum(sizes[:11])
    buf, n = pack_dirents(entries, sizes[0] - 1)
    assert (buf, n) == (b"", 0)
    assert pack_dirents([], 4096) == (b"", 0)
    # 4096 bytes take 128 entries of 8-byte names (32 bytes each) and no more.
    many = [(i, i + 1, 8, b"%08d" % i) for i in range(200)]
    buf, n = pack_dirents(iter(many), 4096)
    assert (n, len(buf)) == (128, 4096)


def test_pack_direntplus():
    a, b = attr(ino=7, mode=0o040755), attr(ino=8)
    entries = [(a, 1, 1, b"subdir"), (b, 2, 2, b"file.txt")]
    buf, n = pack_direntplus(entries, 4096, entry_timeout=1, attr_timeout=2)
    assert n == 2 and len(buf) == dirent_size(6, True) + dirent_size(8, True) == 160 + 160
    first = S.DIRENTPLUS.unpack_from(buf, 0)
    assert first[:6] == (7, 1, 1, 2, 0, 0)  # nodeid, generation, entry/attr timeouts
    assert first[6] == 7 and first[6 + 9] == 0o040755  # attr.ino, attr.mode
    assert first[22:] == (7, 1, 6, 4)  # dirent: ino, off, namelen, DT_DIR
    assert buf[152:158] == b"subdir" and buf[158:160] == b"\0\0"
    second = S.DIRENTPLUS.unpack_from(buf, 160)
    assert second[22:] == (8, 2, 8, 8) and buf[312:320] == b"file.txt"
    assert pack_direntplus(entries, 319)[1] == 1


# -- notifications ------------------------------------------------------------------------


def test_notifications():
    m = notify_inval_inode(42, 0, -1)
    assert S.OUT_HEADER.unpack_from(m) == (40, NotifyCode.INVAL_INODE, 0)
    assert S.NOTIFY_INVAL_INODE_OUT.unpack_from(m, 16) == (42, 0, -1)
    m = notify_inval_entry(1, b"name", abi.EXPIRE_ONLY)
    assert S.OUT_HEADER.unpack_from(m) == (16 + 16 + 5, NotifyCode.INVAL_ENTRY, 0)
    assert S.NOTIFY_INVAL_ENTRY_OUT.unpack_from(m, 16) == (1, 4, abi.EXPIRE_ONLY) and m[32:] == b"name\0"
    m = notify_delete(1, 42, b"gone")
    assert S.OUT_HEADER.unpack_from(m) == (16 + 24 + 5, NotifyCode.DELETE, 0) and m.endswith(b"gone\0")
    parts = notify_store(42, 4096, b"data")
    assert S.OUT_HEADER.unpack(parts[0]) == (sum(map(len, parts)), NotifyCode.STORE, 0) and parts[2] == b"data"
    m = notify_retrieve(77, 42, 0, 4096)
    assert S.NOTIFY_RETRIEVE_OUT.unpack_from(m, 16) == (77, 42, 0, 4096) and len(m) == 48
    assert notify_poll(5) == S.OUT_HEADER.pack(24, NotifyCode.POLL, 0) + struct.pack("<Q", 5)
    assert notify_resend() == S.OUT_HEADER.pack(16, NotifyCode.RESEND, 0)
    assert notify_inc_epoch() == S.OUT_HEADER.pack(16, NotifyCode.INC_EPOCH, 0)
    m = notify_prune([5, 6])
    assert S.OUT_HEADER.unpack_from(m) == (16 + 16 + 16, NotifyCode.PRUNE, 0)
    assert S.NOTIFY_PRUNE_OUT.unpack_from(m, 16) == (2,) and struct.unpack_from("<QQ", m, 32) == (5, 6)
