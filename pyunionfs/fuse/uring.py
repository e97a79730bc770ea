"""FUSE over io_uring: requests served on the caller's CPU, from the standard library.

Why: on these machines the cost of a FUSE request is mostly waking the
daemon on another CPU and waking the caller back (15 to 70 µs per round trip
measured; 4.5 µs when daemon and caller share a CPU, ../docs/speed.md).  With
FUSE over io_uring (Linux 6.14+, module parameter ``fuse.enable_uring``) the
kernel keeps one queue per CPU and hands a request to the queue of the CPU
its caller runs on; a worker pinned to that CPU takes it, so the hand-over
and the reply are wake-ups on one CPU.  fuse-overlayfs (libfuse 3.14) cannot
use it.

The kernel's side is fs/fuse/dev_uring.c.  Each *ring entry* is a pair of
buffers registered with ``IORING_OP_URING_CMD`` (``FUSE_IO_URING_CMD_REGISTER``):
a header (``struct fuse_uring_req_header``: the in/out header, the
operation's fixed argument struct, and ``fuse_uring_ent_in_out`` with the
payload size and the commit id) and a payload of at least the connection's
largest request.  When a request arrives the entry's command completes; the
answer goes back in the same buffers with ``FUSE_IO_URING_CMD_COMMIT_AND_FETCH``,
which also makes the entry wait for the next request: one io_uring_enter(2)
per request instead of a read(2) and a writev(2).

Choices, each for a reason:

- Every worker has its own ring and **one** entry, pinned to its CPU; the
  kernel uses a ring only once every possible CPU's queue has a free entry.
  It gives a request to a free entry of the caller's CPU's queue (the one
  freed last first) and wakes the thread that registered it; a worker that
  commits an answer is handed the next queued request at once, without a
  sleep in between.
- :data:`WORKERS_PER_CPU` is two, always registered, and not one: a request
  that arrives while a CPU's only entry is busy is queued, and a queued
  request goes only to an entry that commits an answer, never to one
  registered later.  So with one worker per CPU, a worker whose request
  waits on the kernel for another request of its own queue waits for ever:
  an invalidation (``drop_caches``) waits for a lookup in the same
  directory, which waits behind it (seen: a hung mount and a daemon that
  kill -9 could not end).  With two, that lookup finds the other entry free;
  and a copy-up of a big file or an fsync holds one worker, not the CPU's
  callers.  The price, measured: ``git status`` (four threads of lstat on two
  CPUs) 0.34 s against 0.29 s with one, as busy workers hand Python's GIL to
  each other at every syscall.
- The price of pinning: callers busy on several CPUs at once keep workers on
  several CPUs busy, which then hand the GIL across CPUs (``git status`` is
  slower over the ring than over /dev/fuse, whose one reader serves all in a
  row).  One unpinned worker for every queue (a :class:`Ring` can hold
  entries of several) was measured too and lost what the ring is for, its
  wake-ups crossing CPUs again.
- ``IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN``: the ring is
  only ever used by its worker, and the kernel's work for it (copying the
  request in) runs when the worker waits, on its own CPU.
- ``/dev/fuse`` keeps its readers: INIT, FORGET and INTERRUPT, notifications
  and whatever was queued before the ring was ready still travel there.

System calls are made through :mod:`ctypes` (``syscall(2)`` of libc): no
compiled part of ours.  The rings are shared memory mapped with :mod:`mmap`;
on x86-64 and arm64 stores from one thread reach the kernel in order after
the system call that submits them, which is all the protocol needs here (the
kernel's head and tail are only read and written around io_uring_enter(2)).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import RingError
from .abi import IO_URING_CMD_COMMIT_AND_FETCH, IO_URING_CMD_REGISTER

if TYPE_CHECKING:
    from .engine import Reply

#: The memory a ring entry's buffers live in (tests use bytearrays).
Memory = bytearray | memoryview | mmap.mmap

log = logging.getLogger(__name__)

#: Workers (each with one ring entry) per CPU queue: see the module's docstring.
WORKERS_PER_CPU = 2

_SYSCALLS = {"x86_64": (425, 426), "aarch64": (425, 426)}

IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OFF_SQES = 0x10000000
IORING_OP_URING_CMD = 46

#: struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out (32).
_IN_OUT = 0
_OP_IN = 128
_ENT = 256
HEADER_SIZE = 288
_OP_IN_SIZE = 128
_ENT_IN_OUT = struct.Struct("<QQII")  # flags, commit_id, payload_sz, padding
_IN_HEADER_SIZE = 40
_OUT_HEADER_SIZE = 16
_U32 = struct.Struct("<I")
_OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
_CQE = struct.Struct("<Qi")
#: io_uring_params: 10 u32, io_sqring_offsets (7 u32, resv1 u32, user_addr u64),
#: io_cqring_offsets (8 u32 with resv1, user_addr u64).
_PARAMS = struct.Struct("<10I 8IQ 8IQ")
#: The part of a 128-byte SQE a URING_CMD uses: opcode, flags, ioprio, fd,
#: cmd_op, pad, addr, len, uring_cmd_flags, user_data, buf_index,
#: personality, file_index; then the command (struct fuse_uring_cmd_req).
_SQE = struct.Struct("<BBHiIIQIIQHHi QQH6x")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_long = ctypes.c_long


def possible_cpus() -> list[int]:
    """The CPUs the kernel counts queues for (``num_possible_cpus``)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise RingError(code, f"{what}: {os.strerror(code)}")
    return ret


