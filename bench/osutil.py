"""Small OS helpers shared by the bench modules: mount table, caches, processes.

The bench measures the daemon as a black box (it is started as a separate program); the only
thing it borrows from the package is the mountinfo unescaping, which both need alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pyunionfs.fuse.mount import unescape_mountinfo


class BenchError(RuntimeError):
    """A failure the runner reports in the results (one workload on one system) and moves past."""


def mount_fstype(path: Path) -> str | None:
    """Filesystem type mounted exactly at *path*, read from mountinfo (never stat: a dead daemon would hang it)."""
    target = os.fsencode(str(path))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            if unescape_mountinfo(fields[4]) == target:
                found = os.fsdecode(fields[sep + 1])
    return found


def mounts_under(path: Path) -> list[Path]:
    """Every mountpoint at or below *path* (deepest first), so a cleanup can detach them before deleting."""
    prefix = os.fsencode(str(path))
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = unescape_mountinfo(line.split()[4])
            if point == prefix or point.startswith(prefix + b"/"):
                points.append(Path(os.fsdecode(point)))
    return sorted(points, key=lambda p: len(str(p)), reverse=True)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.005) -> None:
    """Poll *cond* (no fixed sleeps: mounts and daemon exits are waited for, not guessed)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def run(cmd: Sequence[object], timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run *cmd*, raising BenchError with its stderr when it fails (the runner records the message)."""
    try:
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{Path(str(cmd[0])).name} timed out after {timeout:.0f}s") from exc
    if res.returncode != 0:
        tail = (res.stderr or res.stdout or "").strip().splitlines()[-3:]
        raise BenchError(f"{' '.join(str(c) for c in cmd[:3])} ... exited {res.returncode}: {' / '.join(tail)}")
    return res


def drop_caches() -> None:
    """Write back dirty data, then make the kernel forget page cache, dentries and inodes (a cold start)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def pid_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != b"Z"


def find_daemon(mountpoint: Path, names: Sequence[str]) -> int | None:
    """Pid of the FUSE daemon serving *mountpoint*: a process whose argv holds the mountpoint and one of *names*.

    The daemons detach from the command that mounted them, so the pid is found after the fact,
    the way an operator would find it with ``ps``.
    """
    target = os.fsencode(str(mountpoint))
    want = [os.fsencode(n) for n in names]
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if target in argv and any(any(w in a for w in want) for a in argv[:2]):
            return int(entry)
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of *pid*, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # After the comm field: state is index 0, so utime (field 14) is index 11 and stime index 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS, so the next reading is the peak of one workload only."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5\n")


def peak_rss_mib(pid: int) -> float:
    """VmHWM of *pid* in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def force_unmount(path: Path) -> None:
    """Detach whatever is mounted at *path* (lazily), the last resort of every cleanup."""
    if mount_fstype(path) is not None:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def safe_rmtree(path: Path) -> None:
    """Delete *path* only after detaching every mount below it: never rm -rf through a live mount."""
    if not path.exists() and not path.is_symlink():
        return
    for point in mounts_under(path):
        force_unmount(point)
    if mounts_under(path):
        raise BenchError(f"refusing to delete {path}: something is still mounted below it")
    shutil.rmtree(path)
