"""What a run leaves behind: RESULTS.md (tables), results.json (every sample), ratios.png (chart).

The Markdown is meant to be pasted into an issue as is: machine and versions first (a number
without them means little), then median seconds with min–max spread per system, then ratios.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .dataset import Dataset
from .systems import KERNEL, REFERENCE_FUSE, SUBJECTS, System
from .workloads import Sample, Workload

REPO = Path(__file__).resolve().parent.parent


def _cmd(cmd: Sequence[str]) -> str:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _dpkg(pkg: str) -> str:
    return _cmd(["dpkg-query", "-W", "-f=${Version}", pkg]) or "not installed"


def machine_info() -> dict[str, str]:
    """The facts a reader needs to compare these numbers with their own."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"

    def meta(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?"
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "pyunionfs"])
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": os.uname().release,
        "Debian": debian,
        "disk (work dir)": "",
        "Python": f"{platform.python_version()} ({sys.executable})",
        "pyunionfs": f"{meta('pyunionfs')}, commit {commit}" + (" + uncommitted pyunionfs/ changes" if dirty else ""),
        "pyfuse3": meta("pyfuse3"),
        "trio": meta("trio"),
        "libfuse3 (libfuse3-3)": _dpkg("libfuse3-3"),
        "fuse-overlayfs": _dpkg("fuse-overlayfs"),
        "unionfs-fuse": _dpkg("unionfs-fuse"),
        "fio": _dpkg("fio"),
        "git": _dpkg("git"),
        "tar": _dpkg("tar"),
    }


def _fstype_of(path: Path) -> str:
    out = _cmd(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(path)])
    return " ".join(out.split()) or "?"