def _address(buf: mmap.mmap) -> int:
    """The address of a mapping (kept exported: the mapping must outlive the ring)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Slot:
    """One FUSE ring entry: its CPU queue and its two buffers.  The kernel
    refuses a payload smaller than ``max(8192, max_write, max_pages * 4096)``:
    the /dev/fuse read buffer's size (transport.request_buffer_size) is that."""

    def __init__(self, qid: int, payload_size: int) -> None:
        self.qid = qid
        self.header = mmap.mmap(-1, HEADER_SIZE)
        self.payload = mmap.mmap(-1, payload_size)
        iov = struct.pack("<QQQQ", _address(self.header), HEADER_SIZE, _address(self.payload), payload_size)
        self.iov = ctypes.create_string_buffer(iov, len(iov))
        self.view = memoryview(self.payload)
        #: Requests answered through this entry (``ring_requests_cpuN`` in the mount's stats).
        self.served = 0


class Ring:
    """One worker's io_uring, with one FUSE ring entry (:class:`Slot`) of CPU queue *qid*."""

    def __init__(self, devfd: int, qid: int, payload_size: int) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise RingError(errno.ENOSYS, f"io_uring numbers unknown on {platform.machine()}")
        self.devfd = devfd
        self.slot = Slot(qid, payload_size)
        params = bytearray(_PARAMS.size)
        _U32.pack_into(params, 8, IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN)
        pbuf = (ctypes.c_char * len(params)).from_buffer(params)
        self.fd = _check(_syscall(_long(numbers[0]), _long(1), pbuf), "io_uring_setup")
        self._enter_args = (_long(numbers[1]), _long(self.fd), _long(1), _long(IORING_ENTER_GETEVENTS), _long(0))
        try:
            self._map(_PARAMS.unpack_from(params))
        except BaseException:
            os.close(self.fd)
            raise

    def _map(self, p: tuple[int, ...]) -> None:
        sq_entries, cq_entries, _, _, _, features = p[:6]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
        if not features & IORING_FEAT_SINGLE_MMAP:
            raise RingError(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP")
        size = max(sq_array + sq_entries * 4, cqes + cq_entries * 16)
        self.ring = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=0)
        self.sqes = mmap.mmap(self.fd, sq_entries * 128, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                              offset=IORING_OFF_SQES)  # fmt: skip
        self._sq_head, self._sq_tail, self._sq_array = sq_head, sq_tail, sq_array
        self._sq_mask = _U32.unpack_from(self.ring, sq_mask)[0]
        self._cq_head, self._cq_tail, self._cqes = cq_head, cq_tail, cqes
        self._cq_mask = _U32.unpack_from(self.ring, cq_mask)[0]

    def close(self) -> None:
        os.close(self.fd)

    # -- submission and completion ---------------------------------------------------

    def _submit(self, cmd_op: int, commit_id: int) -> None:
        """Queue one command of the slot (there is room: it has one command in flight)."""
        ring, slot = self.ring, self.slot
        tail = _U32.unpack_from(ring, self._sq_tail)[0]
        at = tail & self._sq_mask
        _SQE.pack_into(self.sqes, at * 128, IORING_OP_URING_CMD, 0, 0, self.devfd, cmd_op, 0,
                       ctypes.addressof(slot.iov), 2, 0, 0, 0, 0, 0, 0, commit_id, slot.qid)  # fmt: skip
        _U32.pack_into(ring, self._sq_array + at * 4, at)
        _U32.pack_into(ring, self._sq_tail, (tail + 1) & 0xFFFFFFFF)

    def _wait(self) -> int:
        """Submit what is queued and wait for one completion; its result."""
        ring = self.ring
        enter, fd, one, flags, zero = self._enter_args
        while True:
            head = _U32.unpack_from(ring, self._cq_head)[0]
            if head != _U32.unpack_from(ring, self._cq_tail)[0]:
                _, res = _CQE.unpack_from(ring, self._cqes + (head & self._cq_mask) * 16)
                _U32.pack_into(ring, self._cq_head, (head + 1) & 0xFFFFFFFF)
                return res
            pending = (_U32.unpack_from(ring, self._sq_tail)[0] - _U32.unpack_from(ring, self._sq_head)[0]) & 0xFFFFFFFF
            if _syscall(enter, fd, _long(pending), one, flags, None, zero) < 0:
                code = ctypes.get_errno()
                if code != errno.EINTR:
                    raise RingError(code, f"io_uring_enter: {os.strerror(code)}")

    # -- the FUSE protocol -------------------------------------------------------------

    def serve(self, handle: Callable[[memoryview, memoryview], Reply], buf: bytearray | mmap.mmap) -> None:
        """Register the slot, then answer requests until the connection ends.

        *handle* gets each request as /dev/fuse would have given it (in
        *buf*: see :func:`gather`) and the slot's payload, and returns the
        reply (out header first; data it put in the payload itself is
        declared by the header, see :func:`scatter`).
        A registration completes with the slot's first request.  Returns when
        the kernel has ended the slot (unmount, abort); raises RingError when
        it refuses a registration or a commit.
        """
        view = memoryview(buf)
        slot = self.slot
        self._submit(IO_URING_CMD_REGISTER, 0)
        while True:
            res = self._wait()
            if res < 0:
                if res in (-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ECANCELED):
                    return
                raise RingError(-res, f"FUSE over io_uring refused queue {slot.qid}: {os.strerror(-res)}")
            length, commit_id = gather(slot.header, slot.payload, buf)
            scatter(handle(view[:length], slot.view), slot.header, slot.payload, commit_id)
            slot.served += 1
            self._submit(IO_URING_CMD_COMMIT_AND_FETCH, commit_id)


