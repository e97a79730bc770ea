"""Run the shell examples of a markdown page and compare their output: docs that cannot rot.

A page's examples are fenced ```` ```console ```` blocks.  In a block, a line
starting ``$ `` is a command (a line ending in ``\\`` continues it on the next
line, written without a prompt); the lines after it, up to the next command,
are its expected output (stdout and stderr together, as a terminal shows them).
In expected output, ``...`` on a line of its own matches any number of lines
(none too), and ``...`` inside a line matches any text.  Each command must
exit 0, unless its expected output ends with a line ``[exit N]``.  A block
fenced ```` ```console norun ```` is shown but not run (it needs something
this machine lacks, such as a registry): those are counted and listed.

Every block of a page runs in order in one ``bash`` process (``cd`` and
variables carry over), in a fresh temporary directory that is its working
directory, with a ``pyunionfs`` on PATH that runs the checked-out package, and
a time limit per command.  Whatever the page leaves mounted under that
directory is lazily unmounted afterwards, whether it passed or not.

Why our own runner and not a library: byexample drives an interactive shell
through pexpect (prompts, terminal echo and line wrapping to untangle, and a
pty per page); cram and its fork prysk read their own ``.t`` files, not
markdown, and would need the examples written twice.  What we need is small:
split fenced blocks, feed one bash, match with ``...``.  About 200 lines here
that the tests below show can fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The repository whose package the examples' ``pyunionfs`` runs.
ROOT = Path(__file__).resolve().parents[2]

#: Seconds one command may take before the page fails (a mount takes well under one).
COMMAND_TIMEOUT = 30.0

_EXIT = re.compile(r"^\[exit (\d+)\]$")


@dataclass
class Command:
    """One ``$ `` command of a page: what to run and what it must print."""

    line: int  # 1-based line of the ``$ `` in the page
    text: str  # as given to bash, continuation lines included
    expected: list[str] = field(default_factory=list)
    status: int = 0


@dataclass
class Block:
    """One fenced console block."""

    line: int  # 1-based line of the opening fence
    run: bool
    commands: list[Command] = field(default_factory=list)


class DocError(AssertionError):
    """A page's example is malformed or did not do what the page says."""


def parse(text: str, name: str = "<page>") -> list[Block]:
    """The console blocks of a markdown *text*, commands split from their expected output."""
    blocks: list[Block] = []
    current: Block | None = None
    continuing = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            info = stripped[3:].split() if stripped.startswith("```") else []
            if info[:1] == ["console"]:
                if info[1:] not in ([], ["norun"]):
                    raise DocError(f"{name}:{number}: unknown console fence {stripped!r}")
                current = Block(number, run=info[1:] != ["norun"])
                blocks.append(current)
            continue
        if stripped == "```":
            if continuing:
                raise DocError(f"{name}:{number}: the block ends inside a continued command")
            current = None
            continue
        if continuing:
            cmd = current.commands[-1]
            cmd.text += "\n" + line
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            current.commands.append(Command(number, line[2:]))
            continuing = line.endswith("\\")
        elif not current.commands:
            raise DocError(f"{name}:{number}: output before the first command of the block")
        else:
            current.commands[-1].expected.append(line)
    if current is not None:
        raise DocError(f"{name}:{current.line}: console block never closed")
    for block in blocks:
        for cmd in block.commands:
            if cmd.expected and (m := _EXIT.match(cmd.expected[-1].strip())):
                cmd.status = int(m.group(1))
                cmd.expected.pop()
    return blocks


