"""The per-request floor: what one FUSE request costs each daemon, side by side in one run.

Why: many workloads are a long series of small requests, so a daemon can be no faster than the
cost of one request times their number. Each daemon is mounted over the same small lower with
every cache timeout at 0 (``-o timeout=0``, which fuse-overlayfs and pyunionfs both pass to the
kernel as entry and attribute timeouts), so that each ``stat`` of the mount's root is one GETATTR
answered by the daemon, and timed:

- ``fuse-overlayfs``: the reference, in C on libfuse;
- ``pyunionfs``: ``pyunionfs mount``, default engine (its own, on /dev/fuse);
- ``pyunionfs-pyfuse3``: the same with ``-o engine=pyfuse3`` (pyfuse3 and trio);
- ``pyfuse3-null``: a pyfuse3+trio filesystem whose only handler answers constant attributes, no
  pyunionfs at all: the floor of that stack by itself.

Every daemon stays mounted for the whole run; in each round every one is timed in turn, in an
order rotated each round, so a slow drift of the machine is spread over all of them. Printed: µs
per stat per round, the median, the daemon's CPU µs per stat, and the ratio to fuse-overlayfs.
A daemon that cannot mount is reported and left out; every mount is undone on the way out.

    python -m bench.floor [--stats N] [--rounds N] [--systems S,...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli import DEFAULT_WORKDIR, _terminate
from .osutil import BenchError, cpu_seconds, force_unmount, mount_fstype, pid_alive, safe_rmtree, wait_until
from .systems import BY_NAME, REFERENCE_FUSE

NULL = "pyfuse3-null"
#: Mounted as the bench mounts them, plus timeout=0.
UNIONS = (REFERENCE_FUSE, "pyunionfs", "pyunionfs-uring", "pyunionfs-pyfuse3")
SYSTEMS = (*UNIONS, NULL)
PLAIN = "plain (no FUSE)"

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


@dataclass
class Target:
    """One thing whose stat is timed: a mount's root (or, for plain, a folder of the disk)."""

    name: str
    path: Path
    pid: int | None = None  # the daemon, for its CPU time
    us: list[float] = field(default_factory=list)  # µs per stat, one per round
    cpu_us: list[float] = field(default_factory=list)  # daemon CPU µs per stat, one per round


def _time_stats(t: Target, n: int) -> None:
    path = str(t.path)
    for _ in range(min(n, 500)):  # warm-up: the first requests of a round are not the steady state
        os.stat(path)
    cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        os.stat(path)
    t.us.append((time.perf_counter() - t0) / n * 1e6)
    if t.pid:
        t.cpu_us.append((cpu_seconds(t.pid) - cpu0) / n * 1e6)


def _small_lower(lower: Path) -> None:
    """A few folders, files and a symlink: a real lower, small enough to be set up in no time."""
    for i in range(4):
        d = lower / f"d{i}"
        d.mkdir()
        for j in range(16):
            (d / f"f{j:02d}").write_bytes(b"x" * 100 * j)
    (lower / "link").symlink_to("d0/f01")


def _mount_union(stack: contextlib.ExitStack, name: str, base: Path, lower: Path) -> Target:
    system = BY_NAME[name]
    why = system.missing()
    if why:
        raise BenchError(why)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    try:
        pid = system.mount(lower, upper, work, mnt, extra=("timeout=0",))
    except BaseException:
        system.unmount(mnt, None)  # whatever got mounted before the failure
        raise
    stack.callback(system.unmount, mnt, pid)
    return Target(name, mnt, pid)


