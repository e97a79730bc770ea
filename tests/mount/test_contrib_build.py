"""contrib/build.py, the image-build example: images in the store, whiteouts, the build cache, failures,
and a RUN step's namespaces (/dev, /proc, /sys of its own, none of it in the layer) and empty layers.

The base tree is made here without network: busybox if installed, else dash and
mkdir/rm/cat with the libraries ldd lists. Builds run the script as a subprocess
(with a timeout); every build directory is checked for leftover mounts afterwards,
and anything found is lazily unmounted before tmp_path can be removed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.fuse.mountinfo import unescape_mountinfo
from pyunionfs.image.store import Store
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


def build(work: Path, buildfile: str = "Buildfile", *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD), buildfile, "--store", "store", *args], cwd=work,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def step_ids(out: str) -> list[str]:
    """The IMAGE ID printed after each step, FROM first."""
    return re.findall(r"^ ---> ([0-9a-f]{12})$", out, re.MULTILINE)


def history(out: str) -> list[list[str]]:
    """`pyunionfs history` as printed at the end: rows of LAYER, CREATED, CREATED BY, SIZE, newest first."""
    block = out.split("\nLAYER ", 1)[1].split("\n\n", 1)[0]
    return [re.split(r"\s{3,}", line) for line in block.splitlines()[1:]]


def images(work: Path) -> dict[str, str]:
    """NAME:TAG -> IMAGE ID of the build's store."""
    return {img.name: img.id for img in Store(str(work / "store")).images()}