def _line_pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in expected.rstrip().split("...")), re.DOTALL)


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether *actual* lines fit *expected* ones (``...`` lines and ``...`` in lines as wildcards)."""
    pats = [None if e.strip() == "..." else _line_pattern(e) for e in expected]
    acts = [a.rstrip() for a in actual]
    # can[i][j]: pats[i:] matches acts[j:]; filled from the end.
    can = [[False] * (len(acts) + 1) for _ in range(len(pats) + 1)]
    can[len(pats)][len(acts)] = True
    for i in range(len(pats) - 1, -1, -1):
        for j in range(len(acts), -1, -1):
            pat = pats[i]
            if pat is None:
                can[i][j] = can[i + 1][j] or (j < len(acts) and can[i][j + 1])
            else:
                can[i][j] = j < len(acts) and bool(pat.fullmatch(acts[j])) and can[i + 1][j + 1]
    return can[0][0]


def _lines(output: str) -> list[str]:
    lines = output.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _mounts_under(base: Path) -> list[str]:
    """Mount points under *base*, deepest first (mount table escapes decoded)."""
    found = []
    with open("/proc/self/mounts") as f:
        for entry in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), entry.split()[1])
            if point == str(base) or point.startswith(str(base) + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


class Shell:
    """One bash for one page: commands in, (output, status) out, by a random end marker."""

    def __init__(self, cwd: Path, bindir: Path) -> None:
        env = dict(os.environ)
        env.update(
            PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}",
            LC_ALL="C",  # ls sorts bytewise, messages in English
            TZ="UTC",
            PYUNIONFS_STORE=str(cwd / ".store"),  # never the machine's store, whatever a page forgets
            HOME=str(cwd),
        )
        env.pop("PYTHONPATH", None)
        self.marker = "__consoledoc_" + secrets.token_hex(8)
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=cwd, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._buffer = b""

    def run(self, text: str, timeout: float = COMMAND_TIMEOUT) -> tuple[str, int]:
        """Run *text* (stdin from /dev/null); return its output and exit status."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        script = f"{{\n{text}\n}} </dev/null\nprintf '%s %d\\n' {self.marker} $?\n"
        self.proc.stdin.write(script.encode())
        self.proc.stdin.flush()
        end = re.compile(re.escape(self.marker.encode()) + rb" (\d+)\n")
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not (m := end.search(self._buffer)):
            left = deadline - time.monotonic()
            if left <= 0:
                so_far = self._buffer.decode(errors="replace")
                raise DocError(f"timed out after {timeout:.0f} s; output so far:\n{so_far}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise DocError(f"bash exited; output so far:\n{self._buffer.decode(errors='replace')}")
                self._buffer += chunk
        output, self._buffer = self._buffer[: m.start()], self._buffer[m.end() :]
        return output.decode(errors="replace"), int(m.group(1))

    def close(self) -> None:
        """End bash and anything it left running in its session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _wrapper(bindir: Path) -> None:
    """A ``pyunionfs`` that runs this checkout with the test's interpreter (not an installed copy)."""
    exe = bindir / "pyunionfs"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m pyunionfs "$@"\n')
    exe.chmod(0o755)


def run_page(text: str, name: str = "<page>", timeout: float = COMMAND_TIMEOUT) -> int:
    """Run every runnable block of a page; raise DocError on the first difference. Return commands run."""
    blocks = [b for b in parse(text, name) if b.run]
    if not any(b.commands for b in blocks):
        return 0
    base = Path(tempfile.mkdtemp(prefix="docs-"))
    work, bindir = base / "work", base / "bin"
    work.mkdir()
    bindir.mkdir()
    _wrapper(bindir)
    shell = Shell(work, bindir)
    count = 0
    try:
        for block in blocks:
            for cmd in block.commands:
                try:
                    output, status = shell.run(cmd.text, timeout)
                except DocError as exc:
                    raise DocError(f"{name}:{cmd.line}: $ {cmd.text}\n{exc}") from None
                count += 1
                if status != cmd.status or not matches(cmd.expected, _lines(output)):
                    raise DocError(
                        f"{name}:{cmd.line}: $ {cmd.text}\n"
                        f"--- expected (exit {cmd.status}):\n" + "\n".join(cmd.expected) + "\n"
                        f"--- got (exit {status}):\n{output}"
                    )
    finally:
        shell.close()
        for point in _mounts_under(base):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    return count


def norun_blocks(text: str, name: str) -> list[str]:
    """``name:line`` of each block the page shows without running it."""
    return [f"{name}:{b.line}" for b in parse(text, name) if not b.run]
