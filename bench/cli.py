"""Command line of the bench: pick systems, workloads and sizes, run, write the report."""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from . import dataset as datasets
from .osutil import BenchError, mounts_under, safe_rmtree
from .profile import FULL, QUICK
from .report import write_all
from .runner import RunState, run_all
from .systems import ALL, BY_NAME, System
from .workloads import WORKLOADS, by_row, check_tool, select

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("/var/tmp/pyunionfs-bench")
PEER_PACKAGES = {"fuse-overlayfs": "fuse-overlayfs", "unionfs": "unionfs-fuse", "fio": "fio"}


def _parser() -> argparse.ArgumentParser:
    rows = ", ".join(by_row())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run every workload on pyunionfs and its peers, interleaved, and write a Markdown report.",
        epilog=f"workloads (and rows): {', '.join(w.name for w in WORKLOADS)} ({rows})",
    )
    p.add_argument("--rounds", type=int, help=f"rounds (default {FULL.rounds}; {QUICK.rounds} with --quick)")
    p.add_argument("--only", metavar="WORKLOAD,...", help="run only these workloads (names or row names)")
    p.add_argument("--systems", metavar="SYSTEM,...", help=f"systems to run (default all: {', '.join(BY_NAME)})")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one round: a smoke run of a minute or two")
    p.add_argument("--out", type=Path, help="where the report goes (default bench/results/, bench/results/quick/ "
                   "with --quick)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"cache of the dataset and scratch space for mounts (default {DEFAULT_WORKDIR})")  # fmt: skip
    p.add_argument("--install-peers", action="store_true",
                   help="apt-get install fuse-overlayfs, unionfs-fuse and fio where missing")  # fmt: skip
    return p


def install_peers() -> None:
    missing = [pkg for exe, pkg in PEER_PACKAGES.items() if shutil.which(exe) is None]
    if not missing:
        return
    print(f"bench: apt-get install {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: mounts are undone


def _clean_stale(workdir: Path) -> None:
    """Remove scratch folders of earlier runs that died (their pid is gone), unmounting what they left."""
    for d in workdir.glob("run-*"):
        pid = d.name.removeprefix("run-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            safe_rmtree(d)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (it mounts overlayfs and drops the kernel's caches)", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    rounds = args.rounds or profile.rounds
    out = (args.out or (HERE / "results" / ("quick" if args.quick else ""))).resolve()
    workdir = args.workdir.resolve()
    try:
        workloads = select(args.only)
        wanted = [n.strip() for n in (args.systems or ",".join(BY_NAME)).split(",") if n.strip()]
        unknown = [n for n in wanted if n not in BY_NAME]
        if unknown:
            raise BenchError(f"unknown system(s): {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.install_peers:
        install_peers()

    systems: list[System] = []
    skipped_systems: dict[str, str] = {}
    for s in ALL:
        if s.name in wanted:
            why = s.missing()
            if why:
                skipped_systems[s.name] = why
                print(f"bench: skipping {s.name}: {why}", flush=True)
            else:
                systems.append(s)
    skipped_workloads: dict[str, str] = {}
    for w in workloads:
        why = check_tool(w)
        if why:
            skipped_workloads[w.name] = why
            print(f"bench: skipping workload {w.name}: {why}", flush=True)
    runnable = [w for w in workloads if w.name not in skipped_workloads]

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.monotonic()
    load0 = os.getloadavg()
    _clean_stale(workdir)
    ds = datasets.ensure(workdir, profile)
    rundir = workdir / f"run-{os.getpid()}"
    state = RunState(rundir, ds, systems, runnable, rounds)
    print(f"bench: {len(runnable)} workloads x {len(systems)} systems x {rounds} rounds "
          f"on {ds.meta['entries']} lower entries; report in {out}", flush=True)  # fmt: skip
    interrupted = False
    try:
        run_all(state)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; writing what was measured", file=sys.stderr, flush=True)
    finally:
        safe_rmtree(rundir)
        left = mounts_under(workdir)
        if left:
            print(f"bench: warning: still mounted: {', '.join(map(str, left))}", file=sys.stderr)
    if state.samples:
        cmd = ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]
        load1 = os.getloadavg()
        # The bench itself keeps about one core busy; more than that means something else competed for the CPU.
        load = f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end (1-minute averages; the bench alone ≈ 1)"
        path = write_all(out, state.samples, systems, skipped_systems, workloads, skipped_workloads, ds, rounds,
                         started, time.monotonic() - t0, cmd, load)  # fmt: skip
        print(f"bench: wrote {path} ({(time.monotonic() - t0) / 60:.1f} min)", flush=True)
    return 130 if interrupted else 0