def test_build_into_the_store_then_cache_then_rebuild_the_changed_step(work: Path, mount) -> None:
    base_before = snapshot(work / "base")
    first = build(work, "Buildfile", "--tag", "test/app:1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(" ---> Running in ") == 3 and "Using cache" not in first.stdout
    assert "hi there" in first.stdout  # the RUN's own output is shown
    ids = step_ids(first.stdout)
    assert len(ids) == 5 and len(set(ids)) == 5
    assert f"Successfully built {ids[-1]}\nSuccessfully tagged test/app:1\n" in first.stdout
    assert f"pyunionfs mount image:test/app:1 UPPER MNT --store {work / 'store'}" in first.stdout

    # every step is an image of the store, tagged by its cache key; the final one has --tag too
    tagged = images(work)
    assert tagged.pop("test/app:1") == ids[-1]
    assert all(re.fullmatch(r"pyunionfs-build-cache:[0-9a-f]{16}", name) for name in tagged)
    assert sorted(tagged.values()) == sorted(ids)
    # the store's own history: one layer per step, the instruction as CREATED BY
    rows = history(first.stdout)
    assert [r[2] for r in rows] == [*reversed(STEPS), f"FROM {work / 'base'}"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", r[0]) and r[3].endswith("B") for r in rows)

    # the rm step left a kernel whiteout; the base was only read; no work folder left
    lowers = Store(str(work / "store")).lowers("test/app:1")
    assert len(lowers) == 5
    whiteout = (Path(lowers[2]) / "etc" / "gone.txt").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert snapshot(work / "base") == base_before
    assert list((work / "store" / "tmp").iterdir()) == []

    with mount(lowers, None) as d:  # what `pyunionfs mount image:test/app:1 "" MNT` mounts
        assert (d.mnt / "hello.txt").read_text() == "hello\n"
        assert not os.path.lexists(d.mnt / "etc" / "gone.txt")
        assert (d.mnt / "etc" / "keep.txt").read_text() == "kept\n"
        assert (d.mnt / "srv" / "greeting.txt").read_text() == "hi there\n"
        assert (d.mnt / "var" / "data").is_dir()
        assert sorted(os.listdir(d.mnt)) == sorted([*os.listdir(work / "base"), "hello.txt", "srv", "var"])

    # unchanged build file: every step from the cache, nothing run, the same images
    second = build(work, "Buildfile", "--tag", "test/app:1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count(" ---> Using cache") == 5 and "Running in" not in second.stdout
    assert step_ids(second.stdout) == ids
    assert history(second.stdout) == rows
    assert images(work)["test/app:1"] == ids[-1]

    # the last RUN changed: only that step is built again
    (work / "Buildfile").write_text(BUILDFILE.replace("/var/data", "/var/other"))
    third = build(work, "Buildfile", "--tag", "test/app:1")
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count(" ---> Using cache") == 4 and third.stdout.count(" ---> Running in ") == 1
    new_ids = step_ids(third.stdout)
    assert new_ids[:4] == ids[:4] and new_ids[4] not in ids
    assert images(work)["test/app:1"] == new_ids[4]
    assert history(third.stdout)[1:] == rows[1:]
    assert history(third.stdout)[0][2] == STEPS[-1].replace("/var/data", "/var/other")
    rebuilt = Store(str(work / "store")).lowers("test/app:1")
    assert rebuilt[1:] == lowers[1:] and rebuilt[0] != lowers[0]
    assert (Path(rebuilt[0]) / "var" / "other").is_dir() and not (Path(rebuilt[0]) / "var" / "data").exists()


def test_from_an_image_of_the_store(work: Path) -> None:
    (work / "One").write_text("FROM base\nRUN echo one > /one\n")
    (work / "Two").write_text("FROM image:one\nRUN cat /one > /two\n")
    assert build(work, "One", "--tag", "one").returncode == 0
    res = build(work, "Two", "--tag", "two:1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert step_ids(res.stdout)[0] == images(work)["one:latest"]
    assert [r[2] for r in history(res.stdout)] == ["RUN cat /one > /two", "RUN echo one > /one",
                                                 f"FROM {work / 'base'}"]
    store = Store(str(work / "store"))
    assert store.lowers("two:1")[1:] == store.lowers("one")  # the same layer directories
    assert (Path(store.lowers("two:1")[0]) / "two").read_text() == "one\n"
    (work / "Three").write_text("FROM image:nope\n")
    missing = build(work, "Three")
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [f"build.py: FROM image:nope: no image nope:latest in {work / 'store'}"]


def test_failing_run_stops_the_build_and_tags_nothing_for_it(work: Path) -> None:
    (work / "Bad").write_text("FROM base\nRUN echo ok > /ok\nRUN echo partial > /p; exit 3\nRUN echo never\n")
    res = build(work, "Bad", "--tag", "bad:1")
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["build.py: 'RUN echo partial > /p; exit 3' returned a non-zero code: 3"]
    assert "Step 4/4" not in res.stdout
    ids = step_ids(res.stdout)
    assert len(ids) == 2  # FROM and the step that worked
    tagged = images(work)
    assert sorted(tagged.values()) == sorted(ids) and all(n.startswith("pyunionfs-build-cache:") for n in tagged)
    assert list((work / "store" / "tmp").iterdir()) == []


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_not_root_is_refused_with_a_clear_message(work: Path) -> None:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, str(BUILD), "Buildfile", "--store", str(work / "nobody")],
                         cwd="/", capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "must run as root" in res.stderr
    assert not (work / "nobody").exists()


def _tree(root: Path) -> list[str]:
    """Every path below *root*, relative (the root itself is not listed)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_run_gets_dev_proc_sys_in_namespaces_and_none_of_it_reaches_the_layer(work: Path, mount) -> None:
    (work / "Buildfile").write_text(
        "FROM base\n"
        "RUN echo hidden > /dev/null && cat /etc/keep.txt > /dev/null && [ -c /dev/zero ] && [ -c /dev/urandom ] \\\n"
        "    && [ -c /dev/tty ] && [ -d /dev/pts ] && echo x > /dev/shm/x && [ -d /sys/kernel ] \\\n"
        "    && cat /proc/1/cmdline > /pid1 && for i in /sys/class/net/*; do echo $i; done > /nets\n"
        "RUN cat < /dev/ptmx > /dev/null & echo left running\n")
    res = build(work, "Buildfile", "--tag", "ns:1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == "" and "left running" in res.stdout
    store = Store(str(work / "store"))
    lowers = store.lowers("ns:1")
    assert len(lowers) == 2  # the base, the first RUN; the second changed nothing
    top = Path(lowers[0])
    # the step's own PID namespace (PID 1 is the step's init), a network namespace with only lo
    assert b"build-run" in (top / "pid1").read_bytes()
    assert (top / "nets").read_text() == "/sys/class/net/lo\n"
    # the base has no /dev, /proc, /sys: the layer has none either, nor a whiteout for them
    assert _tree(top) == ["nets", "pid1"]
    with mount(lowers, None) as d:
        assert sorted(os.listdir(d.mnt)) == sorted([*os.listdir(work / "base"), "nets", "pid1"])
    # the step that changed nothing (its background process killed with it) is an empty layer
    rows = history(res.stdout)
    assert rows[0][0] == "<missing>" and rows[0][2] == "RUN cat < /dev/ptmx > /dev/null & echo left running"
    assert rows[0][3] == "0B" and re.fullmatch(r"[0-9a-f]{12}", rows[1][0])
    assert store.image("ns:1").config["history"][-1]["empty_layer"] is True
    assert list((work / "store" / "tmp").iterdir()) == []


def test_a_base_with_dev_proc_sys_keeps_them_and_the_layer_has_nothing_of_them(work: Path, mount) -> None:
    for name in ("dev", "proc", "sys"):
        (work / "base" / name).mkdir(mode=0o755)
    (work / "base" / "dev" / "console-placeholder").write_text("from the base\n")
    (work / "Buildfile").write_text("FROM base\nRUN echo hi > /dev/null && echo done > /done\n")
    res = build(work, "Buildfile", "--tag", "withdev:1")
    assert res.returncode == 0, res.stdout + res.stderr
    lowers = Store(str(work / "store")).lowers("withdev:1")
    assert _tree(Path(lowers[0])) == ["done"]
    with mount(lowers, None) as d:
        assert (d.mnt / "dev" / "console-placeholder").read_text() == "from the base\n"
        assert (d.mnt / "proc").is_dir() and os.listdir(d.mnt / "proc") == []


def test_build_has_no_fixed_timeouts() -> None:
    """A ~1 GB base took longer than the 300 s the script once allowed a pyunionfs command."""
    source = BUILD.read_text()
    assert "timeout=" not in source and "TimeoutExpired" not in source
