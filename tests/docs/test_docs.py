"""Every command README.md and docs/ show is run here, and its output checked (tests/docs/consoledoc.py).

One case per page.  README's two set-up commands (install, then the whole
suite) are not run here, they are what ``.ci/run`` runs: the last test checks
that it runs exactly them, so README and CI cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.consoledoc import ROOT, norun_blocks, parse, run_page

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Blocks shown but not run must stay rare: raise this only with a reason in the block's page.
MAX_NORUN = 4

#: A repository path written in backticks in the docs: `pyunionfs/fs/cache.py`, `tests/mount/`.
_PATH = re.compile(r"`((?:pyunionfs|tests|bench|contrib|docs)/[\w./-]*)`")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page(page: Path) -> None:
    text = page.read_text()
    run_page(text, _name(page))


def test_few_blocks_are_not_run() -> None:
    skipped = [where for page in PAGES for where in norun_blocks(page.read_text(), _name(page))]
    assert len(skipped) <= MAX_NORUN, f"console blocks not run: {skipped}"


def test_every_page_is_linked_from_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link {_name(page)}"


def test_relative_links_lead_to_files() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{_name(page)} links to missing {target}"


def test_named_files_exist() -> None:
    """A module renamed or removed makes the page that names it fail here, not mislead a reader."""
    for page in PAGES:
        for path in _PATH.findall(page.read_text()):
            assert (ROOT / path).exists(), f"{_name(page)} names missing {path}"


def _readme_setup() -> list[str]:
    """README's set-up block: the first ```sh block, two commands."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^```sh\n(.*?)^```$", text, re.M | re.S)
    assert m, "README has no ```sh block with the set-up commands"
    return m.group(1).splitlines()


def test_ci_runs_exactly_the_readme_commands() -> None:
    setup = _readme_setup()
    assert len(setup) == 2, setup
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in script if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == setup
    assert not any(b.commands for b in parse((ROOT / "README.md").read_text(), "README.md") if not b.run)
