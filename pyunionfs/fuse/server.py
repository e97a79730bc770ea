"""The native engine's daemon life: mount, workers on /dev/fuse, signals, end.

No event loop stands between the kernel and a request: each worker thread
blocks in read(2) on its own fd of the connection (clones made with
``FUSE_DEV_IOC_CLONE``, so replies do not contend on one fd's table), parses
the request, calls the :class:`~.engine.Engine` and writes the reply, in
one loop of plain calls.  One worker serves while requests are quick; more
are woken when one is stuck (staffing.py), so that a long copy-up or fsync
does not stall the other requests.  The core's lock keeps its state
consistent.  Where INIT agreed FUSE over io_uring, the kernel hands requests
to per-CPU ring workers instead (uring.py: two per CPU, pinned); the
/dev/fuse readers keep what the kernel still sends there (FORGET, INTERRUPT).

The main thread only waits: for SIGTERM, SIGINT or SIGHUP (unmount, lazily
as libfuse does, and end) or for the workers to see the connection end (an
unmount by any command, an abort through fusectl, DESTROY).  The signals
are blocked in every thread and taken with sigwait, so no handler runs in
the middle of a request.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
from collections.abc import Callable

from ..config import MountConfig
from ..errors import MountError, ProtocolError, RingError
from ..fs.syscalls import has_cap_sys_admin, in_initial_user_namespace
from ..fs.writes import WritableUnionFS
from . import protocol as P
from . import uring
from .abi import NO_REPLY, InitFlag, Opcode
from .backing import Backings
from .engine import MAX_WRITE, Engine, Reply, name_of
from .mountinfo import set_readahead
from .staffing import Staffing
from .transport import (
    READ_ABORTED,
    READ_AGAIN,
    MountOptions,
    Session,
    open_session,
    read_request,
    request_buffer,
    request_buffer_size,
    write_reply,
)

log = logging.getLogger(__name__)

#: Worker threads (the first on the mount's fd, the others on clones); all
#: but the first serve only while a request is stuck (see staffing.py).
WORKERS = 4

#: Signals that end the daemon; SIGUSR2 is how workers tell the main thread
#: that the connection ended.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_WORKER_DONE = signal.SIGUSR2


class Server:
    """One mounted connection served by :data:`WORKERS` threads."""

    def __init__(self, fs: WritableUnionFS, cfg: MountConfig, session: Session) -> None:
        self.fs = fs
        self.cfg = cfg
        self.session = session
        may = cfg.passthrough and (cfg.lower_passthrough or not cfg.readonly)
        self.backings = Backings(session.fd, may and _may_passthrough())
        self.engine = Engine(fs, cfg, self._notify, self.backings)
        self._setxattr_ext = False
        self._threads: list[threading.Thread] = []
        self._rings: list[uring.Ring] = []
        self._main = threading.get_ident()
        self._done = threading.Event()
        self._closing = False
        self.staffing = Staffing(1)

    def _notify(self, message: bytes) -> bool:
        """Write a notification; False if the kernel had nothing to act on."""
        try:
            return write_reply(self.session.fd, (message,))
        except OSError as exc:
            log.debug("notification refused: %s", exc)
            return False

    # -- requests -------------------------------------------------------------

    def handshake(self) -> None:
        """Answer INIT (the first request); raise MountError if the kernel cannot be served."""
        buf = request_buffer(MAX_WRITE)
        while True:
            n = read_request(self.session.fd, buf)
            if n <= 0:
                raise MountError("the kernel ended the FUSE connection before INIT")
            req = P.parse_request(memoryview(buf)[:n])
            out = self.engine.handle(req)
            if out is not None:
                write_reply(self.session.fd, out if isinstance(out, list) else (out,))
            if req.opcode == Opcode.INIT:
                if not self.engine.agreed:
                    raise MountError("the kernel's FUSE protocol is too old (7.31 or newer is needed)")
                self._setxattr_ext = bool(self.engine.agreed & InitFlag.SETXATTR_EXT)
                return

    def _work(self, worker: int, fd: int) -> None:
        """One worker: read, answer, until the connection ends (see staffing.py
        for when a worker other than the first parks instead of reading)."""
        buf = request_buffer(MAX_WRITE)
        view = memoryview(buf)
        handle = self.engine.handle
        parse = P.parse_request
        ext = self._setxattr_ext
        debug = log.isEnabledFor(logging.DEBUG)
        staff = self.staffing
        try:
            while staff.next(worker):
                n = read_request(fd, buf)
                if n <= 0:
                    if n == READ_AGAIN:
                        continue
                    if n == READ_ABORTED:
                        log.warning("the kernel aborted the FUSE connection: the mount is gone")
                    break
                staff.begin(worker)
                try:
                    req = parse(view[:n], setxattr_ext=ext)
                except ProtocolError as exc:
                    log.error("malformed request: %s", exc)
                    if exc.unique is not None and exc.opcode not in NO_REPLY:
                        write_reply(fd, (P.reply_error(exc.unique, errno.EIO),))
                    continue
                if debug:
                    _trace(req)
                out = handle(req)
                if out is not None:
                    write_reply(fd, out if isinstance(out, list) else (out,))
                if self.engine.ended:
                    break
        except OSError as exc:
            if exc.errno != errno.EBADF or not self._closing:
                log.exception("worker failed")
            # else: the daemon is ending after a signal and closed the fds
        except Exception:
            log.exception("worker failed")
        finally:
            staff.end()
            first = not self._done.is_set()
            self._done.set()
            if first:
                with contextlib.suppress(OSError):
                    signal.pthread_kill(self._main, _WORKER_DONE)

    def start(self) -> None:
        """Start the workers (after :meth:`handshake`)."""
        fds = [self.session.fd]
        for _ in range(WORKERS - 1):
            try:
                fds.append(self.session.clone())
            except OSError as exc:
                log.info("%s: serving with %d worker(s)", exc, len(fds))
                break
        cpus = uring.possible_cpus() if self.engine.agreed & InitFlag.OVER_IO_URING else []
        for cpu in cpus:
            self.engine.gauges[f"ring_requests_cpu{cpu}"] = self._ring_gauge(cpu)
        if cpus:
            self.engine.gauges["ring_workers"] = lambda: len(self._rings)
        self.staffing = Staffing(len(fds))
        self.staffing.start()
        self.engine.gauges["workers_woken"] = lambda: self.staffing.woken
        self.engine.gauges["monitor_looks"] = lambda: self.staffing.looks
        for i, fd in enumerate(fds):
            t = threading.Thread(target=self._work, args=(i, fd), name=f"fuse-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for cpu in cpus:
            for k in range(uring.WORKERS_PER_CPU):
                threading.Thread(target=self._ring_work, args=(cpu,), name=f"fuse-ring-{cpu}.{k}", daemon=True).start()

    def _ring_gauge(self, cpu: int) -> Callable[[], int]:
        """Requests answered through CPU *cpu*'s io_uring queue so far."""
        return lambda: sum(r.slot.served for r in self._rings if r.slot.qid == cpu)

    def _ring_work(self, cpu: int) -> None:
        """One io_uring worker (uring.py) of CPU *cpu*'s queue, pinned to that
        CPU where the process may run there."""
        with contextlib.suppress(OSError):
            if cpu in os.sched_getaffinity(0):
                os.sched_setaffinity(0, {cpu})
        buf = request_buffer(MAX_WRITE)
        handle = self.engine.handle
        parse = P.parse_request
        ext = self._setxattr_ext
        debug = log.isEnabledFor(logging.DEBUG)

        read_into = self.engine.read_into
        READ = Opcode.READ

        def answer(message: memoryview, payload: memoryview) -> Reply:
            try:
                req = parse(message, setxattr_ext=ext)
            except ProtocolError as exc:
                log.error("malformed request: %s", exc)
                return P.reply_error(exc.unique or 0, errno.EIO)
            if debug:
                _trace(req)
            if req.opcode == READ:  # the data straight into the ring's buffer
                return read_into(req, payload)
            return handle(req)

        try:
            ring = uring.Ring(self.session.fd, cpu, request_buffer_size(MAX_WRITE))
        except (OSError, RingError) as exc:
            log.info("requests stay on /dev/fuse: %s", exc)
            return
        self._rings.append(ring)
        try:
            ring.serve(answer, buf)
        except RingError as exc:
            log.info("requests stay on /dev/fuse: %s", exc)
        except Exception:
            log.exception("io_uring worker failed")
        finally:
            ring.close()

    def wait(self) -> bool:
        """Block until a stop signal or the end of the connection; True after a signal."""
        while not self._done.is_set():
            signum = signal.sigwait(_STOP_SIGNALS | {_WORKER_DONE})
            if signum in _STOP_SIGNALS:
                log.info("signal %d: unmounting", signum)
                return True
        return False

    def stop(self, unmount: bool) -> None:
        """Unmount (lazily) if asked; else let the workers finish what they read."""
        if unmount:
            try:
                self.session.unmount(lazy=True)
            except MountError as exc:
                log.warning("%s", exc)
            return
        for t in self._threads:
            t.join(timeout=10)

    def close(self) -> None:
        """Release what the connection holds (the core's lock held: no request
        is half-way through)."""
        self._closing = True
        self.backings.close()
        self.session.close()


