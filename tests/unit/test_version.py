"""One version: the one ``pyunionfs --version`` prints is the one pip installs."""

import tomllib
from pathlib import Path

from pyunionfs.config import VERSION


def test_version_matches_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == VERSION
