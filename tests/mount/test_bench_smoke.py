"""Smoke test of the bench suite: `python -m bench --quick` runs end to end and leaves nothing mounted.

It checks that the harness works (every workload produces a row, pyunionfs gets a number) so the
bench cannot rot between the times someone runs it for real. It never looks at how fast anything
is: speed is reported by the bench, not asserted by tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.workloads import WORKLOADS, check_tool

ROOT = Path(__file__).resolve().parents[2]


def _mount_lines() -> list[str]:
    return Path("/proc/mounts").read_text().splitlines()


@pytest.mark.timeout(600)
def test_quick_bench_runs_every_workload(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the bench mounts overlayfs and drops caches: it needs root")
    out = tmp_path / "results"
    workdir = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--systems", "plain,pyunionfs", "--out", str(out),
         "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        md = (out / "RESULTS.md").read_text()
        raw = json.loads((out / "results.json").read_text())
        header = next(line for line in md.splitlines() if line.startswith("| workload | plain"))
        columns = [c.strip() for c in header.strip("|").split("|")]
        py = columns.index("pyunionfs")
        for w in WORKLOADS:
            for row in w.rows:
                lines = [line for line in md.splitlines() if line.startswith(f"| `{row}` |")]
                assert lines, f"no row for {row} in RESULTS.md:\n{md}"
                cell = [c.strip() for c in lines[0].strip("|").split("|")][py]
                if check_tool(w):
                    assert cell.startswith("skipped"), cell
                else:
                    assert re.fullmatch(r"\d+\.\d+", cell), f"{row}: pyunionfs cell is {cell!r}:\n{md}"
        assert any(s["system"] == "pyunionfs" and s["cpu_seconds"] is not None for s in raw["samples"])
    finally:
        left = [line for line in _mount_lines() if str(tmp_path) in line]
        for line in left:
            subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
    assert not left, f"the bench left mounts behind: {left}"


@pytest.mark.timeout(300)
def test_metacopy_bench_measures_every_row(tmp_path: Path) -> None:
    """`python -m bench.metacopy --quick --rounds 1`: every row for every system and mode, nothing left mounted."""
    if os.geteuid() != 0:
        pytest.skip("the bench mounts overlayfs and drops caches: it needs root")
    from bench.metacopy import DAEMON_ROWS, ROWS, VARIANTS
    from bench.systems import BY_NAME

    out = tmp_path / "results"
    res = subprocess.run(
        [sys.executable, "-m", "bench.metacopy", "--quick", "--rounds", "1", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        doc = json.loads((out / "metacopy.json").read_text())
        assert not doc["meta"]["notes"], doc["meta"]["notes"]
        got = {(s["column"], s["row"]) for s in doc["samples"]}
        for v in VARIANTS:
            rows = ROWS + (DAEMON_ROWS if BY_NAME[v.system].fuse else ())
            assert {(v.label, row) for row in rows} <= got, f"{v.label}: {sorted(got)}"
        md = (out / "metacopy.md").read_text()
        assert all(f"| `{row}` |" in md for row in ROWS + DAEMON_ROWS), md
    finally:
        left = [line for line in _mount_lines() if str(tmp_path) in line]
        for line in left:
            subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
    assert not left, f"the bench left mounts behind: {left}"