def gather(header: Memory, payload: Memory, buf: bytearray | mmap.mmap) -> tuple[int, int]:
    """Put the request an entry holds into *buf* as one /dev/fuse message; (its length, commit id).

    The kernel splits a request in three: ``fuse_in_header`` (whose ``len``
    counts every part), the first argument (the operation's struct, or
    nothing) in ``op_in``, and the rest in the payload.  Raises RingError
    if the sizes do not add up.
    """
    _, commit_id, size, _ = _ENT_IN_OUT.unpack_from(header, _ENT)
    length = _U32.unpack_from(header, 0)[0]
    op_size = length - _IN_HEADER_SIZE - size
    if not 0 <= op_size <= _OP_IN_SIZE or size > len(payload) or length > len(buf):
        raise RingError(errno.EPROTO, f"a request of {length} bytes with a payload of {size}")
    buf[:_IN_HEADER_SIZE] = header[:_IN_HEADER_SIZE]
    end = _IN_HEADER_SIZE + op_size
    buf[_IN_HEADER_SIZE:end] = header[_OP_IN : _OP_IN + op_size]
    buf[end:length] = payload[:size]
    return length, commit_id


def scatter(out: Reply, header: Memory, payload: Memory, commit_id: int) -> None:
    """Put a reply (out header first, as written to /dev/fuse) into an entry's buffers.

    The out header goes to ``in_out``, the rest to the payload with its size
    in ``fuse_uring_ent_in_out``.  A header alone that declares more (READ,
    :meth:`~.engine.Engine.read_into`) has its data in the payload already.
    A reply that does not fit (a bug) becomes EIO.
    """
    if out is None:  # only FORGET and INTERRUPT take none, and those come over /dev/fuse
        out = _OUT_HEADER.pack(_OUT_HEADER_SIZE, -errno.EIO, commit_id)
    elif not isinstance(out, bytes):
        out = b"".join(out)
    # A header that declares more than the reply carries: the rest is in the payload already.
    n = max(len(out), _U32.unpack_from(out)[0]) - _OUT_HEADER_SIZE
    if n > len(payload):
        log.error("a reply of %d bytes does not fit the ring's payload; answering EIO", n)
        out, n = _OUT_HEADER.pack(_OUT_HEADER_SIZE, -errno.EIO, commit_id), 0
    header[:_OUT_HEADER_SIZE] = out[:_OUT_HEADER_SIZE]
    if len(out) > _OUT_HEADER_SIZE:
        payload[: len(out) - _OUT_HEADER_SIZE] = out[_OUT_HEADER_SIZE:]
    _ENT_IN_OUT.pack_into(header, _ENT, 0, commit_id, max(n, 0), 0)
