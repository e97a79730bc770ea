"""Real pyunionfs mounts for tests: a daemon in a subprocess, always unmounted.

What a mount test can rely on:

* :func:`require_fuse` fails (not skips, not hangs) with the reason when FUSE
  cannot work on this machine;
* :class:`Daemon` waits for the mount to appear in mountinfo, failing at once
  with the daemon's stderr if the process died instead;
* a watchdog kills the daemon after ``deadline`` seconds, so a hung daemon
  turns into failing syscalls (ENOTCONN) rather than a hung test run;
* :meth:`Daemon.stop` unmounts, requires exit status 0 and a log free of
  tracebacks; on any failure it kills the daemon and lazily unmounts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.fuse import control
from pyunionfs.fuse.mountinfo import find_mount

FSTYPE = "fuse.pyunionfs"

#: ``PYUNIONFS_TEST_KEEP_LOGS=DIR``: daemons run with --debug and their logs are
#: copied to DIR when they stop (to see which requests a failing test sent).
KEEP_LOGS = os.environ.get("PYUNIONFS_TEST_KEEP_LOGS", "")

#: Both FUSE engines, and the native one taking requests over io_uring
#: (``uring``: see :func:`uring_allowed`), for the tests that run on each
#: (``@EACH_ENGINE`` or ``pytestmark = EACH_ENGINE``; the ``engine`` fixture of
#: tests/conftest.py): the kernel-differential and interop tests.  The others
#: use the default engine over /dev/fuse.
EACH_ENGINE = pytest.mark.parametrize("engine", ["native", "uring", "pyfuse3"], indirect=True)

#: The ``fuse`` module's switch for FUSE over io_uring (off by default, global).
URING_PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def uring_allowed() -> Iterator[None]:
    """``fuse.enable_uring`` set inside the block, as it was before afterwards.

    The kernel offers io_uring in INIT and agrees to it in the INIT reply only
    while it is set; a connection that agreed keeps it.  Skips the test where
    the parameter cannot be written (a kernel before 6.14, or not root).
    """
    if not os.access(URING_PARAMETER, os.W_OK):
        pytest.skip(f"{URING_PARAMETER} missing or not writable (needs Linux 6.14+ with CONFIG_FUSE_IO_URING, as root)")
    before = URING_PARAMETER.read_text().strip()
    URING_PARAMETER.write_text("1")
    try:
        yield
    finally:
        URING_PARAMETER.write_text("1" if before == "Y" else "0")


def require_fuse() -> None:
    """Fail with a precise reason when this machine cannot run FUSE mounts."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests need it (modprobe fuse, or --device /dev/fuse)")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: apt-get install fuse3")


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll *cond* until true; fail fast if *proc* exits, fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log else ""
            pytest.fail(f"daemon exited with {proc.returncode} before {what}:\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def is_mounted(mnt: Path | str, fstype: str = FSTYPE) -> bool:
    found = find_mount(os.fsencode(str(mnt)))
    return found is not None and found[0] == fstype


def force_unmount(mnt: Path | str) -> None:
    """Last resort: detach whatever is mounted at *mnt*."""
    if find_mount(os.fsencode(str(mnt))) is not None:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


class Daemon:
    """``pyunionfs mount ... -f`` running in a subprocess."""

    def __init__(self, lowers: list[Path] | str, upper: Path | str | None, mnt: Path,
                 options: list[str] = (), deadline: float = 100.0, extra_args: list[str] = (),
                 engine: str = "native") -> None:
        require_fuse()
        if engine not in ("native", "uring"):
            options = [*options, f"engine={engine}"]
        self.mnt = mnt
        self.final_log = ""
        layer_arg = lowers if isinstance(lowers, str) else ":".join(str(p) for p in lowers)
        self.log = Path(tempfile.mkstemp(prefix="pyunionfs-daemon-", suffix=".log")[1])
        upper_arg = "" if upper is None else str(upper)
        cmd = [sys.executable, "-m", "pyunionfs", "mount", layer_arg, upper_arg, str(mnt), "-f"]
        for opt in options:
            cmd += ["-o", opt]
        cmd += list(extra_args)
        if KEEP_LOGS:  # debugging aid: every request logged, every log kept
            cmd.append("--debug")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._watchdog = threading.Timer(deadline, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        try:
            with uring_allowed() if engine == "uring" else contextlib.nullcontext():
                wait_until(lambda: is_mounted(mnt), 20, f"the mount at {mnt}", self.proc, self.log)
                os.stat(mnt)  # answered once INIT is: the kernel has agreed io_uring or not
            if engine == "uring":
                stats = control.stats(os.fsencode(mnt))
                if "ring_workers" not in stats:
                    pytest.fail("the kernel offered FUSE over io_uring but the daemon took none")
                want = sum(k.startswith("ring_requests_cpu") for k in stats) * 2  # two workers per CPU
                wait_until(lambda: control.stats(os.fsencode(mnt))["ring_workers"] == want, 10, "the ring workers")
        except BaseException:
            self._kill()
            raise

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        force_unmount(self.mnt)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, how: list[str] | None = None, check: bool = True) -> int:
        """Unmount (by default with fusermount3 -u) and return the exit status."""
        try:
            if self.proc.poll() is None and is_mounted(self.mnt):
                cmd = how or ["fusermount3", "-u", str(self.mnt)]
                subprocess.run(cmd, check=True, capture_output=True, timeout=30)
            rc = self.proc.wait(timeout=30)
        except BaseException:
            self._kill()
            raise
        finally:
            self._watchdog.cancel()
            force_unmount(self.mnt)
        text = self.log_text()
        if KEEP_LOGS:
            shutil.copy(self.log, Path(KEEP_LOGS) / self.log.name)
        self.final_log = text  # for callers that judge the log themselves (check=False)
        self.log.unlink(missing_ok=True)
        if check:
            assert rc == 0, f"daemon exited with {rc}:\n{text}"
            assert "Traceback" not in text, f"daemon logged an exception:\n{text}"
        return rc

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(check=exc[0] is None)


def dead_mount_errno(path: Path, timeout: float = 10.0) -> int:
    """The errno a stat of *path* gets once the dead daemon's connection is torn down (0: none).

    A daemon that served over io_uring leaves its ring entries to the kernel to
    cancel after its death, asynchronously (milliseconds): a request made in that
    window fails with ECONNABORTED; after it, as over /dev/fuse, every request
    gets ENOTCONN.  Any other answer is returned at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(path)
            return 0
        except OSError as exc:
            if exc.errno != errno.ECONNABORTED or time.monotonic() > deadline:
                return exc.errno


def drop_kernel_caches() -> None:
    """Make the kernel forget cached dentries and inodes (they are re-looked up)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