def _mount_null(stack: contextlib.ExitStack, base: Path) -> Target:
    if importlib.util.find_spec("pyfuse3") is None or importlib.util.find_spec("trio") is None:
        raise BenchError("pyfuse3 or trio is not installed beside this Python")
    mnt = base / "mnt"
    mnt.mkdir(parents=True)
    log = base / "log"
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would block the daemon
        proc = subprocess.Popen([sys.executable, "-c", _NULL_FS, str(mnt)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip

    def stop() -> None:
        try:
            if mount_fstype(mnt) is not None:
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
            force_unmount(mnt)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            force_unmount(mnt)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    stack.callback(stop)

    def up() -> bool:
        if proc.poll() is not None:
            said = log.read_bytes().decode(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"the null filesystem exited {proc.returncode}: {' / '.join(said)}")
        return mount_fstype(mnt) is not None

    wait_until(up, 20, f"the null filesystem to mount at {mnt}")
    return Target(NULL, mnt, proc.pid)


def _clean_stale(workdir: Path) -> None:
    """Remove the folders of earlier runs that died (their pid is gone), unmounting what they left."""
    for d in workdir.glob("floor-*"):
        pid = d.name.removeprefix("floor-")
        if pid.isdigit() and not pid_alive(int(pid)):
            safe_rmtree(d)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _report(targets: list[Target], failed: dict[str, str], rounds: int) -> None:
    ref = next((t for t in targets if t.name == REFERENCE_FUSE), None)
    ref_med = _median(ref.us) if ref else None
    width = max(len(n) for n in [PLAIN, *SYSTEMS])
    head = f"{'µs per stat':<{width}} " + "".join(f"{f'round {r + 1}':>9}" for r in range(rounds))
    print(head + f"{'median':>9}{'daemon CPU':>12}   / {REFERENCE_FUSE} (per-round range)")
    for t in targets:
        med = _median(t.us)
        cells = "".join(f"{u:9.1f}" for u in t.us) + " " * 9 * (rounds - len(t.us))
        cpu = _median(t.cpu_us)
        line = f"{t.name:<{width}} {cells}{med:9.1f}" if med is not None else f"{t.name:<{width}} {cells}{'-':>9}"
        line += f"{cpu:12.1f}" if cpu is not None else f"{'-':>12}"
        if med is not None and ref_med and ref is not None:
            per_round = [a / b for a, b in zip(t.us, ref.us, strict=False) if b]
            line += f"   {med / ref_med:6.2f}×"
            if len(per_round) > 1:
                line += f" ({min(per_round):.2f}–{max(per_round):.2f})"
        print(line)
    for name, why in failed.items():
        print(f"{name:<{width}} not measured: {why}")
    if ref is None:
        print(f"(no ratios: {REFERENCE_FUSE} was not measured)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--stats", type=int, default=20000, help="stat calls per measurement (default 20000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each timing every system once (default 5)")
    ap.add_argument("--systems", metavar="S,...", default=",".join(SYSTEMS),
                    help=f"which daemons to measure (default all: {', '.join(SYSTEMS)})")  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"where the lower and the mounts go (default {DEFAULT_WORKDIR})")  # fmt: skip
    args = ap.parse_args(argv)
    wanted = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SYSTEMS]
    if unknown or args.stats < 1 or args.rounds < 1:
        ap.error(f"unknown system(s): {', '.join(unknown)}" if unknown else "--stats and --rounds must be positive")
    if os.geteuid() != 0:
        print("bench.floor: must run as root (it mounts and unmounts FUSE filesystems)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _clean_stale(workdir)
    tmp = workdir / f"floor-{os.getpid()}"
    safe_rmtree(tmp)
    lower = tmp / "lower"
    lower.mkdir(parents=True)
    _small_lower(lower)
    targets = [Target(PLAIN, lower)]
    failed: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as stack:
            for name in [n for n in SYSTEMS if n in wanted]:
                try:
                    if name == NULL:
                        targets.append(_mount_null(stack, tmp / name))
                    else:
                        targets.append(_mount_union(stack, name, tmp / name, lower))
                except BenchError as exc:
                    failed[name] = str(exc)
                    print(f"bench.floor: {name}: {exc}", file=sys.stderr, flush=True)
            print(f"bench.floor: {args.stats} stats of each mount's root per round, {args.rounds} rounds (order "
                  "rotated each round); every timeout 0, so each stat is one GETATTR", flush=True)  # fmt: skip
            for rnd in range(args.rounds):
                k = rnd % len(targets)
                for t in targets[k:] + targets[:k]:
                    _time_stats(t, args.stats)
            _report(targets, failed, args.rounds)
    except KeyboardInterrupt:
        print("bench.floor: interrupted", file=sys.stderr)
        return 130
    finally:
        safe_rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
