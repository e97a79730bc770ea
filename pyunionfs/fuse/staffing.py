"""How many of the engine's workers serve at once: two, and more only while one is stuck.

Python runs one thread at a time (the GIL), and every request's work is
mostly Python around a few short syscalls.  So while requests are cheap, a
second worker does not add capacity, it subtracts it: each syscall hands the
GIL to another worker, which then holds it while the first waits to come
back, and every hand-over is a futex wake and a context switch.  Measured on
2 cores, ``git status`` over a fresh mount (thousands of LOOKUPs from git's
parallel lstat threads) took 1.5 times as long with four workers reading
/dev/fuse as with two (see :data:`ALWAYS` for why not one).

But a single worker stalls every other request behind a slow one: a copy-up
of a big file, an fsync, a lookup that waits for the disk.  Extra workers
exist for exactly that, so they are woken only when it happens: every
worker records when it started its current request; a monitor thread
looks every :data:`POLL` seconds while no worker is ready to read the next
request, and if one has then been on its request for :data:`STALL` seconds,
it wakes a parked worker.  While some worker waits in read(2) nothing can be
stuck unseen, so the monitor sleeps: a caller that waits for each answer
never wakes it (each wake takes the GIL from the worker on a request).
That also keeps a request that waits on the kernel for another request
(an invalidation waits for a lookup on the same directory to be answered)
from waiting for ever.
A woken worker serves until nobody is stuck any more or another worker is
already waiting in read(2), then parks again.  The first :data:`ALWAYS`
workers never park.

The states are plain floats in a list, written only by their own worker
(and by the monitor when it wakes one); a stale read costs at most one poll
of delay, never a lost request: a parked worker is never in read(2), and a
worker that is not parked always gets back to read(2).
"""

from __future__ import annotations

import threading
import time

#: How often the monitor looks while no worker is ready (seconds).  Each look
#: takes the GIL from the worker; every 0.5 ms cost ``git status`` a fifth.
POLL = 0.002
#: How long one request may hold the only ready worker before another is woken.
STALL = 0.002

#: A worker's state: parked (asleep, not reading), ready (in read(2) or
#: about to be), or the monotonic time it started its current request.
#: Workers that always serve.  Two, not one: while one writes its reply and
#: gets back to read(2), a caller that waits for each answer (``ls -lR``,
#: ``stat`` of every file) has its next request read by the other at once.
#: Measured side by side (bench, 3 rounds, times over fuse-overlayfs's):
#: with 1, ``ls -lR`` 1.30x, ``stat-cold`` 1.26x, ``git status`` 1.43x;
#: with 2, 0.92x, 1.07x, 2.1x; with all 4 always serving, 0.90x, 1.05x, 3.2x.
ALWAYS = 2
PARKED = -1.0
READY = 0.0


class Staffing:
    """The states of *count* workers, the monitor that wakes them, and the end."""

    def __init__(self, count: int) -> None:
        keep = min(count, ALWAYS)
        self.state: list[float] = [READY] * keep + [PARKED] * (count - keep)
        self._wake = [threading.Event() for _ in range(count)]
        self._pulse = threading.Event()
        self.ending = False
        #: How often the monitor woke a parked worker, and how often it looked
        #: (both in the mount's stats).
        self.woken = 0
        self.looks = 0
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        if len(self.state) > 1:
            self._monitor = threading.Thread(target=self._watch, name="fuse-staffing", daemon=True)
            self._monitor.start()

    # -- called by the workers ------------------------------------------------

    def begin(self, worker: int) -> None:
        """*worker* read a request and starts on it."""
        state = self.state
        state[worker] = time.monotonic()
        if READY not in state and not self._pulse.is_set():
            self._pulse.set()  # nobody waits for the next request: the monitor looks

    def next(self, worker: int) -> bool:
        """*worker* finished a request: park it if it is not needed; False once the daemon ends."""
        if worker >= ALWAYS and not self._needed(worker):
            wake = self._wake[worker]
            wake.clear()
            self.state[worker] = PARKED
            # A request may have got stuck since the look above, with the
            # monitor's last look still seeing this worker busy: look again.
            # And the connection may have ended before this worker first got
            # here (an unmount right after mounting): end() set the event we
            # just cleared, so look at `ending` after clearing, not before.
            if not self.ending and not self._needed(worker):
                wake.wait()
        self.state[worker] = READY
        return not self.ending

    def end(self) -> None:
        """The connection ended: every parked worker and the monitor stop."""
        self.ending = True
        for wake in self._wake:
            wake.set()
        self._pulse.set()

    # -- the monitor ---------------------------------------------------------------

    def _needed(self, worker: int) -> bool:
        """Whether one more worker should serve: none of the others is ready
        and one of them has been stuck on a request for STALL."""
        since = time.monotonic() - STALL
        stuck = False
        for i, s in enumerate(self.state):
            if i == worker:
                continue
            if s == READY:
                return False
            if 0 < s <= since:
                stuck = True
        return stuck

    def _watch(self) -> None:
        pulse = self._pulse
        while not self.ending:
            pulse.wait()
            while not self.ending:
                time.sleep(POLL)
                self.looks += 1
                states = self.state
                if READY in states:
                    pulse.clear()  # a worker waits for the next request: sleep, unless it began one meanwhile
                    if READY in self.state:
                        break
                    continue
                if PARKED in states and self._needed(-1):
                    worker = states.index(PARKED)
                    states[worker] = READY
                    self.woken += 1
                    self._wake[worker].set()
