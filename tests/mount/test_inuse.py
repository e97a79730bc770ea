"""One upper, one daemon; temporaries that outlive no command; whiteouts as the kernel makes them.

The kernel's overlayfs refuses a second mount of an upper (or work directory)
in use with EBUSY.  pyunionfs holds a flock(2) on both for the daemon's life:
these tests mount twice, commit and apply under a live mount, unmount and
kill -9 the daemon, and check that the second user is refused in one line
while the first keeps working, and that the lock ends with the daemon.

Then what killed commands leave: ``commit -o``'s ``.LAYER.tar.tmp-PID``
beside its output and the store's ``tmp/work-*``, removed by the next
command; and reads of the store that create nothing.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.image import layertar, tempfiles
from tests.support.mounting import Daemon, force_unmount, is_mounted, require_fuse

PYUNIONFS = [sys.executable, "-m", "pyunionfs"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: trusted xattrs, whiteout devices, kernel mounts"),
    pytest.mark.timeout(120),
]


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(PYUNIONFS + list(args), capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess[str], *words: str) -> str:
    """The refusal: non-zero, one line on stderr starting ``pyunionfs: ``, holding *words*."""
    assert res.returncode != 0, res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyunionfs: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """Lower L (f, d/g), upper U, work dir W, mountpoints m1, m2, m3; all unmounted afterwards."""
    for d in ("L", "L/d", "U", "W", "m1", "m2", "m3"):
        (tmp_path / d).mkdir()
    (tmp_path / "L/f").write_text("lower f\n")
    (tmp_path / "L/d/g").write_text("lower g\n")
    yield tmp_path
    for m in ("m1", "m2", "m3"):
        force_unmount(tmp_path / m)


def mount_bg(t: Path, mnt: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("mount", str(t / "L"), str(t / "U"), str(t / mnt), "-o", f"workdir={t / 'W'}", *extra)


# -- one upper, one daemon -------------------------------------------------------------


def test_a_second_mount_of_one_upper_is_refused_and_the_first_keeps_working(tree: Path) -> None:
    require_fuse()
    t = tree
    assert mount_bg(t, "m1").returncode == 0
    (t / "m1/f").write_text("written through m1\n")
    # a copy-up in progress of the first daemon: its temporary in work/
    in_progress = t / "W/work/#copyup-in-progress"
    in_progress.write_text("half a copy")

    line = one_line(mount_bg(t, "m2"), f"upper {t / 'U'} is in use by process", "(pyunionfs mount)")
    assert "one mount at a time" in line
    # the fuse-overlayfs form goes through the same lock
    res = run("-o", f"lowerdir={t / 'L'},upperdir={t / 'U'},workdir={t / 'W'}", str(t / "m2"))
    one_line(res, f"upper {t / 'U'} is in use")
    # another upper with the same work directory: the work directory is in use
    (t / "U2").mkdir()
    res = run("mount", str(t / "L"), str(t / "U2"), str(t / "m3"), "-o", f"workdir={t / 'W'}")
    one_line(res, f"work directory {t / 'W'} is in use")
    assert not is_mounted(t / "m2") and not is_mounted(t / "m3")
    assert in_progress.read_text() == "half a copy", "a refused mount must not clean the first one's work/"

    # the first mount still works, its data intact
    assert (t / "m1/f").read_text() == "written through m1\n"
    (t / "m1/d/g").write_text("changed\n")
    os.unlink(t / "m1/f")
    assert sorted(os.listdir(t / "m1")) == ["d"]
    assert run("umount", str(t / "m1")).returncode == 0
    assert (t / "U/d/g").read_text() == "changed\n"
    assert stat.S_ISCHR(os.lstat(t / "U/f").st_mode), "the whiteout of f"


def test_commit_and_apply_are_refused_while_the_upper_is_mounted(tree: Path) -> None:
    require_fuse()
    t = tree
    assert mount_bg(t, "m1").returncode == 0
    (t / "m1/new").write_text("new\n")
    out = t / "out"
    out.mkdir()
    one_line(run("commit", str(t / "U"), "-o", str(out / "layer.tar")), f"upper {t / 'U'} is in use", "unmount")
    store = t / "store"
    one_line(run("commit", str(t / "U"), "--tag", "x:1", "--store", str(store)), "is in use")
    assert sorted(os.listdir(out)) == [] and not store.exists(), "a refused commit leaves nothing"
    # a layer to apply, from another directory
    (t / "other").mkdir()
    (t / "other/a").write_text("a")
    assert run("commit", str(t / "other"), "-o", str(out / "other.tar")).returncode == 0
    one_line(run("apply", str(out / "other.tar"), str(t / "U")), f"directory {t / 'U'} is in use")
    assert not (t / "U/a").exists()

    assert run("umount", str(t / "m1")).returncode == 0
    res = run("commit", str(t / "U"), "-o", str(out / "layer.tar"))
    assert res.returncode == 0, res.stderr
    assert run("apply", str(out / "other.tar"), str(t / "U")).returncode == 0
    assert (t / "U/a").read_text() == "a"


def test_a_commit_holds_the_upper_shared(tree: Path) -> None:
    """A commit holds the upper shared: another commit may read it too, a mount may not change it."""
    require_fuse()
    t = tree
    upper = os.open(t / "U", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(upper, fcntl.LOCK_SH)  # as a running commit holds it
        res = run("commit", str(t / "U"), "-o", str(t / "layer.tar"))
        assert res.returncode == 0, res.stderr
        res = run("mount", str(t / "L"), str(t / "U"), str(t / "m1"), "-o", f"workdir={t / 'W3'}")
        one_line(res, f"upper {t / 'U'} is in use by process {os.getpid()}")
        assert not is_mounted(t / "m1")
        assert not (t / "W3").exists(), "a refused mount leaves no work directory it made"
    finally:
        os.close(upper)


def test_a_mount_waits_for_a_daemon_that_is_letting_go(tree: Path) -> None:
    """``umount M && pyunionfs mount ... M``: plain umount returns before the old daemon has let
    go of the upper (found by the kernel's unionmount-testsuite, which remounts so). Here a holder
    lets go 0.3 s after the mount starts, as such a daemon does: the mount waits, then goes on."""
    require_fuse()
    t = tree
    held = os.open(t / "U", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    proc = subprocess.Popen(PYUNIONFS + ["mount", str(t / "L"), str(t / "U"), str(t / "m1"), "-o",
                                         f"workdir={t / 'W'}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.3)  # still waiting for the upper
    finally:
        os.close(held)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (t / "m1/f").read_text() == "lower f\n"


def test_the_lock_ends_with_the_unmount(tree: Path) -> None:
    """``pyunionfs umount`` returns once the daemon let go: the next mount of the upper works at once."""
    require_fuse()
    t = tree
    for i in range(3):
        mnt = f"m{i % 2 + 1}"
        res = mount_bg(t, mnt)
        assert res.returncode == 0, f"mount {i}: {res.stderr}"
        (t / mnt / f"file{i}").write_text(str(i))
        res = run("umount", str(t / mnt))
        assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (t / "U").iterdir()) == ["file0", "file1", "file2"]


def test_a_killed_daemon_holds_nothing(tree: Path) -> None:
    """kill -9 of the daemon: its flocks die with it (the dead mount stays until unmounted)."""
    require_fuse()
    t = tree
    d = Daemon([t / "L"], t / "U", t / "m1", [f"workdir={t / 'W'}"])
    (t / "m1/before").write_text("before the kill")
    held = _flocked_inodes()
    assert (os.stat(t / "U").st_ino in held) and (os.stat(t / "W").st_ino in held)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    try:
        assert is_mounted(t / "m1"), "the dead mount is still there"
        assert os.stat(t / "U").st_ino not in _flocked_inodes()
        res = mount_bg(t, "m2")
        assert res.returncode == 0, res.stderr
        assert (t / "m2/before").read_text() == "before the kill"
        assert run("umount", str(t / "m2")).returncode == 0
    finally:
        d.stop(check=False)


def _flocked_inodes() -> set[int]:
    with open("/proc/locks") as f:
        return {int(line.split()[5].split(":")[2]) for line in f if line.split()[1] == "FLOCK"}


def test_an_upper_the_kernel_has_mounted_is_refused(tree: Path) -> None:
    require_fuse()
    t = tree
    (t / "L2").mkdir()
    opts = f"lowerdir={t / 'L'}:{t / 'L2'},upperdir={t / 'U'},workdir={t / 'W'}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(t / "m1")], check=True, timeout=30)
    try:
        one_line(run("mount", str(t / "L"), str(t / "U"), str(t / "m2"), "-o", f"workdir={t}/W2"),
                 f"upper {t / 'U'} is in use by the kernel's overlayfs mounted at {t / 'm1'}")
        assert not is_mounted(t / "m2") and not (t / "W2").exists()
    finally:
        subprocess.run(["umount", str(t / "m1")], check=True, timeout=30)


# -- temporaries -----------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_commits_temporaries_go_with_the_next_commit(tree: Path) -> None:
    t = tree
    (t / "U/f").write_text("upper f")
    out = t / "out"
    out.mkdir()
    dead = _dead_pid()
    assert tempfiles.temp_beside(str(out / "l.tar"), 7) == str(out / ".l.tar.tmp-7")
    assert tempfiles.temp_beside(str(out / "l.tar")) == layertar._temp_beside(str(out / "l.tar"))
    leftovers = [out / f".l.tar.tmp-{dead}", out / f".l.tar.gz.tmp-{dead}"]
    for p in leftovers:
        p.write_bytes(b"x" * 1000)  # what commit -o --gzip killed half-way leaves
    live = out / f".l.tar.tmp-{os.getpid()}0"  # held by a live writer (a flock): kept
    live.write_bytes(b"busy")
    others = [out / ".other.tar.tmp-1", out / "l.tar.tmp-1", out / ".l.tar.tmp-x"]  # not commit's: kept
    for p in others:
        p.write_text("")
    holder = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        res = run("commit", str(t / "U"), "-o", str(out / "l.tar"), "--gzip")
        assert res.returncode == 0, res.stderr
    finally:
        os.close(holder)
    assert not any(p.exists() for p in leftovers), sorted(os.listdir(out))
    assert live.exists() and all(p.exists() for p in others)
    assert sorted(os.listdir(out)) == sorted(["l.tar", "l.tar.gz", live.name, *(p.name for p in others)])


def test_a_failed_commit_leaves_no_temporary(tree: Path) -> None:
    t = tree
    (t / "U/f").write_text("f")
    out = t / "out"
    out.mkdir()
    one_line(run("commit", str(t / "U"), "-o", str(out / "l.tar"), "--gzip", "--lowers", str(t / "L"),
                 "--workdir", str(t / "nowhere")), "nowhere")
    one_line(run("commit", str(t / "U"), "-o", str(t / "U/l.tar")), "inside the upper")
    assert os.listdir(out) == [] and sorted(os.listdir(t / "U")) == ["f"]


def _store_with_image(t: Path) -> Path:
    store = t / "store"
    (t / "U/f").write_text("f")
    res = run("commit", str(t / "U"), "--tag", "img:1", "--store", str(store))
    assert res.returncode == 0, res.stderr
    return store


def _stale_workspace(store: Path, name: str) -> Path:
    """A tmp/ directory as a killed pull leaves it: its .lock held by nobody, older than a minute."""
    ws = store / "tmp" / name
    (ws / "blobs").mkdir(parents=True)
    (ws / "blobs/partial").write_bytes(b"\0" * 4096)
    (ws / ".lock").write_text("")
    old = time.time() - 3600
    os.utime(ws, (old, old))
    return ws


@pytest.mark.parametrize("command", [["tag", "img:1", "img:2"], ["images"], ["history", "img:1"],
                                     ["rmi", "img:1"]])
def test_every_store_command_sweeps_what_killed_ones_left(tree: Path, command: list[str]) -> None:
    store = _store_with_image(tree)
    stale = _stale_workspace(store, "work-killed")
    busy = _stale_workspace(store, "work-busy")  # a live command's: its .lock is held
    fd = os.open(busy / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = run(*command, "--store", str(store))
        assert res.returncode == 0, res.stderr
    finally:
        os.close(fd)
    assert not stale.exists(), f"{command[0]} left {stale}"
    assert busy.exists()


def test_reading_the_store_creates_nothing(tmp_path: Path) -> None:
    store = tmp_path / "none" / "store"
    res = run("images", "--store", str(store))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "0 images, 0 layers, 0B of layers stored"
    one_line(run("history", "img:1", "--store", str(store)), "no image img:1")
    (tmp_path / "m").mkdir()
    one_line(run("mount", "image:img:1", "", str(tmp_path / "m"), "--store", str(store)), "no image img:1")
    # the default store too ($PYUNIONFS_STORE, else /var/lib/pyunionfs for root)
    env = dict(os.environ, PYUNIONFS_STORE=str(store))
    assert run("images", env=env).returncode == 0
    assert not (tmp_path / "none").exists()


# -- whiteouts ---------------------------------------------------------------------------


def test_a_whiteout_in_a_set_group_id_directory_is_roots_as_the_kernels(tmp_path: Path, mount) -> None:
    """The kernel makes a whiteout in its work dir and renames it in: root:root, whatever the
    directory's set-group-ID bit would give a file made in place."""
    owners = {}
    for side in ("kernel", "pyunionfs"):
        low, up, work, mnt = (tmp_path / side / n for n in ("low", "up", "work", "mnt"))
        for d in (low / "sg", up / "sg", work, mnt):
            d.mkdir(parents=True)
        (low / "sg/f").write_text("f")
        for d in (low / "sg", up / "sg"):
            os.chown(d, 0, 1234)
            os.chmod(d, 0o2775)
        if side == "kernel":
            opts = f"lowerdir={low},upperdir={up},workdir={work}"
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, timeout=30)
            try:
                os.unlink(mnt / "sg/f")
            finally:
                subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        else:
            d = mount([low], up, f"workdir={work}", mnt=mnt)
            os.unlink(mnt / "sg/f")
            d.stop()
        st = os.lstat(up / "sg/f")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, side
        owners[side] = (st.st_uid, st.st_gid)
    assert owners == {"kernel": (0, 0), "pyunionfs": (0, 0)}
