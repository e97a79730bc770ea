"""contrib/build.py, the image-build example: layers, whiteouts, the build cache, failures.

The base tree is made here without network: busybox if installed, else dash and
mkdir/rm/cat with the libraries ldd lists. Builds run the script as a subprocess
(with a timeout); every build directory is checked for leftover mounts afterwards,
and anything found is lazily unmounted before tmp_path can be removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.mount import unescape_mountinfo
from tests.support.mounting import require_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="build.py needs root: chroot, whiteout devices"),
    pytest.mark.timeout(90),
]

BUILD = Path(__file__).resolve().parents[2] / "contrib" / "build.py"
TOOLS = ("sh", "mkdir", "rm", "cat")
BUILDFILE = """\
# the test image
FROM base
RUN echo hello > /hello.txt
RUN rm /etc/gone.txt
COPY files/greeting.txt /srv/
RUN mkdir -p /var/data && \\
    cat /srv/greeting.txt
"""
STEPS = ["RUN echo hello > /hello.txt", "RUN rm /etc/gone.txt", "COPY files/greeting.txt /srv/",
         "RUN mkdir -p /var/data && cat /srv/greeting.txt"]


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo", "rb") as f:
        points = [os.fsdecode(unescape_mountinfo(line.split()[4])) for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _copy_with_libs(exe: str, base: Path, name: str) -> None:
    dest = base / "bin" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(exe, dest)  # follows symlinks: a real file in the base
    ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=30)  # static: exit 1
    for lib in re.findall(r"(?:^|\s)(/\S+)", ldd.stdout):
        (base / lib[1:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, base / lib[1:])


def make_base(base: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox:
        _copy_with_libs(busybox, base, "busybox")
        for name in TOOLS:
            (base / "bin" / name).symlink_to("busybox")
    else:
        for name in TOOLS:
            exe = shutil.which(name)
            assert exe, f"{name} is missing on this machine"
            _copy_with_libs(exe, base, name)
    (base / "etc").mkdir()
    (base / "etc" / "gone.txt").write_text("deleted by a RUN\n")
    (base / "etc" / "keep.txt").write_text("kept\n")


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, p.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
    return out


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A build folder with base/, files/ and Buildfile; no mount may outlive the test there."""
    require_fuse()
    work = tmp_path / "build"
    make_base(work / "base")
    (work / "files").mkdir()
    (work / "files" / "greeting.txt").write_text("hi there\n")
    (work / "Buildfile").write_text(BUILDFILE)
    yield work
    left = _mounts_below(work)
    for point in reversed(left):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    assert not left, f"build.py left mounts behind: {left}"


def build(work: Path, buildfile: str = "Buildfile") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD), buildfile, "--store", "store"], cwd=work,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def layers(out: str) -> list[Path]:
    """The layer directories printed at the end, topmost first."""
    block = out.split("Layers (topmost first):\n", 1)[1].split("\n\n", 1)[0]
    return [Path(line.strip()) for line in block.splitlines()]


def history(out: str) -> list[list[str]]:
    """The history table's rows (DIFF ID, CREATED, CREATED BY, SIZE, CACHED), newest first."""
    block = out.split("\nDIFF ID", 1)[1].split("\n\n", 1)[0]
    return [re.split(r"\s{3,}", line) for line in block.splitlines()[1:]]


def test_build_layers_then_cache_then_rebuild_the_changed_step(work: Path, mount) -> None:
    base_before = snapshot(work / "base")
    first = build(work)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(" ---> Running in ") == 3 and "Using cache" not in first.stdout
    assert "hi there" in first.stdout  # the RUN's own output is shown
    stack = layers(first.stdout)
    assert len(stack) == 5 and stack[-1] == work / "base"
    rows = history(first.stdout)
    assert [r[2] for r in rows[:-1]] == [*reversed(STEPS)]
    assert rows[-1] == ["<base>", f"FROM {work / 'base'}"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", r[0]) and r[3].endswith("B") and r[4] == "no" for r in rows[:-1])

    # one JSON record per layer; the layer's tar and applied dir beside it
    for layer, row in zip(stack[:-1], rows, strict=False):
        meta = json.loads((layer.parent / "meta.json").read_text())
        assert meta["key"] == layer.parent.name and meta["created_by"] == row[2]
        assert meta["diff_id"].startswith("sha256:" + row[0]) and meta["created"]
        assert meta["size"] == (layer.parent / "layer.tar").stat().st_size
    # the rm step left a kernel whiteout; the base was only read
    whiteout = (stack[2] / "etc" / "gone.txt").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert snapshot(work / "base") == base_before
    assert list((work / "store" / "tmp").iterdir()) == []

    with mount(stack, None) as d:  # read-only: no upper
        assert (d.mnt / "hello.txt").read_text() == "hello\n"
        assert not os.path.lexists(d.mnt / "etc" / "gone.txt")
        assert (d.mnt / "etc" / "keep.txt").read_text() == "kept\n"
        assert (d.mnt / "srv" / "greeting.txt").read_text() == "hi there\n"
        assert (d.mnt / "var" / "data").is_dir()
        assert sorted(os.listdir(d.mnt)) == sorted([*os.listdir(work / "base"), "hello.txt", "srv", "var"])

    # unchanged build file: every step from the cache, nothing run, the same layers
    second = build(work)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count(" ---> Using cache") == 4 and "Running in" not in second.stdout
    assert layers(second.stdout) == stack
    assert [r[:4] for r in history(second.stdout)] == [r[:4] for r in rows]
    assert all(r[4] == "yes" for r in history(second.stdout)[:-1])

    # the last RUN changed: only that step is built again
    (work / "Buildfile").write_text(BUILDFILE.replace("/var/data", "/var/other"))
    third = build(work)
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count(" ---> Using cache") == 3 and third.stdout.count(" ---> Running in ") == 1
    rebuilt = layers(third.stdout)
    assert rebuilt[1:] == stack[1:] and rebuilt[0] != stack[0]
    assert (rebuilt[0] / "var" / "other").is_dir() and not (rebuilt[0] / "var" / "data").exists()
    assert [r[4] for r in history(third.stdout)[:-1]] == ["no", "yes", "yes", "yes"]


def test_failing_run_stops_the_build_and_stores_nothing_for_it(work: Path) -> None:
    (work / "Bad").write_text("FROM base\nRUN echo ok > /ok\nRUN echo partial > /p; exit 3\nRUN echo never\n")
    res = build(work, "Bad")
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["build.py: 'RUN echo partial > /p; exit 3' returned a non-zero code: 3"]
    assert "Step 4/4" not in res.stdout
    assert len(list((work / "store" / "layers").iterdir())) == 1  # the step that worked
    assert list((work / "store" / "tmp").iterdir()) == []


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_not_root_is_refused_with_a_clear_message(work: Path) -> None:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, str(BUILD), "Buildfile", "--store", str(work / "nobody")],
                         cwd="/", capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "must run as root" in res.stderr
    assert not (work / "nobody").exists()
