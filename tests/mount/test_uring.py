"""Requests over io_uring (pyunionfs/fuse/uring.py), through real mounts.

The kernel offers FUSE over io_uring only while the ``fuse`` module's
``enable_uring`` parameter is set (off by default, global): each test here
sets it for its own mounts and puts it back.  Checked: requests are answered
on the queue of the caller's CPU (the daemon's ``ring_requests_cpuN``
counts), the union behaves over the ring as over /dev/fuse (large writes and
xattr values in the payload, listings, copy-up, whiteouts, the upper on
disk), ``-o uring=off`` keeps to /dev/fuse, and every way of ending the mount
ends the daemon with status 0.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyunionfs.fuse import control
from pyunionfs.fuse.mountinfo import find_mount
from pyunionfs.fuse.uring import possible_cpus as uring_cpus
from pyunionfs.config import default_workdir
from tests.support.mounting import Daemon, is_mounted, uring_allowed, wait_until
from tests.support.writecheck import put

Mount = Callable[..., Daemon]


@pytest.fixture(name="uring_allowed")
def _uring_allowed() -> Iterator[None]:
    with uring_allowed():
        yield


def rings_ready(mnt: Path) -> None:
    """Wait until every ring worker has registered (they start after the mount is live)."""
    wanted = 2 * len(uring_cpus())
    wait_until(lambda: control.stats(os.fsencode(str(mnt)))["ring_workers"] == wanted, 10, "every ring worker")


def ring_counts(mnt: Path) -> dict[int, int]:
    """Requests answered so far through each CPU's queue."""
    stats = control.stats(os.fsencode(str(mnt)))
    return {int(k.removeprefix("ring_requests_cpu")): v for k, v in stats.items() if k.startswith("ring_requests_cpu")}


def lookups_on(cpu: int, names: list[Path]) -> None:
    """lstat each of *names* (one LOOKUP each: they are new to the kernel) from a process pinned to *cpu*."""
    code = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); [os.lstat(p) for p in sys.argv[2:]]"
    subprocess.run([sys.executable, "-c", code, str(cpu), *map(str, names)], check=True, timeout=60)


def test_requests_are_answered_on_the_queue_of_the_callers_cpu(
    tmp_path: Path, mount: Mount, uring_allowed: None
) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for i in range(400):
        put(lower / f"f{i}", b"x")
    upper.mkdir()
    m = mount([lower], upper).mnt
    rings_ready(m)
    cpus = sorted(os.sched_getaffinity(0))
    before = ring_counts(m)
    assert set(before) >= set(cpus), f"no ring for some CPU: {before}"
    done = 0
    for n, cpu in enumerate(cpus[:2]):
        lookups_on(cpu, [m / f"f{i}" for i in range(n * 200, n * 200 + 200)])
        after = ring_counts(m)
        assert after[cpu] - before[cpu] >= 200, f"CPU {cpu}'s lookups were not answered on its queue: {after}"
        done += after[cpu] - before[cpu]
        before = after
    assert done >= 200 * min(2, len(cpus))


def test_the_union_behaves_over_the_ring(tmp_path: Path, mount: Mount, uring_allowed: None) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "dir" / "keep", b"lower keep")
    put(lower / "dir" / "gone", b"lower gone")
    put(lower / "big", b"L" * 100_000)
    for i in range(3000):
        put(lower / "many" / f"entry-{i:05d}", b"")
    upper.mkdir()
    # passthrough=off: every WRITE and READ travels through the ring's payload
    m = mount([lower], upper, "passthrough=off").mnt
    start = sum(ring_counts(m).values())

    data = os.urandom(3 << 20)
    (m / "new").write_bytes(data)
    assert (m / "new").read_bytes() == data
    assert (upper / "new").read_bytes() == data

    value = os.urandom(3000)  # (ext4 keeps an xattr in one block)
    os.setxattr(m / "new", "user.big", value)
    assert os.getxattr(m / "new", "user.big") == value
    assert "user.big" in os.listxattr(m / "new")

    assert sorted(os.listdir(m / "many")) == [f"entry-{i:05d}" for i in range(3000)]
    with open(m / "big", "r+b") as f:  # copy-up of a lower file
        f.seek(50_000)
        f.write(b"upper")
    assert (upper / "big").read_bytes() == b"L" * 50_000 + b"upper" + b"L" * 49_995
    assert (lower / "big").read_bytes() == b"L" * 100_000
    os.unlink(m / "dir" / "gone")
    whiteout = os.stat(upper / "dir" / "gone", follow_symlinks=False)
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    os.rename(m / "dir" / "keep", m / "kept")
    assert (m / "kept").read_bytes() == b"lower keep"
    os.symlink("kept", m / "link")
    assert os.readlink(m / "link") == "kept"
    os.link(m / "new", m / "new2")
    assert os.stat(m / "new").st_ino == os.stat(m / "new2").st_ino
    with pytest.raises(FileNotFoundError):
        os.stat(m / "dir" / "gone")
    with pytest.raises(OSError) as err:
        os.rmdir(m / "many")
    assert err.value.errno == errno.ENOTEMPTY

    assert sum(ring_counts(m).values()) - start > 40, "the requests did not go over the ring"


