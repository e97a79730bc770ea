"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mounting import Daemon


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine pyunionfs mounts are served by: ``native`` unless parametrized."""
    return getattr(request, "param", "native")


@pytest.fixture
def mount(tmp_path: Path, engine: str) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``mount(lowers, upper, *options)`` -> a live Daemon, unmounted after the test."""
    daemons: list[Daemon] = []

    def make(lowers, upper=None, *options: str, mnt: Path | None = None, **kw) -> Daemon:
        target = mnt or tmp_path / f"mnt{len(daemons)}"
        target.mkdir(exist_ok=True)
        kw.setdefault("engine", engine)
        d = Daemon(lowers, upper, target, list(options), **kw)
        daemons.append(d)
        return d

    yield make
    errors = []
    for d in reversed(daemons):
        try:
            if d.proc.poll() is None or d.log.exists():
                d.stop()
        except BaseException as exc:  # keep unmounting the others
            errors.append(exc)
    if errors:
        raise errors[0]
