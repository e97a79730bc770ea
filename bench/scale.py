"""How cost grows with the work: many layers, one huge directory, and mounting, side by side in one run.

Why: the main bench runs every workload over one lower, where per-layer and per-entry costs hide.
Container images have 50 to 125 layers, package caches hold directories of 100,000 entries or more,
and container tools mount once per build step and per container start. Three scenarios, each on
the kernel's overlayfs, fuse-overlayfs and pyunionfs with their defaults:

- ``layers-N`` (N = 1, 16, 64, 128): cold ``lstat`` of 2,000 files that live in the bottom layer,
  in 20 directories that every layer above also has (each with a file of its own), so that each
  name is looked for, and missed, in every layer above. Flat is the goal: the column ``x1`` is the
  time over the same system's 1-layer time.
- ``bigdir-list`` / ``bigdir-ls-l``: one lower directory of 200,000 empty files, listed
  (``scandir``, names only) and ``ls -l``'d, each on a fresh mount with the kernel's caches dropped;
  ``bigdir-mem`` is the daemon's peak memory across both above its resident size once mounted, in
  bytes per entry.
- ``mount``: wall time from starting the mount command until the mount table shows the mount.

Rounds interleave the systems (the order rotated each round); the median of the rounds is printed
as a markdown table with ratios to fuse-overlayfs, and written with every sample to --out.
The layer stacks and the big directory are built once under the work folder and kept
(``--rebuild`` builds them again).

    python -m bench.scale [--rounds N] [--systems S,...] [--only layers,bigdir,mount] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .cli import DEFAULT_WORKDIR, _terminate
from .osutil import BenchError, drop_caches, mount_fstype, peak_rss_mib, reset_peak_rss, safe_rmtree, wait_until
from .systems import BY_NAME, KERNEL, REFERENCE_FUSE, SUBJECT, System

SYSTEMS = (KERNEL, REFERENCE_FUSE, SUBJECT)
LAYER_COUNTS = (1, 16, 64, 128)
DIRS, FILES_PER_DIR = 20, 100  # 2,000 files in the bottom layer
BIG_ENTRIES = 200_000
MOUNTS_PER_ROUND = 5
SCENARIOS = ("layers", "bigdir", "mount")
DATA_VERSION = "1"  # bump when the generated trees change, so that kept copies are rebuilt


@dataclass
class Sample:
    system: str
    row: str
    round: int
    value: float  # seconds, or bytes per entry for bigdir-mem


# -- the data, built once -----------------------------------------------------------------------


def _build_once(path: Path, build: Callable[[Path], None], rebuild: bool) -> Path:
    """*path* filled by *build*, kept between runs (a stamp says it is complete and current)."""
    stamp = path / ".complete"
    if not rebuild and stamp.exists() and stamp.read_text() == DATA_VERSION:
        return path
    safe_rmtree(path)
    path.mkdir(parents=True)
    build(path)
    stamp.write_text(DATA_VERSION)
    return path


def _build_layers(root: Path) -> None:
    """``L000`` (top) .. ``L127`` (bottom): every layer has d00..d19; the bottom holds the 2,000 files."""
    top = max(LAYER_COUNTS)
    for i in range(top):
        for d in range(DIRS):
            folder = root / f"L{i:03d}" / f"d{d:02d}"
            folder.mkdir(parents=True)
            (folder / f"layer{i:03d}").write_bytes(b"")
            if i == top - 1:
                for f in range(FILES_PER_DIR):
                    (folder / f"f{f:03d}").write_bytes(b"x")


def _build_bigdir(root: Path) -> None:
    big = root / "lower" / "big"
    big.mkdir(parents=True)
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(BIG_ENTRIES):
            os.close(os.open(f"f{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _lowers(n: int) -> str:
    """The bottom *n* layers, topmost first, as ``lowerdir=`` takes them: relative to the layers' folder,
    the mount's working directory, as 128 absolute paths would not fit the kernel's one-page option string."""
    top = max(LAYER_COUNTS)
    return ":".join(f"L{i:03d}" for i in range(top - n, top))


# -- one mount ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _mounted(system: System, lowers: str, base: Path) -> Iterator[tuple[Path, int | None]]:
    """A fresh mount of *lowers* with an empty upper; always unmounted."""
    safe_rmtree(base)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    pid: int | None = None
    try:
        pid = system.mount(Path(lowers), upper, work, mnt)
        yield mnt, pid
    finally:
        system.unmount(mnt, pid)
        safe_rmtree(base)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# -- the scenarios ------------------------------------------------------------------------------


def run_layers(system: System, layers: Path, base: Path, rnd: int) -> list[Sample]:
    names = [f"d{d:02d}/f{f:03d}".encode() for d in range(DIRS) for f in range(FILES_PER_DIR)]
    out = []
    for n in LAYER_COUNTS:
        with contextlib.chdir(layers), _mounted(system, _lowers(n), base) as (mnt, _pid):
            root = os.fsencode(mnt)
            drop_caches()
            t0 = time.perf_counter()
            for name in names:
                os.lstat(os.path.join(root, name))
            out.append(Sample(system.name, f"layers-{n}", rnd, time.perf_counter() - t0))
    return out


def _on_fresh_mount(
    system: System, lower: str, base: Path, action: Callable[[Path], None]
) -> tuple[float, float | None]:
    """Seconds *action* takes on a fresh mount with the kernel's caches dropped, and the daemon's peak
    memory meanwhile above its resident size once mounted, in bytes (None without a daemon)."""
    with _mounted(system, lower, base) as (mnt, pid):
        os.stat(mnt)
        rss = _rss_bytes(pid) if pid else 0
        if pid:
            reset_peak_rss(pid)
        drop_caches()
        t0 = time.perf_counter()
        action(mnt)
        seconds = time.perf_counter() - t0
        return seconds, (peak_rss_mib(pid) * 1024 * 1024 - rss if pid else None)


def _list(mnt: Path) -> None:
    with os.scandir(mnt / "big") as it:
        count = sum(1 for _ in it)
    if count != BIG_ENTRIES:
        raise BenchError(f"listed {count} entries, not {BIG_ENTRIES}")


def _ls_l(mnt: Path) -> None:
    subprocess.run(["ls", "-l", str(mnt / "big")], stdout=subprocess.DEVNULL, check=True, timeout=1800)


def run_bigdir(system: System, bigdir: Path, base: Path, rnd: int) -> list[Sample]:
    lower = str(bigdir / "lower")
    listed, mem_list = _on_fresh_mount(system, lower, base, _list)
    lsl, mem_lsl = _on_fresh_mount(system, lower, base, _ls_l)
    out = [Sample(system.name, "bigdir-list", rnd, listed), Sample(system.name, "bigdir-ls-l", rnd, lsl)]
    if mem_list is not None and mem_lsl is not None:
        out.append(Sample(system.name, "bigdir-mem", rnd, max(mem_list, mem_lsl) / BIG_ENTRIES))
    return out


def run_mount(system: System, layers: Path, base: Path, rnd: int) -> list[Sample]:
    """Mount and unmount a 16-layer stack a few times; each sample is one mount's wall time."""
    out = []
    lowers = _lowers(16)
    for _ in range(MOUNTS_PER_ROUND):
        safe_rmtree(base)
        upper, work, mnt = base / "upper", base / "work", base / "mnt"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            with contextlib.chdir(layers):
                system._start(Path(lowers), upper, work, mnt, ())
            wait_until(functools.partial(_is_mounted, mnt, system.fstype), 60, f"{system.name} to mount", step=0.0005)
            out.append(Sample(system.name, "mount", rnd, time.perf_counter() - t0))
        finally:
            system.unmount(mnt, None)  # pyunionfs's umount waits for its daemon; the others have none to wait for
            safe_rmtree(base)
    return out


