"""Metadata-only copy-up (``metacopy=on``): ``chown -R`` over the bench's lower, side by side in one run.

Why: without metacopy, changing the owner, mode or times of a lower file copies all its data into
the upper (``chown -R`` over an image's /usr copies the image); the kernel's ``metacopy=on``, and
pyunionfs's ``-o metacopy=on``, copy only the metadata, and the data at the first write. This
measures what that saves and what it costs later, on the main bench's lower (``--quick``: its tiny
profile), for the kernel's overlayfs and pyunionfs with metacopy on and off, and fuse-overlayfs
(which has no metacopy), each mounted fresh on an empty upper. Rows, in this order on one mount:

- ``chown-R``: wall time of ``chown -R 1234:1234 MNT``, caches dropped after mounting;
- ``upper-bytes``: the upper's allocated bytes afterwards (``st_blocks`` of each inode, after a
  sync): near zero when only metadata was copied, the lower's size when the data was;
- ``read-after``: walk the mount and read every regular file, caches dropped first (with metacopy
  the data still comes from the lower);
- ``first-write``: 4 KiB written at offset 0 of the 1 GiB file (open, write, close), caches dropped
  first: the data copy that metacopy deferred (without it, ``chown-R`` paid for it);
- ``chown-R-cpu``, ``chown-R-rss`` (FUSE daemons): the daemon's CPU seconds and peak RSS across ``chown-R``.

Rounds interleave the systems (order rotated per round); the medians are printed as a markdown table
with the ratios of pyunionfs ``metacopy=on`` to the kernel's ``metacopy=on`` and to fuse-overlayfs,
and written with every sample to --out.

    python -m bench.metacopy [--rounds N] [--quick] [--out DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import dataset as datasets
from .cli import DEFAULT_WORKDIR, HERE, _terminate
from .osutil import BenchError, cpu_seconds, drop_caches, peak_rss_mib, reset_peak_rss, safe_rmtree
from .profile import FULL, QUICK, MiB
from .report import machine_info
from .systems import BY_NAME, KERNEL, REFERENCE_FUSE, SUBJECT

OWNER = "1234:1234"
ROWS = ("chown-R", "upper-bytes", "read-after", "first-write")
DAEMON_ROWS = ("chown-R-cpu", "chown-R-rss")


@dataclass(frozen=True)
class Variant:
    """One system in one mode: a column of the table."""

    system: str
    mode: str  # "metacopy=on", "metacopy=off" or "default"
    extra: tuple[str, ...]  # -o options, in the system's own spelling

    @property
    def label(self) -> str:
        return self.system if self.mode == "default" else f"{self.system} {self.mode}"


# The kernel's default comes from the overlay module's `metacopy` parameter (CONFIG_OVERLAY_FS_METACOPY),
# which a distribution may turn on: its "off" column says metacopy=off so that it is off everywhere.
VARIANTS = (
    Variant(KERNEL, "metacopy=on", ("metacopy=on",)),  # implies redirect_dir=on, as metacopy needs
    Variant(SUBJECT, "metacopy=on", ("metacopy=on",)),
    Variant(KERNEL, "metacopy=off", ("metacopy=off",)),
    Variant(SUBJECT, "default", ()),
    Variant(REFERENCE_FUSE, "default", ()),
)
KERNEL_ON, SUBJECT_ON = VARIANTS[0].label, VARIANTS[1].label  # the ratios: SUBJECT_ON over KERNEL_ON, fuse-overlayfs


@dataclass
class Sample:
    system: str
    mode: str
    column: str
    row: str
    round: int
    value: float  # seconds, bytes (upper-bytes) or MiB (chown-R-rss)


# -- the measurements ---------------------------------------------------------------------------


def _prefault(scratch: Path, nbytes: int) -> None:
    """Write and delete *nbytes* (untimed): memory a VM with free page reporting handed back is reused
    before the timed part, not faulted in during it (see ``Context.prefault`` in bench/workloads.py)."""
    path = scratch / "prefault"
    block = b"\1" * MiB
    with open(path, "wb") as f:
        for _ in range(max(nbytes // MiB, 1)):
            f.write(block)
    path.unlink()


def _allocated(top: Path) -> int:
    """Bytes allocated under *top* (``st_blocks`` * 512 of every inode, once), the folders included."""
    seen: set[int] = set()
    total = os.lstat(top).st_blocks * 512
    for folder, dirs, files in os.walk(os.fsencode(top)):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            if st.st_ino not in seen:  # one filesystem: the inode number names the inode
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def _regular_bytes(top: Path) -> int:
    """Sum of the sizes of the regular files under *top* (what ``_read_all`` must read)."""
    total = 0
    for folder, _dirs, files in os.walk(os.fsencode(top)):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _read_all(top: Path) -> int:
    """Walk *top* and read every regular file to its end (1 MiB reads); return the bytes read."""
    buf = bytearray(MiB)
    total = 0
    stack = [os.fsencode(top)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    with open(entry.path, "rb", buffering=0) as f:
                        while n := f.readinto(buf):
                            total += n
    return total


def run_variant(
    variant: Variant, ds: datasets.Dataset, base: Path, rnd: int, expected: int
) -> tuple[list[Sample], str | None]:
    """Mount *variant* fresh over the lower, measure every row on that one mount, unmount.
    Returns the samples and, when a step failed, why (the rows before it are kept)."""
    system = BY_NAME[variant.system]
    samples: list[Sample] = []
    error: str | None = None

    def add(row: str, value: float) -> None:
        samples.append(Sample(variant.system, variant.mode, variant.label, row, rnd, value))

    safe_rmtree(base)
    upper, work, mnt, scratch = base / "upper", base / "work", base / "mnt", base / "scratch"
    for d in (upper, work, mnt, scratch):
        d.mkdir(parents=True)
    prefault = 2 * ds.profile.big_file
    pid: int | None = None
    cpu0 = 0.0
    try:
        pid = system.mount(ds.lower, upper, work, mnt, extra=variant.extra)
        os.stat(mnt)
        drop_caches()
        _prefault(scratch, prefault)
        if pid is not None:
            reset_peak_rss(pid)
            cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        subprocess.run(["chown", "-R", OWNER, str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       check=True, timeout=3600)  # fmt: skip
        add("chown-R", time.perf_counter() - t0)
        if pid is not None:
            add("chown-R-cpu", cpu_seconds(pid) - cpu0)
            add("chown-R-rss", peak_rss_mib(pid))
        big = mnt / ds.big_rel
        if os.lstat(big).st_uid != 1234:
            raise BenchError(f"chown -R left {ds.big_rel} owned by uid {os.lstat(big).st_uid}")
        os.sync()
        add("upper-bytes", _allocated(upper))

        drop_caches()
        _prefault(scratch, prefault)
        t0 = time.perf_counter()
        got = _read_all(mnt)
        add("read-after", time.perf_counter() - t0)
        if got != expected:
            raise BenchError(f"read {got} bytes through the mount, the lower's regular files hold {expected}")

        drop_caches()
        _prefault(scratch, prefault)
        t0 = time.perf_counter()
        fd = os.open(big, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xa5" * 4096, 0)
        finally:
            os.close(fd)
        add("first-write", time.perf_counter() - t0)
        os.sync()
    except subprocess.CalledProcessError as exc:
        error = f"chown -R exited {exc.returncode}: {(exc.stderr or b'').decode(errors='replace')[-300:]}"
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        error = str(exc)
    finally:
        system.unmount(mnt, pid)
        safe_rmtree(base)
    return samples, error


# -- the report ---------------------------------------------------------------------------------


def _cell(row: str, value: float | None) -> str:
    if value is None:
        return "—"
    if row == "upper-bytes":
        return f"{value / MiB:.1f} MiB"
    return f"{value:.1f} MiB" if row == "chown-R-rss" else f"{value:.3f} s"


def report(samples: list[Sample], columns: list[str]) -> str:
    """A markdown table of the median of each (row, column), with pyunionfs metacopy=on's ratios."""
    med: dict[tuple[str, str], float] = {}
    for row in ROWS + DAEMON_ROWS:
        for col in columns:
            vals = [s.value for s in samples if s.row == row and s.column == col]
            if vals:
                med[row, col] = statistics.median(vals)
    refs = [r for r in (KERNEL_ON, REFERENCE_FUSE) if r in columns and SUBJECT_ON in columns]
    head = ["row", *columns, *(f"{SUBJECT_ON} / {r}" for r in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS + DAEMON_ROWS:
        if not any((row, col) in med for col in columns):
            continue
        cells = [f"`{row}`", *(_cell(row, med.get((row, col))) for col in columns)]
        for ref in refs:
            a, b = med.get((row, SUBJECT_ON)), med.get((row, ref))
            cells.append(f"{a / b:.2f}x" if a is not None and b else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _clean_stale(workdir: Path) -> None:
    """Remove the scratch folders of earlier runs that died (their pid is gone), unmounting what they left."""
    for d in workdir.glob("metacopy-*"):
        pid = d.name.removeprefix("metacopy-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            safe_rmtree(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.metacopy", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, help=f"rounds (default {FULL.rounds}; {QUICK.rounds} with --quick)")
    ap.add_argument("--quick", action="store_true", help="the quick profile's tiny lower: a smoke run")
    ap.add_argument("--out", type=Path, help="where metacopy.md and metacopy.json go (default bench/results/metacopy/, "
                    "bench/results/quick/metacopy/ with --quick)")  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"dataset cache and scratch mounts (default {DEFAULT_WORKDIR})")  # fmt: skip
    args = ap.parse_args(argv)
    profile = QUICK if args.quick else FULL
    rounds = args.rounds or profile.rounds
    if rounds < 1:
        ap.error("--rounds must be positive")
    if os.geteuid() != 0:
        print("bench.metacopy: must run as root (it mounts and drops caches)", file=sys.stderr)
        return 2
    out_dir = (args.out or HERE / "results" / ("quick/metacopy" if args.quick else "metacopy")).resolve()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = args.workdir.resolve()
    variants, notes = [], []
    for v in VARIANTS:
        why = BY_NAME[v.system].missing()
        if why:
            notes.append(f"{v.label} not measured: {why}")
            print(f"bench.metacopy: {notes[-1]}", file=sys.stderr)
        else:
            variants.append(v)
    load0 = os.getloadavg()[0]
    _clean_stale(workdir)
    ds = datasets.ensure(workdir, profile)
    expected = _regular_bytes(ds.lower)
    base = workdir / f"metacopy-{os.getpid()}"
    samples: list[Sample] = []
    interrupted = False
    try:
        for rnd in range(rounds):
            k = rnd % len(variants)
            for v in variants[k:] + variants[:k]:
                got, error = run_variant(v, ds, base, rnd, expected)
                samples += got
                done = ", ".join(_cell(x.row, x.value) + f" {x.row}" for x in got if x.row in ROWS)
                print(f"bench.metacopy: round {rnd + 1}, {v.label}: {done}", file=sys.stderr, flush=True)
                if error:
                    notes.append(f"{v.label} round {rnd}: {error}")
                    print(f"bench.metacopy: {notes[-1]}", file=sys.stderr, flush=True)
            print(f"bench.metacopy: round {rnd + 1} of {rounds} done", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("bench.metacopy: interrupted; writing what was measured", file=sys.stderr)
    finally:
        safe_rmtree(base)
    table = report(samples, [v.label for v in variants])
    print(table)
    for note in notes:
        print(f"- {note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metacopy.md").write_text(table + "\n" + "".join(f"\n- {n}" for n in notes) + "\n")
    meta = {
        "command": ["python", "-m", "bench.metacopy", *(argv if argv is not None else sys.argv[1:])],
        "profile": profile.name, "rounds": rounds, "entries": ds.meta["entries"], "lower_bytes": ds.meta["bytes"],
        "regular_bytes": expected, "machine": machine_info(),
        "versions": {v.system: BY_NAME[v.system].version() for v in variants},
        "load": [load0, os.getloadavg()[0]], "notes": notes, "interrupted": interrupted,
    }  # fmt: skip
    doc = {"meta": meta, "samples": [asdict(s) for s in samples]}
    (out_dir / "metacopy.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"bench.metacopy: wrote {out_dir}/metacopy.md and metacopy.json", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
