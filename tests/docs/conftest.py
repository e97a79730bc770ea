"""Lists, at the end of a run, the docs' console blocks that are shown but not run."""

from __future__ import annotations

import pytest

from tests.docs.consoledoc import ROOT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.docs.consoledoc import norun_blocks
    from tests.docs.test_docs import PAGES

    ran = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])]
    if not any(getattr(r, "nodeid", "").startswith("tests/docs/test_docs.py") for r in ran):
        return
    skipped = [w for page in PAGES for w in norun_blocks(page.read_text(), str(page.relative_to(ROOT)))]
    listed = ", ".join(skipped) or "none"
    terminalreporter.write_line(f"docs: {len(skipped)} console block(s) shown but not run: {listed}")
