"""The native engine without a mount: request bytes in, reply bytes out, over a real core.

A :class:`~pyunionfs.fuse.engine.Engine` is given messages built as the kernel
builds them (tests/unit/test_fuse_protocol.py's ``msg``) and its replies are
decoded with the protocol's own structs, so every opcode's mapping from
request to core call to reply is checked without FUSE: errnos, sizes, the
negotiation, listings cut at the kernel's buffer size and the lookup counts
they take.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.fs.syscalls import birth_time_ns
from pyunionfs.fs.writes import WritableUnionFS
from pyunionfs.fuse import structs as S
from pyunionfs.fuse.abi import FopenFlag, InitFlag, Opcode
from pyunionfs.fuse.backing import Backings
from pyunionfs.fuse.engine import Engine
from pyunionfs.fuse.protocol import parse_request
from tests.unit.conftest import b, mkfile
from tests.unit.test_fuse_protocol import msg

OFFER = int(InitFlag.ASYNC_READ | InitFlag.DO_READDIRPLUS | InitFlag.POSIX_ACL | InitFlag.DONT_MASK
            | InitFlag.INIT_EXT | InitFlag.MAX_PAGES | InitFlag.PASSTHROUGH | InitFlag.WRITEBACK_CACHE)


class Harness:
    """An engine over a one-lower, one-upper core; ``ask`` returns (errno, payload)."""

    def __init__(self, tmp: Path) -> None:
        self.lower, self.upper, self.work = tmp / "lower", tmp / "upper", tmp / "work"
        mkfile(self.lower / "f", b"lower data")
        mkfile(self.lower / "d/x", b"x")
        for i in range(40):
            mkfile(self.lower / "many" / f"name-{i:03}", b"")
        self.upper.mkdir()
        cfg = MountConfig(lowers=(b(self.lower),), upper=b(self.upper), mountpoint=b(tmp / "mnt"),
                          workdir=b(self.work))
        self.fs = WritableUnionFS(cfg)
        self.notes: list[bytes] = []
        self.engine = Engine(self.fs, cfg, self._note, Backings(-1, enabled=False))

    def _note(self, message: bytes) -> bool:
        self.notes.append(message)
        return True

    def ask(self, opcode: int, body: bytes = b"", nodeid: int = 1, unique: int = 9) -> tuple[int, bytes]:
        out = self.engine.handle(parse_request(msg(opcode, body, unique=unique, nodeid=nodeid), setxattr_ext=True))
        assert out is not None, "no reply"
        data = b"".join(bytes(p) for p in out) if isinstance(out, list) else out
        length, err, uniq = S.OUT_HEADER.unpack_from(data)
        assert length == len(data) and uniq == unique
        return -err, data[S.OUT_HEADER.size :]

    def lookup(self, name: bytes, parent: int = 1) -> int:
        err, out = self.ask(Opcode.LOOKUP, name + b"\0", parent)
        assert err == 0
        return S.ENTRY_OUT.unpack_from(out)[0]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.fs.close()


def init_body(flags: int, minor: int = 45) -> bytes:
    return S.INIT_IN.pack(7, minor, 1 << 20, flags & 0xFFFFFFFF, flags >> 32)


def test_init_takes_only_what_is_offered_and_never_writeback(h: Harness) -> None:
    err, out = h.ask(Opcode.INIT, init_body(OFFER))
    assert err == 0
    major, minor, _, flags = struct.unpack_from("<IIII", out)
    assert (major, minor) == (7, 45)
    agreed = InitFlag(flags | S.INIT_OUT.unpack(out)[10] << 32)
    assert agreed == h.engine.agreed
    assert InitFlag.DONT_MASK in agreed and InitFlag.POSIX_ACL in agreed
    assert InitFlag.WRITEBACK_CACHE not in agreed  # offered, not wanted
    assert InitFlag.PASSTHROUGH not in agreed  # this engine's backings are off
    assert int(agreed) & ~OFFER == 0


def test_init_refuses_an_old_kernel(h: Harness) -> None:
    assert h.ask(Opcode.INIT, init_body(OFFER, minor=20))[0] == errno.EPROTO


def test_unknown_and_unanswered_opcodes(h: Harness) -> None:
    assert h.ask(4000)[0] == errno.ENOSYS
    for op in (Opcode.FLUSH, Opcode.GETLK, Opcode.IOCTL, Opcode.BMAP, Opcode.POLL):
        assert h.ask(op, bytes(64))[0] == errno.ENOSYS
    assert h.engine.handle(parse_request(msg(Opcode.INTERRUPT, struct.pack("<Q", 5)))) is None


def test_lookup_getattr_and_a_negative_entry(h: Harness) -> None:
    ino = h.lookup(b"f")
    err, out = h.ask(Opcode.GETATTR, S.GETATTR_IN.pack(0, 0), ino)
    assert err == 0
    fields = S.ATTR_OUT.unpack(out)
    assert fields[2] == ino and fields[3] == len(b"lower data")
    err, out = h.ask(Opcode.LOOKUP, b"missing\0")
    assert err == 0 and S.ENTRY_OUT.unpack_from(out)[0] == 0  # nodeid 0: cached "no such name"
    assert h.ask(Opcode.GETATTR, S.GETATTR_IN.pack(0, 0), 999_999)[0] == errno.ESTALE


def test_open_read_write_copy_up_and_release(h: Harness) -> None:
    ino = h.lookup(b"f")
    err, out = h.ask(Opcode.OPEN, S.OPEN_IN.pack(os.O_RDWR, 0), ino)
    assert err == 0
    fh, flags, backing = S.OPEN_OUT.unpack(out)
    assert flags == FopenFlag.KEEP_CACHE and backing == 0
    body = S.WRITE_IN.pack(fh, 0, 3, 0, 0, 0) + b"NEW"
    err, out = h.ask(Opcode.WRITE, body, ino)
    assert err == 0 and S.WRITE_OUT.unpack(out)[0] == 3
    err, out = h.ask(Opcode.READ, S.READ_IN.pack(fh, 0, 100, 0, 0, 0), ino)
    assert (err, out) == (0, b"NEWer data")
    assert h.ask(Opcode.RELEASE, S.RELEASE_IN.pack(fh, 0, 0, 0), ino) == (0, b"")
    assert (h.upper / "f").read_bytes() == b"NEWer data"
    assert (h.lower / "f").read_bytes() == b"lower data"


def test_read_into_puts_the_data_in_the_buffer_and_declares_it_in_the_header(h: Harness) -> None:
    """The io_uring path's READ: data straight into the entry's payload, the header alone returned."""
    ino = h.lookup(b"f")
    fh = S.OPEN_OUT.unpack(h.ask(Opcode.OPEN, S.OPEN_IN.pack(os.O_RDONLY, 0), ino)[1])[0]
    buf = memoryview(bytearray(64))
    reads = h.engine.counts.get(Opcode.READ, 0)
    req = parse_request(msg(Opcode.READ, S.READ_IN.pack(fh, 6, 100, 0, 0, 0), unique=21, nodeid=ino))
    assert h.engine.read_into(req, buf) == S.OUT_HEADER.pack(16 + 4, 0, 21)
    assert bytes(buf[:4]) == b"data"
    req = parse_request(msg(Opcode.READ, S.READ_IN.pack(fh + 1000, 0, 10, 0, 0, 0), unique=22, nodeid=ino))
    assert h.engine.read_into(req, buf) == S.OUT_HEADER.pack(16, -errno.EBADF, 22)
    assert h.engine.counts[Opcode.READ] == reads + 2  # counted as READs are over /dev/fuse


def test_getxattr_sizes_and_erange(h: Harness) -> None:
    ino = h.lookup(b"f")
    setx = S.SETXATTR_IN.pack(5, 0, 0) + b"user.k\0" + b"value"
    assert h.ask(Opcode.SETXATTR, setx, ino)[0] == 0
    err, out = h.ask(Opcode.GETXATTR, S.GETXATTR_IN.pack(0) + b"user.k\0", ino)
    assert err == 0 and S.GETXATTR_OUT.unpack(out)[0] == 5
    assert h.ask(Opcode.GETXATTR, S.GETXATTR_IN.pack(3) + b"user.k\0", ino)[0] == errno.ERANGE
    assert h.ask(Opcode.GETXATTR, S.GETXATTR_IN.pack(64) + b"user.k\0", ino) == (0, b"value")
    create = S.SETXATTR_IN.pack(1, os.XATTR_CREATE, 0) + b"user.k\0" + b"v"
    assert h.ask(Opcode.SETXATTR, create, ino)[0] == errno.EEXIST
    replace = S.SETXATTR_IN.pack(1, os.XATTR_REPLACE, 0) + b"user.none\0" + b"v"
    assert h.ask(Opcode.SETXATTR, replace, ino)[0] == errno.ENODATA


def test_readdirplus_fills_the_buffer_and_resumes_where_it_stopped(h: Harness) -> None:
    ino = h.lookup(b"many")
    err, out = h.ask(Opcode.OPENDIR, S.OPEN_IN.pack(os.O_RDONLY, 0), ino)
    fh = S.OPEN_OUT.unpack(out)[0]
    names: list[bytes] = []
    offset = 0
    while True:
        err, out = h.ask(Opcode.READDIRPLUS, S.READ_IN.pack(fh, offset, 700, 0, 0, 0), ino)
        assert err == 0 and len(out) <= 700
        if not out:
            break
        pos = 0
        while pos < len(out):
            rec = S.DIRENTPLUS.unpack_from(out, pos)
            namelen, offset = rec[-2], rec[-3]
            start = pos + S.DIRENTPLUS.size
            names.append(out[start : start + namelen])
            pos += (S.DIRENTPLUS.size + namelen + 7) & ~7
    assert names[:2] == [b".", b".."]
    assert sorted(names[2:]) == [f"name-{i:03}".encode() for i in range(40)]
    # each entry but . and .. counts one lookup, as a LOOKUP would
    child = h.lookup(b"name-000", ino)
    assert h.fs.inodes.get(child) is not None
    assert h.ask(Opcode.RELEASEDIR, S.RELEASE_IN.pack(fh, 0, 0, 0), ino) == (0, b"")


def test_an_exception_that_is_not_an_oserror_is_eio_not_a_crash(h: Harness, monkeypatch) -> None:
    def boom(*a: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.fs, "statfs", boom)
    assert h.ask(Opcode.STATFS)[0] == errno.EIO
    assert h.ask(Opcode.GETATTR, S.GETATTR_IN.pack(0, 0))[0] == 0  # and it goes on serving


def test_statx_carries_the_basic_fields_and_the_objects_birth_time(h: Harness) -> None:
    ino = h.lookup(b"f")
    err, out = h.ask(Opcode.STATX, S.STATX_IN.pack(0, 0, 0, 0xFFF), ino)
    assert err == 0
    fields = S.STATX_OUT.unpack(out)
    mask, nlink, mode, st_ino, size = fields[3], fields[6], fields[9], fields[10], fields[11]
    assert mask & 0x7FF == 0x7FF
    assert (nlink, st_ino, size) == (1, ino, len(b"lower data")) and mode & 0o170000 == 0o100000
    btime = birth_time_ns(os.fsencode(h.lower / "f"), False)
    if btime is not None:
        assert mask & 0x800 and fields[16] * 1_000_000_000 + fields[17] == btime


def test_a_second_node_id_names_the_object_until_the_kernel_forgets_both(h: Harness) -> None:
    """What happens after an inode pinned to a lower file is let go (fuse/nodeids.py):
    lookups answer a new node id with the object's own inode number, requests on
    either id reach the object, and forgetting both drops the object."""
    ino = h.lookup(b"f")
    h.engine.ids.renew(ino, ino)
    err, out = h.ask(Opcode.LOOKUP, b"f\0")
    entry = S.ENTRY_OUT.unpack_from(out)
    new = entry[0]
    assert err == 0 and new != ino and entry[6] == ino  # node id, then fuse_attr's ino
    for nodeid in (ino, new):
        err, out = h.ask(Opcode.GETATTR, S.GETATTR_IN.pack(0, 0), nodeid)
        assert err == 0 and S.ATTR_OUT.unpack(out)[2] == ino
    # A link made through the new id names the object by the new id too; a listing leaves both
    # names bare (node id 0, the inode number only): the kernel holds the object already.
    err, out = h.ask(Opcode.LINK, S.LINK_IN.pack(new) + b"g\0")
    assert err == 0 and S.ENTRY_OUT.unpack_from(out)[:1] == (new,) and S.ENTRY_OUT.unpack_from(out)[6] == ino
    err, out = h.ask(Opcode.OPENDIR, S.OPEN_IN.pack(os.O_RDONLY, 0))
    fh = S.OPEN_OUT.unpack(out)[0]
    err, out = h.ask(Opcode.READDIRPLUS, S.READ_IN.pack(fh, 0, 4096, 0, 0, 0))
    pos, seen = 0, {}
    while pos < len(out):
        rec = S.DIRENTPLUS.unpack_from(out, pos)
        name = out[pos + S.DIRENTPLUS.size : pos + S.DIRENTPLUS.size + rec[-2]]
        seen[name] = rec[0], rec[-4]
        pos += (S.DIRENTPLUS.size + rec[-2] + 7) & ~7
    assert seen[b"f"] == seen[b"g"] == (0, ino)
    assert seen[b"d"][0] not in (0, ino, new)  # (not held: a whole entry)
    h.ask(Opcode.RELEASEDIR, S.RELEASE_IN.pack(fh, 0, 0, 0))
    # The kernel forgets the new id's lookups (LOOKUP, LINK), then the first id's.
    h.engine.handle(parse_request(msg(Opcode.FORGET, S.FORGET_IN.pack(2), nodeid=new)))
    assert h.engine.ids.kernel(ino) == new and h.fs.inodes.get(ino) is not None
    h.engine.handle(parse_request(msg(Opcode.BATCH_FORGET, S.BATCH_FORGET_IN.pack(1) + S.FORGET_ONE.pack(ino, 1))))
    assert h.fs.inodes.get(ino) is None
    assert h.engine.ids.kernel(ino) == ino and not h.engine.ids.core
