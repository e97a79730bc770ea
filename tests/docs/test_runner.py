"""The docs runner can fail: a wrong line, a wrong exit status, a hung command, a malformed block."""

from __future__ import annotations

import secrets

import pytest

from tests.docs.consoledoc import DocError, matches, norun_blocks, parse, run_page


def page(*lines: str, fence: str = "console") -> str:
    return "Some prose.\n\n```" + fence + "\n" + "\n".join(lines) + "\n```\n\nMore prose.\n"


def test_parse_splits_commands_continuations_and_exit_lines() -> None:
    [block] = parse(page("$ echo a \\", "  b", "a b", "$ false", "[exit 1]", "$ true"))
    assert block.run and block.line == 3
    assert [(c.line, c.text, c.expected, c.status) for c in block.commands] == [
        (4, "echo a \\\n  b", ["a b"], 0),
        (7, "false", [], 1),
        (9, "true", [], 0),
    ]


def test_ellipsis_matches_lines_and_text() -> None:
    assert matches(["a", "...", "z"], ["a", "z"])
    assert matches(["a", "...", "z"], ["a", "b", "c", "z"])
    assert matches(["size ... bytes"], ["size 12 bytes"])
    assert matches(["..."], [])
    assert not matches(["a", "...", "z"], ["a", "b"])
    assert not matches(["size ... bytes"], ["size 12 byte"])
    assert not matches(["a"], ["a", "b"])
    assert not matches(["a", "b"], ["a"])
    assert not matches(["a.c"], ["abc"])  # only ... is special


def test_a_page_runs_in_one_shell_in_order() -> None:
    text = page("$ cd \"$(mktemp -d -p .)\" && X=1", "$ echo $X; pwd", "1", "/.../work/tmp...",
                "$ echo out; echo err >&2", "out", "err", "$ (exit 3)", "[exit 3]")
    assert run_page(text, "ok.md") == 4


def test_pyunionfs_on_path_is_this_checkout() -> None:
    assert run_page(page("$ pyunionfs --version", "pyunionfs ..."), "v.md") == 1


@pytest.mark.parametrize(
    ("lines", "complaint"),
    [
        (("$ echo hello", "hullo"), "--- expected (exit 0):\nhullo"),  # a wrong expected line
        (("$ echo hello", "hello", "extra"), "got (exit 0):\nhello"),  # a line the command did not print
        (("$ echo hi; false", "hi"), "got (exit 1)"),  # non-zero exit not announced
        (("$ true", "[exit 2]"), "got (exit 0)"),  # announced exit that did not happen
    ],
)
def test_a_difference_fails_the_page(lines: tuple[str, ...], complaint: str) -> None:
    with pytest.raises(DocError, match="bad.md:4") as info:
        run_page(page(*lines), "bad.md")
    assert complaint in str(info.value)


def test_a_hung_command_times_out() -> None:
    with pytest.raises(DocError, match="timed out after 1 s"):
        run_page(page("$ sleep 30"), "slow.md", timeout=1)


def test_stdin_is_not_the_script() -> None:
    """A command reading stdin gets /dev/null, not the commands after it."""
    assert run_page(page("$ cat", "$ echo after", "after"), "stdin.md") == 2


@pytest.mark.parametrize(
    "text",
    [page("output first"), page("$ echo a \\"), "```console\n$ true\n", page("$ true", fence="console maybe")],
)
def test_malformed_blocks_are_refused(text: str) -> None:
    with pytest.raises(DocError):
        parse(text, "x.md")


def test_norun_blocks_are_listed_not_run() -> None:
    text = page("$ exit 1", fence="console norun")
    assert run_page(text, "n.md") == 0
    assert norun_blocks(text, "n.md") == ["n.md:3"]


def test_a_failing_page_leaves_nothing_mounted() -> None:
    """Teardown unmounts what the page mounted under its directory, however the page ended."""
    mnt = "mnt-" + secrets.token_hex(6)
    text = page(f"$ mkdir lower upper {mnt} && pyunionfs mount lower upper {mnt}", f"$ mountpoint -q {mnt}", "$ false")
    with pytest.raises(DocError, match="got \\(exit 1\\)"):
        run_page(text, "mounts.md")
    with open("/proc/self/mounts") as f:
        assert not [line for line in f if mnt in line]
