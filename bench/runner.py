"""The measurement loop: every round runs every workload on every system, interleaved.

Interleaving (round -> workload -> system, with the system order rotated each round) spreads
slow drifts of the machine (other load, disk state, a daemon being rebuilt by a colleague) over
all systems instead of charging them to whichever ran last.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import Dataset
from .osutil import BenchError, safe_rmtree
from .profile import MiB
from .systems import System
from .workloads import Context, Sample, Workload

PREFAULT = 256 * MiB  # memory recycled before every run (see Context.prefault)


@dataclass
class RunState:
    rundir: Path  # per-process scratch: uppers, work dirs, mountpoints
    dataset: Dataset
    systems: list[System]
    workloads: list[Workload]
    rounds: int
    samples: list[Sample] = field(default_factory=list)


def run_all(state: RunState) -> None:
    n = len(state.systems)
    for rnd in range(state.rounds):
        order = state.systems[rnd % n :] + state.systems[: rnd % n]
        for wl in state.workloads:
            for system in order:
                run_one(state, system, wl, rnd)


def run_one(state: RunState, system: System, wl: Workload, rnd: int) -> None:
    """Mount *system* fresh (empty upper), run *wl*, unmount, clean up; failures become error samples."""
    base = state.rundir / system.name
    safe_rmtree(base)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    pid: int | None = None
    ctx: Context | None = None
    t0 = time.monotonic()
    build = system.fingerprint()
    try:
        if system.fuse or system.fstype:
            pid = system.mount(state.dataset.lower, upper, work, mnt)
            root = mnt
        elif wl.writes:
            root = base / "rw"  # plain: writes go to a plain folder, never into the cached lower
            root.mkdir()
            if wl.plain_inputs:
                wl.plain_inputs(state.dataset, root)
                os.sync()
        else:
            root = state.dataset.lower
        scratch = base / "scratch"
        scratch.mkdir()
        ctx = Context(system.name, rnd, root, state.dataset, pid, scratch, build)
        ctx.prefault(PREFAULT)
        wl.run(ctx)
        state.samples.extend(ctx.samples)
    except Exception as exc:  # one failure is a result (shown in the table), not the end of the run
        done = {s.row for s in ctx.samples} if ctx else set()
        if ctx:
            state.samples.extend(ctx.samples)
        msg = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        for row in wl.rows:
            if row not in done:
                state.samples.append(Sample(system.name, row, rnd, error=msg, build=build))
    finally:
        try:
            system.unmount(mnt, pid)
        finally:
            os.sync()
            safe_rmtree(base)
    _progress(state, system, wl, rnd, time.monotonic() - t0)


def _progress(state: RunState, system: System, wl: Workload, rnd: int, took: float) -> None:
    parts = []
    for s in state.samples:
        if s.system == system.name and s.round == rnd and s.row in wl.rows:
            if s.error:
                parts.append(f"{s.row} ERROR {s.error}")
            else:
                extra = ""
                if s.cpu_seconds is not None:
                    extra = f" (daemon cpu {s.cpu_seconds:.2f} s, rss {s.peak_rss_mib:.0f} MiB)"
                parts.append(f"{s.row} {s.seconds:.3f} s{extra}")
    print(f"[round {rnd + 1}/{state.rounds}] {system.name:<15} {'; '.join(parts)}  [{took:.1f} s]", flush=True)
