"""The engine's staffing rules without a mount: workers that loop as server.py's
do, over a queue standing in for /dev/fuse.

What must hold whatever the machine's load: a request that blocks does not
stall the ones behind it (a parked worker is woken), the extra workers park
again once nothing is stuck, and the end stops every worker, parked or not.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyunionfs.fuse.staffing import ALWAYS, PARKED, Staffing

Request = Callable[[], None]
_END: Request = lambda: None  # noqa: E731  (a sentinel the loop recognises)


class Pool:
    """Workers running server.py's loop shape: next(), read, begin(), handle."""

    def __init__(self, count: int) -> None:
        self.staff = Staffing(count)
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.served_by: list[int] = []
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(count)]

    def _work(self, worker: int) -> None:
        try:
            while self.staff.next(worker):
                request = self.inbox.get()
                if request is _END:
                    break
                self.staff.begin(worker)
                request()
                self.served_by.append(worker)
        finally:
            self.staff.end()

    def start(self) -> None:
        self.staff.start()
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.inbox.put(_END)  # as the kernel's ENODEV reaches the reading workers
        self.staff.end()
        for _ in self.threads:
            self.inbox.put(_END)
        for t in self.threads:
            t.join(timeout=10)


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(4)
    p.start()
    yield p
    p.stop()
    assert not any(t.is_alive() for t in p.threads), "a worker did not stop at the end"


def _wait_until(cond: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.001)
    return cond()


def test_a_stuck_request_does_not_stall_the_ones_behind_it(pool: Pool) -> None:
    release = threading.Event()
    done: list[int] = []
    for _ in range(ALWAYS):  # every worker that always serves gets stuck
        pool.inbox.put(lambda: release.wait(20))
    for i in range(50):
        pool.inbox.put(lambda i=i: done.append(i))
    try:
        assert _wait_until(lambda: len(done) == 50), f"only {len(done)} of 50 requests served behind a stuck one"
        assert pool.staff.woken >= 1
    finally:
        release.set()


def test_the_extra_workers_park_again_once_nothing_is_stuck(pool: Pool) -> None:
    release = threading.Event()
    for _ in range(ALWAYS):
        pool.inbox.put(lambda: release.wait(20))
    pool.inbox.put(lambda: None)
    assert _wait_until(lambda: len(pool.served_by) == 1)
    assert pool.staff.woken >= 1
    release.set()
    assert _wait_until(lambda: len(pool.served_by) == 1 + ALWAYS)

    # A woken worker waiting in read(2) parks after the next request it takes.
    def parked() -> bool:
        pool.inbox.put(lambda: None)
        return pool.staff.state[ALWAYS:].count(PARKED) == 4 - ALWAYS

    assert _wait_until(parked), pool.staff.state
    # The workers that always serve never park: they are the ones left reading.
    assert PARKED not in pool.staff.state[:ALWAYS]


def test_quick_requests_are_served_by_the_workers_that_always_serve(pool: Pool) -> None:
    for _ in range(200):
        pool.inbox.put(lambda: None)
    assert _wait_until(lambda: len(pool.served_by) == 200)
    # Nothing took STALL seconds unless the machine paused us; then the monitor
    # may wake one, which parks again after its request.
    steady = sum(1 for w in pool.served_by if w < ALWAYS)
    assert steady >= 200 - 3 * pool.staff.woken
    assert steady > 150


def test_a_single_worker_has_no_monitor_and_never_parks() -> None:
    p = Pool(1)
    p.start()
    try:
        p.inbox.put(lambda: None)
        assert _wait_until(lambda: p.served_by == [0])
        assert p.staff.state == [p.staff.state[0]] and p.staff.state[0] != PARKED
    finally:
        p.stop()
    assert not p.threads[0].is_alive()


def test_a_worker_that_starts_after_the_end_does_not_park_for_ever() -> None:
    """An unmount right after mounting can end the connection before the
    extra workers first ask whether to serve: they must stop, not wait to be
    woken by an end that already happened (the daemon then hung in join)."""
    staffing = Staffing(ALWAYS + 2)
    staffing.end()
    answers: list[bool] = []
    late = [threading.Thread(target=lambda w=w: answers.append(staffing.next(w)), daemon=True)
            for w in range(ALWAYS, ALWAYS + 2)]
    for t in late:
        t.start()
    for t in late:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in late), "a worker parked after the end"
    assert answers == [False, False]


def test_the_monitor_sleeps_while_a_worker_waits_for_the_next_request(pool: Pool) -> None:
    """A caller that waits for each answer always finds a worker in read(2):
    nothing can be stuck unseen, so the monitor must not look (each look
    takes the GIL from the worker on a request).  Before, it looked every
    POLL seconds while requests flowed: about 50 times in this test."""
    for _ in range(100):
        n = len(pool.served_by)
        pool.inbox.put(lambda: time.sleep(0.001))
        assert _wait_until(lambda n=n: len(pool.served_by) == n + 1)
    assert pool.staff.looks <= 5, pool.staff.looks
    assert pool.staff.woken == 0