def test_uring_off_keeps_requests_on_dev_fuse(tmp_path: Path, mount: Mount, uring_allowed: None) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "f", b"x")
    upper.mkdir()
    m = mount([lower], upper, "uring=off").mnt
    assert (m / "f").read_bytes() == b"x"
    assert ring_counts(m) == {}


def test_a_long_request_does_not_stall_the_other_callers_of_its_cpu(
    tmp_path: Path, mount: Mount, uring_allowed: None
) -> None:
    """A copy-up of a big file holds one of CPU 0's workers; lookups made from CPU 0 meanwhile
    are answered by the other, before the copy-up ends."""
    if 0 not in os.sched_getaffinity(0):
        pytest.skip("CPU 0 is not ours to run on")
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    with open(put(lower / "big"), "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    for i in range(50):
        put(lower / "names" / f"n{i}", b"")
    upper.mkdir()
    d = mount([lower], upper)
    m = d.mnt
    rings_ready(m)
    copied: list[float] = []

    def copy_up() -> None:
        os.sched_setaffinity(0, {0})
        fd = os.open(m / "big", os.O_WRONLY)  # the copy-up happens in this OPEN
        copied.append(time.monotonic())
        os.close(fd)

    t = threading.Thread(target=copy_up)
    t.start()
    try:
        work = Path(os.fsdecode(default_workdir(os.fsencode(upper)))) / "work"
        wait_until(lambda: any(work.iterdir()) or bool(copied), 30, "the copy-up to start")
        lookups_on(0, [m / "names" / f"n{i}" for i in range(50)])
        looked = time.monotonic()
    finally:
        t.join(60)
    assert copied and looked < copied[0], "the lookups waited for the copy-up"
    assert (upper / "big").stat().st_size == 256 << 20


_DROP_LOOP = """
import os, sys, time
from pyunionfs.fuse import control
os.sched_setaffinity(0, {0})
end = time.monotonic() + 2
while time.monotonic() < end:
    control.drop_caches(os.fsencode(sys.argv[1]))
"""
_LOOKUP_LOOP = """
import os, sys, time
os.sched_setaffinity(0, {0})
end = time.monotonic() + 2
while time.monotonic() < end:
    for i in range(200):
        try:
            os.lstat(os.path.join(sys.argv[1], "d", "n%d" % i))
        except FileNotFoundError:
            pass
"""


def _abort(mnt: Path) -> None:
    """End every request of *mnt*'s connection (fusectl's abort): a hung test must not hang the suite."""
    conns = Path("/sys/fs/fuse/connections")
    if not any(conns.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "none", str(conns)], capture_output=True)
    found = find_mount(os.fsencode(mnt))
    if found is not None:
        (conns / found[1].split(":")[1] / "abort").write_text("1")


def test_invalidations_and_lookups_from_one_cpu_do_not_wait_for_each_other(
    tmp_path: Path, mount: Mount, uring_allowed: None
) -> None:
    """drop_caches makes the kernel forget names (INVAL_ENTRY waits for lookups in the same
    directory to be answered) while lookups there come from the same CPU: a CPU queue whose
    only worker sends the invalidation would never answer them."""
    if 0 not in os.sched_getaffinity(0):
        pytest.skip("CPU 0 is not ours to run on")
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for i in range(200):
        put(lower / "d" / f"n{i}", b"")
    upper.mkdir()
    d = mount([lower], upper)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(d.mnt)]) for code in (_DROP_LOOP, _LOOKUP_LOOP)]
    try:
        for p in procs:
            p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _abort(d.mnt)
        pytest.fail("drop_caches and lookups from one CPU waited for each other (connection aborted)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    assert len(os.listdir(d.mnt / "d")) == 200


@pytest.mark.parametrize("how", ["umount", "fusermount3", "SIGTERM"])
def test_every_way_of_ending_the_mount_ends_the_daemon_cleanly(
    tmp_path: Path, mount: Mount, uring_allowed: None, how: str
) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "f", b"x")
    upper.mkdir()
    d = mount([lower], upper)
    assert (d.mnt / "f").read_bytes() == b"x"
    assert sum(ring_counts(d.mnt).values()) > 0
    if how == "SIGTERM":
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        assert not is_mounted(d.mnt), "the daemon must unmount itself on a signal"
        assert d.stop() == 0
    else:
        cmd = ["umount", str(d.mnt)] if how == "umount" else ["fusermount3", "-u", str(d.mnt)]
        assert d.stop(cmd) == 0
    assert not os.path.ismount(d.mnt)