def _is_mounted(mnt: Path, fstype: str) -> bool:
    return mount_fstype(mnt) == fstype


# -- the report ---------------------------------------------------------------------------------


def _rows(samples: list[Sample]) -> list[str]:
    seen: dict[str, None] = {}
    for s in samples:
        seen.setdefault(s.row, None)
    return list(seen)


def report(samples: list[Sample], systems: list[str]) -> str:
    """A markdown table: the median of each (row, system), ratios to fuse-overlayfs and to 1 layer."""
    med: dict[tuple[str, str], float] = {}
    for row in _rows(samples):
        for name in systems:
            vals = [s.value for s in samples if s.row == row and s.system == name]
            if vals:
                med[row, name] = statistics.median(vals)
    head = ["row", *systems]
    if SUBJECT in systems and REFERENCE_FUSE in systems:
        head.append(f"{SUBJECT} / {REFERENCE_FUSE}")
    if SUBJECT in systems:
        head.append(f"{SUBJECT} x1")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in _rows(samples):
        unit = "B/entry" if row == "bigdir-mem" else "s"
        cells = [row]
        for name in systems:
            v = med.get((row, name))
            cells.append("—" if v is None else f"{v:.0f} {unit}" if unit != "s" else f"{v:.3f} s")
        if f"{SUBJECT} / {REFERENCE_FUSE}" in head:
            a, b = med.get((row, SUBJECT)), med.get((row, REFERENCE_FUSE))
            cells.append(f"{a / b:.2f}x" if a is not None and b else "—")
        if f"{SUBJECT} x1" in head:
            a, one = med.get((row, SUBJECT)), med.get(("layers-1", SUBJECT))
            cells.append(f"{a / one:.2f}" if row.startswith("layers-") and a is not None and one else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running every system once (default 3)")
    ap.add_argument("--systems", metavar="S,...", default=",".join(SYSTEMS),
                    help=f"which systems (default {', '.join(SYSTEMS)})")  # fmt: skip
    ap.add_argument("--only", metavar="SCENARIO,...", default=",".join(SCENARIOS),
                    help=f"which scenarios (default all: {', '.join(SCENARIOS)})")  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"where the data and the mounts go (default {DEFAULT_WORKDIR})")  # fmt: skip
    ap.add_argument("--out", type=Path, help="also write the table (scale.md) and every sample (scale.json) here")
    ap.add_argument("--rebuild", action="store_true", help="build the layer stacks and the big directory again")
    args = ap.parse_args(argv)
    wanted = [n.strip() for n in args.systems.split(",") if n.strip()]
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in wanted if n not in BY_NAME] + [n for n in only if n not in SCENARIOS]
    if bad or args.rounds < 1:
        ap.error(f"unknown: {', '.join(bad)}" if bad else "--rounds must be positive")
    if os.geteuid() != 0:
        print("bench.scale: must run as root (it mounts and drops caches)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = args.workdir.resolve()
    systems = []
    for name in wanted:
        why = BY_NAME[name].missing()
        if why:
            print(f"bench.scale: {name} not measured: {why}", file=sys.stderr)
        else:
            systems.append(BY_NAME[name])
    layers = _build_once(workdir / "scale-layers", _build_layers, args.rebuild) if {"layers", "mount"} & set(only) \
        else workdir / "scale-layers"
    bigdir = _build_once(workdir / "scale-bigdir", _build_bigdir, args.rebuild) if "bigdir" in only \
        else workdir / "scale-bigdir"
    base = workdir / f"scale-{os.getpid()}"
    samples: list[Sample] = []
    try:
        for rnd in range(args.rounds):
            k = rnd % len(systems)
            for scenario in only:
                for system in systems[k:] + systems[:k]:
                    try:
                        if scenario == "layers":
                            samples += run_layers(system, layers, base, rnd)
                        elif scenario == "bigdir":
                            samples += run_bigdir(system, bigdir, base, rnd)
                        else:
                            samples += run_mount(system, layers, base, rnd)
                    except (BenchError, subprocess.SubprocessError, OSError) as exc:
                        print(f"bench.scale: {system.name} {scenario} round {rnd}: {exc}", file=sys.stderr)
            print(f"bench.scale: round {rnd + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("bench.scale: interrupted", file=sys.stderr)
        return 130
    finally:
        safe_rmtree(base)
    table = report(samples, [s.name for s in systems])
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.md").write_text(table + "\n")
        (args.out / "scale.json").write_text(json.dumps([asdict(s) for s in samples], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