def serve(cfg: MountConfig, fs: WritableUnionFS, on_live: Callable[[], None]) -> int:
    """Mount *fs* on ``cfg.mountpoint`` and serve it until unmounted; the exit status.

    *on_live* is called once INIT is answered (the mount answers requests).
    Raises MountError (one line) when the mount cannot be made.
    """
    # A no-op handler: a wake-up still pending when the mask is restored is harmless.
    signal.signal(_WORKER_DONE, lambda signum, frame: None)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS | {_WORKER_DONE})
    try:
        session = open_session(cfg.mountpoint, MountOptions.from_config(cfg))
        server = Server(fs, cfg, session)
        try:
            server.handshake()
        except BaseException:
            with contextlib.suppress(MountError):
                session.unmount(lazy=True)
            session.close()
            raise
        # Live once INIT is answered: requests queue in the kernel until the
        # workers read them, so the caller need not wait for threads to start
        # (about 2 ms each; container tools mount once per step).
        set_readahead(cfg.mountpoint)
        on_live()
        server.start()
        by_signal = False
        try:
            by_signal = server.wait()
        finally:
            server.stop(unmount=by_signal)
            with fs.lock:
                server.close()
        return 0
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _trace(req: P.Request) -> None:
    """Log a request as ``--debug`` shows it (tests count requests by these lines)."""
    log.debug("%s #%d node %d uid %d: %r", name_of(req.opcode), req.unique, req.nodeid, req.uid, req.args)


def _may_passthrough() -> bool:
    """FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace."""
    return in_initial_user_namespace() and has_cap_sys_admin()