def _fmt_s(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


class Table:
    """Medians per (system, row), and the messages of failed or skipped cells."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def values(self, system: str, row: str, attr: str = "seconds") -> list[float]:
        out = []
        for s in self.samples:
            v = getattr(s, attr)
            if s.system == system and s.row == row and v is not None:
                out.append(float(v))
        return out

    def median(self, system: str, row: str, attr: str = "seconds") -> float | None:
        v = self.values(system, row, attr)
        return statistics.median(v) if v else None

    def errors(self, system: str, row: str) -> list[str]:
        return [s.error for s in self.samples if s.system == system and s.row == row and s.error]

    def builds(self, system: str) -> list[str]:
        """Distinct code fingerprints measured for *system*, in the order first seen."""
        seen: dict[str, None] = {}
        for s in self.samples:
            if s.system == system and s.build:
                seen.setdefault(s.build)
        return list(seen)

    def ratio(self, num: str, den: str, row: str) -> float | None:
        a, b = self.median(num, row), self.median(den, row)
        return a / b if a is not None and b else None


def write_all(
    out: Path,
    samples: list[Sample],
    systems: list[System],
    skipped_systems: dict[str, str],
    workloads: list[Workload],
    skipped_workloads: dict[str, str],
    dataset: Dataset,
    rounds: int,
    started: str,
    elapsed: float,
    argv: list[str],
    load: str = "",
) -> Path:
    """Write RESULTS.md, results.json and ratios.png into *out*; return the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["disk (work dir)"] = _fstype_of(dataset.root)
    if load:
        info["load average"] = load
    versions = {s.name: s.version() + (f" (sources {fp})" if (fp := s.fingerprint()) else "") for s in systems}
    table = Table(samples)
    rows = [r for w in workloads for r in w.rows]
    names = [s.name for s in systems]
    fuse_names = [s.name for s in systems if s.fuse]
    png_note = _chart(out / "ratios.png", table, rows, fuse_names)
    raw = {
        "started": started,
        "elapsed_seconds": round(elapsed, 1),
        "argv": argv,
        "rounds": rounds,
        "profile": asdict(dataset.profile),
        "dataset": dataset.meta,
        "machine": info,
        "systems": versions,
        "skipped_systems": skipped_systems,
        "skipped_workloads": skipped_workloads,
        "rows": rows,
        "samples": [asdict(s) for s in samples],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    md = _markdown(table, rows, workloads, names, fuse_names, versions, skipped_systems, skipped_workloads, info,
                   dataset, rounds, started, elapsed, argv, png_note)  # fmt: skip
    path = out / "RESULTS.md"
    path.write_text(md)
    return path


def _markdown(
    table: Table,
    rows: list[str],
    workloads: list[Workload],
    names: list[str],
    fuse_names: list[str],
    versions: dict[str, str],
    skipped_systems: dict[str, str],
    skipped_workloads: dict[str, str],
    info: dict[str, str],
    dataset: Dataset,
    rounds: int,
    started: str,
    elapsed: float,
    argv: list[str],
    png_note: str,
) -> str:
    p = dataset.profile
    meta = dataset.meta
    notes: list[str] = []

    def note(msg: str) -> str:
        if msg not in notes:
            notes.append(msg)
        return f"[^{notes.index(msg) + 1}]"

    row_tool = {r: skipped_workloads.get(w.name) for w in workloads for r in w.rows}
    L: list[str] = []
    L.append("# pyunionfs benchmark results\n")
    L.append(f"Run {started}, took {elapsed / 60:.1f} min: `{' '.join(argv)}` — profile **{p.name}**, "
             f"{rounds} round(s), every workload on every system in each round "
             "(system order rotated per round).\n")  # fmt: skip
    for n in names:
        builds = table.builds(n)
        if len(builds) > 1:
            L.append(f"> **Warning:** the {n} sources changed during this run: {len(builds)} versions were "
                     f"measured ({', '.join(builds)}; see `build` in results.json). Rows mix them; rerun to "
                     "compare one version.\n")  # fmt: skip
    L.append("## Machine and versions\n")
    L.append("| | |\n| --- | --- |")
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L.append("")
    L.append("## Systems\n")
    for n in names:
        L.append(f"- **{n}**: {versions[n]}")
    for n, why in skipped_systems.items():
        L.append(f"- **{n}**: skipped — {why}")
    L.append("")
    L.append("## Dataset (the lower layer)\n")
    L.append(f"{meta.get('entries')} entries ({int(meta.get('bytes', 0)) / 2**20:.0f} MiB, stdlib copy + git repo of "  # type: ignore[call-overload]
             f"{meta.get('repo_files')} files + /usr/share files), big file {p.big_file / 2**20:.0f} MiB, "
             f"{meta.get('modules')} modules to import, sequential writes of {p.write_size / 2**20:.0f} MiB, "
             f"{p.small_files} small files, {p.rewrite_files} files rewritten by `container`, fio reads "
             f"{p.randread_bytes / 2**20:.0f} MiB; `pkg-manager` unpacks {p.pkg_files} entries, verifies "
             f"{p.pkg_verify_files} files and byte-compiles {', '.join(p.pkg_compile)}.\n")  # fmt: skip

    L.append("## Times\n")
    L.append("Median seconds (min–max over the rounds), lower is better. Ratios are of medians.\n")
    head = ["workload", *names]
    has_k, has_f = KERNEL in names, REFERENCE_FUSE in names
    # Every pyunionfs engine measured gets its ratios to the kernel and to fuse-overlayfs.
    refs = [d for d, has in ((KERNEL, has_k), (REFERENCE_FUSE, has_f)) if has]
    ratio_cols = [(s, d) for s in SUBJECTS if s in names for d in refs]
    head += [f"{s} / {'kernel' if d == KERNEL else d}" for s, d in ratio_cols]
    L.append("| " + " | ".join(head) + " |")
    L.append("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
    for r in rows:
        cells = [f"`{r}`"]
        for n in names:
            v = table.values(n, r)
            errs = table.errors(n, r)
            if row_tool[r]:
                cells.append("skipped" + note(row_tool[r] or ""))
            elif not v:
                cells.append("error" + (note(f"{n}, {r}: {errs[0]}") if errs else ""))
            else:
                cell = _fmt_s(statistics.median(v))
                if len(v) > 1:
                    cell += f" ({_fmt_s(min(v))}–{_fmt_s(max(v))})"
                if errs:
                    cell += " " + note(f"{n}, {r}: {len(errs)} of {len(errs) + len(v)} rounds failed: {errs[0]}")
                cells.append(cell)
        cells += [_fmt_ratio(table.ratio(s, d, r)) for s, d in ratio_cols]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")

    engines = [s for s in SUBJECTS if s in fuse_names]
    if fuse_names and (has_k or has_f or len(engines) > 1):
        L.append("## Ratios of every FUSE system\n")
        L.append("Median time divided by the kernel overlayfs's (and by fuse-overlayfs's); 1.00× is as fast."
                 + (f" The last column compares pyunionfs's engines: {engines[0]} / {engines[1]}."
                    if len(engines) > 1 else "") + "\n")  # fmt: skip
        cols = [(f, KERNEL) for f in fuse_names if has_k] + [
            (f, REFERENCE_FUSE) for f in fuse_names if has_f and f != REFERENCE_FUSE
        ]
        if len(engines) > 1:
            cols.append((engines[0], engines[1]))
        L.append("| workload | " + " | ".join(f"{a} / {'kernel' if b == KERNEL else b}" for a, b in cols) + " |")
        L.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
        for r in rows:
            L.append(f"| `{r}` | " + " | ".join(_fmt_ratio(table.ratio(a, b, r)) for a, b in cols) + " |")
        L.append("")
        L.append(png_note + "\n")

    if fuse_names:
        L.append("## FUSE daemons: CPU time and peak memory\n")
        L.append("Median over the rounds of the daemon's user+system CPU seconds during the timed part, and of its "
                 "peak RSS (VmHWM, reset before the timed part). The kernel and plain have no daemon.\n")  # fmt: skip
        L.append("| workload | " + " | ".join(f"{f} CPU s | {f} RSS MiB" for f in fuse_names) + " |")
        L.append("| --- | " + " | ".join("---: | ---:" for _ in fuse_names) + " |")
        for r in rows:
            cells = []
            for f in fuse_names:
                c, m = table.median(f, r, "cpu_seconds"), table.median(f, r, "peak_rss_mib")
                cells += [f"{c:.2f}" if c is not None else "-", f"{m:.0f}" if m is not None else "-"]
            L.append(f"| `{r}` | " + " | ".join(cells) + " |")
        L.append("")

    L.append("## Workloads\n")
    for w in workloads:
        L.append(f"- `{w.name}`" + (f" (rows {', '.join(f'`{r}`' for r in w.rows)})" if len(w.rows) > 1 else "")
                 + f": {w.doc}.")  # fmt: skip
    L.append("\nEvery run mounts the system fresh on an empty upper. *lower warm, mount fresh*: the lower's caches "
             "are warmed untimed through the lower itself, so the time is the union's own cost. Writes are "
             "followed by an untimed `sync`. For `plain`, read workloads run on the lower itself and write "
             "workloads in a plain folder on the same disk (with copies of the lower files they modify)."
             "\n")  # fmt: skip
    if notes:
        L.append("## Notes\n")
        L += [f"[^{i + 1}]: {n}" for i, n in enumerate(notes)]
        L.append("")
    return "\n".join(L) + "\n"


def _chart(path: Path, table: Table, rows: list[str], fuse_names: list[str]) -> str:
    """Grouped bars of each FUSE system's ratio to the kernel, log scale; returns a line for the Markdown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path.unlink(missing_ok=True)
        return "No chart: matplotlib is not installed (`pip install -e '.[bench]'`)."
    series = {f: [table.ratio(f, KERNEL, r) for r in rows] for f in fuse_names}
    if not any(v for vals in series.values() for v in vals):
        path.unlink(missing_ok=True)
        return "No chart: no ratio to the kernel was measured."
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(rows) + 2), 5.5))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [v if v else 0 for v in vals], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=45, ha="right")
    ax.set_ylabel("median time / kernel overlayfs (log scale)")
    ax.set_title("FUSE unions vs the kernel's overlayfs (1 = as fast; lower is better)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![ratios to the kernel]({path.name})"
