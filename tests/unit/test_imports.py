"""The package's architecture, checked: four parts whose imports run one way, no circles.

Floors, bottom up: ``errors``, ``options`` (the option table) and ``config``
(used by all); ``fs`` (the union
without FUSE); ``fuse`` and ``image`` side by side (neither imports the
other); ``cli`` on top.  A module may import its own floor (its own
subpackage) and the floors below; never one above, and never the package
root (``pyunionfs/__init__.py`` is the public face, it imports inward).
Every import counts: those inside functions and under ``TYPE_CHECKING``
too, as they are the circles a reader has to untangle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pyunionfs"

#: The floor of each part; the parts a floor may import are those on lower floors.
FLOORS: dict[str, int] = {"errors": 0, "options": 1, "config": 2, "fs": 3, "fuse": 4, "image": 4, "cli": 5}


def modules() -> dict[str, Path]:
    """Dotted name (``pyunionfs.fs.union``) of every module, with its file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> Iterator[str]:
    """The pyunionfs modules (or packages) module *name* imports, anywhere in it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "pyunionfs")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "pyunionfs":
                target = node.module or ""
            else:
                continue
            # ``from . import origin`` imports the module pyunionfs.fs.origin
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            yield from subs or [target]


def part(name: str) -> str:
    """``fs`` for pyunionfs.fs.union, ``errors`` for pyunionfs.errors; ``""`` for the root."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    return {name: set(imports(name)) for name in MODULES}


def test_the_four_parts_are_there() -> None:
    assert {part(m) for m in MODULES} >= {"fs", "fuse", "image", "cli", "errors", "config"}
    assert {p for p in (part(m) for m in MODULES) if p} <= set(FLOORS) | {"__main__"}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if part(m) in FLOORS))
def test_imports_run_one_way(name: str) -> None:
    """No import from a higher floor, from a sibling part, or of the package root."""
    here = part(name)
    wrong = []
    for target in sorted(imports(name)):
        there = part(target)
        if there == "":
            wrong.append(f"{target} (the package root)")
        elif there != here and FLOORS[there] >= FLOORS[here]:
            wrong.append(target)
    assert not wrong, f"{name} imports upward or sideways: {', '.join(wrong)}"


def test_no_import_circles() -> None:
    """Among modules (a package's ``__init__`` counts as a module), no cycle at all."""
    edges = {name: {t for t in targets if t in MODULES and t != name} for name, targets in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_what_it_must() -> None:
    """The test above can fail: relative, nested and TYPE_CHECKING imports are all read."""
    assert "pyunionfs.fs.entry" in set(imports("pyunionfs.fs.cache"))  # under TYPE_CHECKING
    assert "pyunionfs.fs.origin" in set(imports("pyunionfs.fs.resolve"))  # from . import origin
    assert "pyunionfs.fuse.mount" in set(imports("pyunionfs.cli.commands"))  # inside a function
