"""Lint and type checks run with the suite, so CI enforces them, not just a laptop."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    if shutil.which(name):
        return [name]
    pytest.fail(f"{name} is not installed: pip install -e '.[test]'")


def test_ruff() -> None:
    cmd = _tool("ruff") + ["check", "pyunionfs", "tests", "bench", "contrib"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy() -> None:
    res = subprocess.run(_tool("mypy") + ["pyunionfs", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
