"""FUSE over io_uring (pyunionfs/fuse/uring.py) without a mount: how a ring entry's
buffers become a /dev/fuse message and a reply goes back, and a refused registration."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from pyunionfs.errors import RingError
from pyunionfs.fuse import uring
from pyunionfs.fuse.abi import Opcode
from pyunionfs.fuse.transport import request_buffer, request_buffer_size

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
ENT = struct.Struct("<QQII")


def entry_buffers(opcode: int, op_in: bytes, payload: bytes, commit_id: int = 77) -> tuple[bytearray, bytearray]:
    """A ring entry's header and payload as the kernel fills them for one request."""
    header = bytearray(uring.HEADER_SIZE)
    length = IN_HEADER.size + len(op_in) + len(payload)
    IN_HEADER.pack_into(header, 0, length, opcode, commit_id, 5, 1000, 1000, 42, 0, 0)
    header[128 : 128 + len(op_in)] = op_in
    ENT.pack_into(header, 256, 0, commit_id, len(payload), 0)
    body = bytearray(8192)
    body[: len(payload)] = payload
    return header, body


def test_possible_cpus_and_the_payload_the_kernel_accepts() -> None:
    cpus = uring.possible_cpus()
    assert cpus and cpus[0] == 0 and cpus == sorted(set(cpus))
    # the ring's payload is the /dev/fuse read buffer: at least max(8192, max_write, its pages)
    for max_write in (4096, 1 << 20, (1 << 20) + 1):
        assert request_buffer_size(max_write) >= max(8192, -(-max_write // 4096) * 4096)


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def test_a_read_buffer_takes_memory_only_as_requests_fill_it() -> None:
    """Each worker's /dev/fuse buffer holds the largest request (a 1 MiB WRITE); zeroed as a
    bytearray it cost every daemon a resident mebibyte per worker from the start."""
    before = _anon_kib()
    bufs = [request_buffer(1 << 20) for _ in range(8)]
    r, w = os.pipe()
    try:
        os.write(w, b"a request of a few bytes")
        assert os.readv(r, (bufs[0],)) == 24 and bufs[0][:9] == b"a request"
    finally:
        os.close(r)
        os.close(w)
    assert all(len(b) == request_buffer_size(1 << 20) for b in bufs)
    assert _anon_kib() - before < 2048, "eight 1 MiB buffers made resident"


def test_gather_makes_the_message_dev_fuse_would_give() -> None:
    op_in = struct.pack("<IIQ", 0, 0, 9)  # fuse_getattr_in
    header, payload = entry_buffers(Opcode.GETATTR, op_in, b"")
    buf = bytearray(8192)
    length, commit_id = uring.gather(header, payload, buf)
    assert (length, commit_id) == (40 + 16, 77)
    assert bytes(buf[:40]) == bytes(header[:40]) and bytes(buf[40:56]) == op_in

    # LOOKUP has no struct: its first argument is empty and the name is the payload
    header, payload = entry_buffers(Opcode.LOOKUP, b"", b"name\0", commit_id=5)
    length, commit_id = uring.gather(header, payload, buf)
    assert (length, commit_id) == (45, 5)
    assert bytes(buf[40:45]) == b"name\0"

    # WRITE: fuse_write_in in op_in, the data in the payload
    data = os.urandom(5000)
    header, payload = entry_buffers(Opcode.WRITE, b"w" * 40, data)
    length, _ = uring.gather(header, payload, buf)
    assert bytes(buf[40:80]) == b"w" * 40 and bytes(buf[80:length]) == data


@pytest.mark.parametrize(
    "declared, payload_size, buf_size",
    [
        (40 + 3, 5, 4096),  # the payload is larger than the message
        (40 + 129, 0, 4096),  # an argument struct beyond op_in's 128 bytes
        (40 + 16, 0, 50),  # a message larger than the buffer
        (40 + 9000, 8999, 65536),  # a payload larger than the payload buffer
    ],
)
def test_gather_refuses_sizes_that_do_not_add_up(declared: int, payload_size: int, buf_size: int) -> None:
    header, payload = entry_buffers(Opcode.GETATTR, b"", b"")
    struct.pack_into("<I", header, 0, declared)
    ENT.pack_into(header, 256, 0, 1, payload_size, 0)
    with pytest.raises(RingError) as err:
        uring.gather(header, payload, bytearray(buf_size))
    assert err.value.errno == errno.EPROTO


def test_scatter_puts_header_and_arguments_where_the_kernel_reads_them(caplog: pytest.LogCaptureFixture) -> None:
    header, payload = bytearray(uring.HEADER_SIZE), bytearray(64)
    out_header = struct.pack("<IiQ", 16 + 10, 0, 9)
    uring.scatter([out_header, b"0123456789"], header, payload, 9)
    assert bytes(header[:16]) == out_header and bytes(payload[:10]) == b"0123456789"
    assert ENT.unpack_from(header, 256) == (0, 9, 10, 0)

    error = struct.pack("<IiQ", 16, -errno.ENOENT, 10)
    uring.scatter(error, header, payload, 10)
    assert bytes(header[:16]) == error and ENT.unpack_from(header, 256) == (0, 10, 0, 0)

    # no reply at all, or one larger than the payload, is a bug: EIO, not a stuck entry
    uring.scatter(None, header, payload, 11)
    assert struct.unpack_from("<IiQ", header) == (16, -errno.EIO, 11)
    uring.scatter(struct.pack("<IiQ", 16 + 100, 0, 12) + b"x" * 100, header, payload, 12)
    assert struct.unpack_from("<IiQ", header) == (16, -errno.EIO, 12)
    assert ENT.unpack_from(header, 256) == (0, 12, 0, 0)
    assert "does not fit" in caplog.text

    # READ over the ring: the data is in the payload already, the header declares it
    payload[:5] = b"ready"
    uring.scatter(struct.pack("<IiQ", 16 + 5, 0, 13), header, payload, 13)
    assert struct.unpack_from("<IiQ", header) == (21, 0, 13) and ENT.unpack_from(header, 256) == (0, 13, 5, 0)
    assert bytes(payload[:5]) == b"ready"


def test_a_registration_on_a_file_that_is_not_fuse_is_refused(tmp_path) -> None:
    with open(tmp_path / "f", "w+b") as f:
        try:
            ring = uring.Ring(f.fileno(), 0, request_buffer_size(4096))
        except RingError as exc:  # no io_uring here (disabled, or seccomp)
            pytest.skip(f"io_uring unavailable: {exc}")
        try:
            with pytest.raises(RingError) as err:
                ring.serve(lambda message, payload: None, bytearray(8192))
            assert "refused queue 0" in str(err.value)
            assert ring.slot.served == 0
        finally:
            ring.close()
