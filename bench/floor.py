"""The per-request floor of a FUSE daemon on pyfuse3 and trio, against fuse-overlayfs.

Why: many workloads are a long series of small requests, so a daemon can be no faster than
the cost of one request times their number.  This mounts a filesystem whose only handler
answers constant attributes, sets every timeout to 0 so that each ``stat`` is one GETATTR,
and times it; then does the same through fuse-overlayfs (``-o timeout=0``, which it passes to
the kernel as entry and attribute timeouts) over an empty lower.  Nothing of pyunionfs runs.

    python -m bench.floor [--stats N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .osutil import BenchError, mount_fstype, wait_until

_NULL_FS = r"""
import stat, sys, pyfuse3, trio

class Null(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        e.attr_timeout = e.entry_timeout = 0
        return e

pyfuse3.init(Null(), sys.argv[1], {"fsname=nullfs"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
"""


def _per_stat(path: str, n: int) -> float:
    """Best of three: microseconds per stat of *path*."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            os.stat(path)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def _measure(cmd: list[str], mnt: str, n: int) -> float:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                said = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"{cmd[0]} exited: {said}")
            return mount_fstype(Path(mnt)) is not None

        wait_until(up, 20, f"the mount at {mnt}")
        return _per_stat(mnt, n)
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True, timeout=30)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    ap.add_argument("--stats", type=int, default=20000, help="stat calls per measurement (default 20000)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyunionfs-floor-") as tmp:
        mnt, low, up, work = (os.path.join(tmp, n) for n in ("mnt", "low", "up", "work"))
        for d in (mnt, low, up, work):
            os.mkdir(d)
        print(f"plain stat:                    {_per_stat(tmp, args.stats):6.1f} us")
        null = _measure([sys.executable, "-c", _NULL_FS, mnt], mnt, args.stats)
        print(f"pyfuse3+trio, null handler:    {null:6.1f} us per request")
        exe = shutil.which("fuse-overlayfs")
        if exe is None:
            print("fuse-overlayfs:                not installed (apt-get install fuse-overlayfs)")
            return 0
        opts = f"lowerdir={low},upperdir={up},workdir={work},timeout=0"
        c = _measure([exe, "-f", "-o", opts, mnt], mnt, args.stats)
        print(f"fuse-overlayfs, real handler:  {c:6.1f} us per request")
        print(f"ratio:                         {null / c:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
