"""Write path, safety: copy-up is complete and atomic, survives kill -9, is durable, and never stalls the mount.

Why these tests: a union filesystem's worst failure is silent data loss --
a half-copied file in the upper that hides the intact lower one forever, a
rename that loses or duplicates a file, a change that an fsync promised but
a crash took away.  They cannot be caught by comparing trees on a healthy
mount, so here the daemon is killed with SIGKILL at the worst moments
(during a 1 GiB copy-up, during a storm of renames) and the next mount of
the same upper must show either the old state or the new one, never a mix.

Every expectation that a kernel overlay mount can show is first checked on
``mount -t overlay`` over an identical stack (the kernel cannot be killed
mid-copy, but it shows what a complete copy-up, a rename or a remount must
leave), then on pyunionfs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import mmap
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounting import Daemon, force_unmount, is_mounted
from tests.support.treesnap import Snapshot, diff, snapshot
from tests.support.writecheck import (
    GiB,
    MiB,
    default_workdir,
    errname,
    errno_of,
    fill_file,
    kernel_overlay,
    kill_daemon,
    layer_state,
    put,
    sha256_file,
    temporaries,
    upper_layout,
    wait_for,
    work_entries,
)

Mount = Callable[..., Daemon]

# A child process that opens a file for writing and rewrites its first byte
# with the same value: a change that forces a full copy-up but leaves the
# data identical, so "complete" has one hash whether or not the write landed.
WRITER = r"""
import json, os, sys, time
t0 = time.monotonic()
try:
    fd = os.open(sys.argv[1], os.O_RDWR)
    first = os.pread(fd, 1, 0)
    os.pwrite(fd, first, 0)
    os.close(fd)
    err = 0
except OSError as e:
    err = e.errno
print(json.dumps({"t0": t0, "t1": time.monotonic(), "errno": err}))
"""

# A child process renaming files back and forth (pairs "a:b", starting from
# whichever name exists), writing its progress to a file; stops at the first
# error (the killed daemon) or after about ``limit`` renames (0: never).
RENAMER = r"""
import os, sys
m, progress, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
pairs = [tuple(a.split(":")) for a in sys.argv[4:]]
cur = [0 if os.path.lexists(os.path.join(m, a)) else 1 for a, _ in pairs]
pfd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o644)
n = 0
while limit == 0 or n < limit:
    for i, names in enumerate(pairs):
        try:
            os.rename(os.path.join(m, names[cur[i]]), os.path.join(m, names[1 - cur[i]]))
        except OSError as e:
            print("error", e.errno, flush=True)
            sys.exit(0)
        cur[i] ^= 1
        n += 1
        os.pwrite(pfd, b"%12d" % n, 0)
print("done", n, flush=True)
"""

# A child process that removes and re-creates a directory and a file whose
# names a lower layer also has (so whiteouts and opaque dirs come and go),
# writing its progress to a file; stops like RENAMER.
RECREATOR = r"""
import os, sys
m, progress, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
d, f = os.path.join(m, "d"), os.path.join(m, "f")
pfd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o644)
n = 0
while limit == 0 or n < limit:
    try:
        if os.path.lexists(d):
            os.rmdir(d)
        else:
            os.mkdir(d)
        if os.path.lexists(f):
            os.unlink(f)
        else:
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"NEW")
            os.close(fd)
    except OSError as e:
        print("error", e.errno, flush=True)
        sys.exit(0)
    n += 1
    os.pwrite(pfd, b"%12d" % n, 0)
print("done", n, flush=True)
"""


@pytest.fixture
def big_files() -> Iterator[list[Path]]:
    """Paths of GiB-sized files to delete after the test, so that kept pytest temp dirs stay small."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def _drop_page_cache() -> None:
    """Make the next read of a big file come from disk, so a copy-up takes its real time."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Copy-up keeps everything, like the kernel's
# --------------------------------------------------------------------------

_CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # vfs_cap_data v2, effective


def _fidelity_lower(low: Path) -> None:
    """A sparse set-uid file with a file capability, deep in dirs with their own owners, modes and times."""
    f = low / "d1/d2/f"
    f.parent.mkdir(parents=True)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"A" * 4096, 1 * MiB)
    os.pwrite(fd, b"B" * 4096, 8 * MiB)
    os.ftruncate(fd, 16 * MiB)
    os.close(fd)
    os.chown(f, 1234, 4321)
    os.chmod(f, 0o4750)
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "trusted.foo", b"2")
    os.setxattr(f, "security.capability", _CAP_NET_BIND)
    for d, (uid, gid, mode) in ((low / "d1", (1000, 1000, 0o705)), (low / "d1/d2", (1234, 1234, 0o2750))):
        os.chown(d, uid, gid)
        os.chmod(d, mode)
        os.setxattr(d, "user.dx", os.fsencode(d.name))
    put(low / "plain", b"plain data\n" * 1000, 0o640)
    for p, t in ((f, 1), (low / "plain", 2), (low / "d1/d2", 3), (low / "d1", 4)):
        os.utime(p, ns=(t * 10**9 + 111, t * 10**9 + 222))


def _fidelity_change(m: Path) -> dict[str, int]:
    """Changes that force copy-ups without touching the copied metadata; returns st_ino before/after."""
    ino = {"f": os.lstat(m / "d1/d2/f").st_ino, "plain": os.lstat(m / "plain").st_ino}
    os.setxattr(m / "d1/d2/f", "user.trigger", b"1")  # metadata-only change: copy-up, then setxattr
    with open(m / "plain", "r+b") as fh:  # a data change: copy-up, then write in place
        fh.seek(5)
        fh.write(b"DATA")
    ino["f-after"] = os.lstat(m / "d1/d2/f").st_ino
    ino["plain-after"] = os.lstat(m / "plain").st_ino
    return ino


def _copied(upper: Path) -> dict[str, tuple[Any, ...]]:
    """What a copy-up must carry over, read from the upper on disk (overlay's own xattrs left out)."""
    out = {}
    for rel in ("d1", "d1/d2", "d1/d2/f", "plain"):
        p = upper / rel
        st = os.lstat(p)
        xattrs = sorted((n, os.getxattr(p, n)) for n in os.listxattr(p) if not n.startswith("trusted.overlay."))
        data = sha256_file(p, noatime=True) if stat.S_ISREG(st.st_mode) else None
        # plain was written to; a directory's atime moves whenever anyone lists it
        times: object = (st.st_atime_ns, st.st_mtime_ns)
        if rel == "plain":
            times = None
        elif stat.S_ISDIR(st.st_mode):
            times = st.st_mtime_ns
        out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, times, xattrs, data)
    return out


def test_copy_up_carries_data_holes_owner_mode_times_xattrs(tmp_path: Path, mount: Mount) -> None:
    """Copy-up rebuilds the lower object completely, parents first, and never touches the lower."""
    results = {}
    for side in ("kernel", "pyunionfs"):
        low, up = tmp_path / side / "low", tmp_path / side / "up"
        _fidelity_lower(low)
        up.mkdir()
        before = layer_state(low)
        if side == "kernel":
            with kernel_overlay([low], up, tmp_path / side / "work", tmp_path / side / "mnt") as m:
                inos = _fidelity_change(m)
        else:
            d = mount([low], up)
            inos = _fidelity_change(d.mnt)
            d.stop()
        assert layer_state(low) == before, f"{side}: the lower layer was modified"
        results[side] = (_copied(up), os.lstat(up / "d1/d2/f").st_blocks, inos)
    (k_copied, k_blocks, k_inos), (p_copied, p_blocks, p_inos) = results["kernel"], results["pyunionfs"]
    # what the kernel shows is what the spec asks for
    assert k_copied["d1/d2/f"][0] == "-rwsr-x---" and ("security.capability", _CAP_NET_BIND) in k_copied["d1/d2/f"][5]
    assert k_inos["f"] == k_inos["f-after"] and k_inos["plain"] == k_inos["plain-after"]
    wrong = [f"  {rel}:\n    kernel    {k_copied[rel]}\n    pyunionfs {p_copied[rel]}"
             for rel in k_copied if p_copied[rel] != k_copied[rel]]
    assert not wrong, "copied up differently (mode, uid, gid, size, times, xattrs, data):\n" + "\n".join(wrong)
    assert p_blocks <= k_blocks, f"holes not kept: {p_blocks} blocks allocated, the kernel needs {k_blocks}"
    assert p_inos["f"] == p_inos["f-after"] and p_inos["plain"] == p_inos["plain-after"], (
        f"st_ino changed on copy-up: {p_inos}")


# --------------------------------------------------------------------------
# SIGKILL in the middle of a large copy-up
# --------------------------------------------------------------------------


def _fsynced_changes(m: Path) -> None:
    """Small changes, each completed and fsynced (file and directory) before the crash."""
    with open(m / "done", "xb") as f:
        f.write(b"done\n")
        f.flush()
        os.fsync(f.fileno())
    with open(m / "small", "r+b") as f:
        f.write(b"SMALL")
        f.flush()
        os.fsync(f.fileno())
    os.unlink(m / "gone")
    os.mkdir(m / "newdir")
    with open(m / "newdir/x", "xb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(m / "newdir")
    _fsync_path(m)


def _check_fsynced_changes(m: Path, up: Path) -> None:
    assert (m / "done").read_bytes() == b"done\n"
    assert (m / "small").read_bytes() == b"SMALL lower"
    assert errno_of(os.lstat, m / "gone") == errno.ENOENT
    assert (m / "newdir/x").read_bytes() == b"x" * 100_000
    assert upper_layout(up).get("gone") == ("whiteout",), "the unlink of a lower file left no whiteout"


def _dir_meta(m: Path, rels: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    """Owner, mode and xattrs of directories as the mount shows them.

    What a half-made directory copy would lack.  (Times are the subject of
    test_copy_up_carries_data_holes_owner_mode_times_xattrs, not of the crash.)
    """
    out = {}
    for rel in rels:
        st = os.lstat(m / rel)
        xattrs = sorted((n, os.getxattr(m / rel, n)) for n in os.listxattr(m / rel))
        out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, xattrs)
    return out


def _kill_during_copy_up(d: Daemon, path: Path, work: Path) -> None:
    """Write to *path* in a child; SIGKILL the daemon once a >= 16 MiB copy-up temporary is being filled.

    Skips the test if the copy-up completed before the kill (nothing was
    interrupted, so nothing is tested); checks that the writer saw the
    daemon die.
    """
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        def filling() -> dict[str, int] | None:
            if writer.poll() is not None:
                pytest.fail(f"the write finished before any copy-up temporary was seen in {work}: "
                            f"{writer.stdout.read() if writer.stdout else ''}; work dir: {temporaries(0, work)}")
            found = temporaries(d.proc.pid, work)
            return found if any(n >= 16 * MiB for n in found.values()) else None

        wait_for(filling, 30, f"a copy-up temporary of >= 16 MiB in {work}")
        kill_daemon(d)
    finally:
        out = _output_of(writer)
    result = json.loads(out)
    if result["errno"] == 0:
        pytest.skip("the copy-up completed before the daemon was killed: the disk is too fast to test this")
    assert result["errno"] in (errno.ENOTCONN, errno.ECONNABORTED), f"writer: {errname(result['errno'])}"


_BIG = "deep/er/big"
_BIG_PARENTS = ("deep", "deep/er")


def _output_of(proc: subprocess.Popen) -> str:
    """The worker's stdout once it has ended; killed if it does not end within 30 s."""
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.mark.timeout(180)
def test_sigkill_during_large_copy_up_leaves_no_partial_file(tmp_path: Path, mount: Mount,
                                                            big_files: list[Path]) -> None:
    """kill -9 while a 1 GiB file is being copied up: after the remount it is absent from the upper or complete.

    The file sits in lower-only directories with their own owner, mode,
    times and xattrs, which the copy-up creates in the upper first: they
    too must be either absent or complete after the crash.
    """
    low, up = tmp_path / "low", tmp_path / "up"
    (low / "deep/er").mkdir(parents=True)
    up.mkdir()
    big_files += [low / _BIG, up / _BIG]
    big_hash = fill_file(low / _BIG, GiB)
    for rel, mode in zip(_BIG_PARENTS, (0o751, 0o2705), strict=True):
        os.chown(low / rel, 1000, 1234)
        os.chmod(low / rel, mode)
        os.setxattr(low / rel, "user.dir", rel.encode())
        os.utime(low / rel, ns=(10**9, 2 * 10**9))
    put(low / "small", "small lower")
    put(low / "gone", "gone")
    lower_before = layer_state(low)
    work = default_workdir(up)

    d = mount([low], up)
    m = d.mnt
    parents_before = _dir_meta(m, _BIG_PARENTS)
    _fsynced_changes(m)
    _drop_page_cache()
    _kill_during_copy_up(d, m / _BIG, work)

    # Before anything cleans up: the upper has no partial file.
    if (up / _BIG).exists():
        assert os.lstat(up / _BIG).st_size == GiB, "a partial copy-up is visible in the upper"
        assert sha256_file(up / _BIG) == big_hash, "a partial copy-up is visible in the upper"
    leftovers = work_entries(work)

    d2 = mount([low], up, mnt=m)
    assert work_entries(work) == [], f"leftovers of the killed copy-up not cleaned at mount (were {leftovers})"
    _check_fsynced_changes(m, up)
    assert _dir_meta(m, _BIG_PARENTS) == parents_before, "the parents of the file changed in the crash"
    assert os.lstat(m / _BIG).st_size == GiB
    with open(m / _BIG, "rb") as f:
        head = f.read(MiB)
        f.seek(GiB - MiB)
        tail = f.read(MiB)
    with open(low / _BIG, "rb") as f:
        assert head == f.read(MiB)
        f.seek(GiB - MiB)
        assert tail == f.read(MiB)

    # The copy-up works after the crash, and is complete.
    rerun = subprocess.run([sys.executable, "-c", WRITER, str(m / _BIG)], capture_output=True, text=True, timeout=120)
    assert json.loads(rerun.stdout)["errno"] == 0, rerun.stdout + rerun.stderr
    assert os.lstat(up / _BIG).st_size == GiB
    assert sha256_file(up / _BIG) == big_hash
    d2.stop()
    assert layer_state(low) == lower_before, "the lower layer was modified"


@pytest.mark.timeout(120)
def test_sigkill_during_copy_up_of_a_hardlinked_file(tmp_path: Path, mount: Mount, big_files: list[Path]) -> None:
    """kill -9 while a hardlinked lower file is copied up (to the index): after the remount its names agree."""
    low, up = tmp_path / "low", tmp_path / "up"
    (low / "sub").mkdir(parents=True)
    up.mkdir()
    big_files += [low / "h1", up / "h1", up / "sub/h2"]
    fill_file(low / "h1", 512 * MiB)
    os.link(low / "h1", low / "sub/h2")
    lower_before = layer_state(low)
    work = default_workdir(up)
    d = mount([low], up)
    _drop_page_cache()
    _kill_during_copy_up(d, d.mnt / "h1", work)

    d = mount([low], up, mnt=d.mnt)
    m = d.mnt
    assert work_entries(work) == [], "leftovers of the killed copy-up not cleaned at mount"
    for first, second in (("sub/h2", "h1"), ("h1", "sub/h2")):
        a, b = os.lstat(m / first), os.lstat(m / second)
        assert (a.st_ino, a.st_nlink, a.st_size) == (b.st_ino, b.st_nlink, b.st_size) == (a.st_ino, 2, 512 * MiB)
        if first == "sub/h2":
            d.stop()
            d = mount([low], up, mnt=m)
    with open(m / "sub/h2", "r+b") as f:  # the copy-up completes now
        f.write(b"AFTER")
    with open(m / "h1", "rb") as f:
        assert f.read(5) == b"AFTER", "the names of one file diverged after a crash during its copy-up"
    assert os.lstat(m / "h1").st_nlink == os.lstat(m / "sub/h2").st_nlink == 2
    d.stop()
    assert layer_state(low) == lower_before, "the lower layer was modified"


# --------------------------------------------------------------------------
# SIGKILL during renames
# --------------------------------------------------------------------------

_ROUNDS = 3
_PAIRS_PER_ROUND = 6


def _rename_layers(low: Path) -> dict[tuple[str, str], str]:
    """Lower files for every round (renaming them copies them up); returns {pair: sha256}."""
    pairs = {}
    for r in range(_ROUNDS):
        for i in range(_PAIRS_PER_ROUND):
            data = os.urandom(256 * 1024 + i)
            put(low / f"a{r}_{i}", data)
            pairs[(f"a{r}_{i}", f"b{r}_{i}")] = sha256_file(low / f"a{r}_{i}")
    return pairs


def _make_upper_pairs(m: Path) -> dict[tuple[str, str], str]:
    """Upper-only files created through the mount and fsynced; returns {pair: sha256}."""
    pairs = {}
    for i in range(_PAIRS_PER_ROUND):
        data = os.urandom(64 * 1024 + i)
        with open(m / f"u{i}", "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        pairs[(f"u{i}", f"v{i}")] = sha256_file(m / f"u{i}")
    _fsync_path(m)
    return pairs


def _check_each_file_once(m: Path, pairs: dict[tuple[str, str], str], where: str) -> None:
    names = set(os.listdir(m))
    for (a, b), h in pairs.items():
        present = [n for n in (a, b) if n in names]
        assert len(present) == 1, f"{where}: {a}/{b} should exist under exactly one name, found {present}"
        other = b if present[0] == a else a
        assert errno_of(os.lstat, m / other) == errno.ENOENT, f"{where}: {other} is not listed but can be looked up"
        assert sha256_file(m / present[0]) == h, f"{where}: {present[0]} lost data"


def _run_renamer(m: Path, progress: Path, limit: int, pairs: list[tuple[str, str]]) -> subprocess.Popen:
    progress.write_bytes(b"%12d" % 0)
    args = [f"{a}:{b}" for a, b in pairs]
    return subprocess.Popen([sys.executable, "-c", RENAMER, str(m), str(progress), str(limit), *args],
                            stdout=subprocess.PIPE, text=True)


def _renamed_or_done(proc: subprocess.Popen, progress: Path, goal: int) -> bool:
    return proc.poll() is not None or int(progress.read_bytes()) >= goal


def _kill_midway(d: Daemon, proc: subprocess.Popen, progress: Path, goal: int, pause: float, what: str) -> str:
    """Let *proc* count *goal* steps in *progress*, kill the daemon *pause*
    seconds later (a random point inside the next step), and return what
    *proc* printed once it saw the mount die."""
    try:
        wait_for(functools.partial(_renamed_or_done, proc, progress, goal), 30, what)
        assert proc.poll() is None, f"{what}: the worker stopped early: {proc.communicate()[0]}"
        time.sleep(pause)
        kill_daemon(d)
    finally:
        out = _output_of(proc)
    return out


def test_renames_keep_every_file_exactly_once_on_the_kernel(tmp_path: Path) -> None:
    """Proves the rename storm and the 'exactly once' check on the kernel's overlayfs (no kill possible)."""
    low, up = tmp_path / "low", tmp_path / "up"
    up.mkdir()
    pairs = _rename_layers(low)
    with kernel_overlay([low], up, tmp_path / "work", tmp_path / "mnt") as m:
        pairs.update(_make_upper_pairs(m))
        proc = _run_renamer(m, tmp_path / "progress", 5 * len(pairs) + 3, list(pairs))
        out, _ = proc.communicate(timeout=60)
        assert out.startswith("done"), out
        _check_each_file_once(m, pairs, "kernel")
    layout = upper_layout(up)
    assert all(v[0] in ("reg", "whiteout") for k, v in layout.items()), layout


@pytest.mark.timeout(150)
def test_sigkill_during_renames_keeps_every_file_exactly_once(tmp_path: Path, mount: Mount) -> None:
    """kill -9 while a child renames files back and forth: after the remount each file is there once, whole."""
    low, up = tmp_path / "low", tmp_path / "up"
    up.mkdir()
    pairs = _rename_layers(low)
    lower_before = layer_state(low)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = mount([low], up, mnt=mnt)
    pairs.update(_make_upper_pairs(mnt))
    upper_pairs = [p for p in pairs if p[0].startswith("u")]
    rng = random.Random(20240611)
    for r in range(_ROUNDS):
        round_pairs = [p for p in pairs if p[0].startswith(f"a{r}_")] + upper_pairs
        proc = _run_renamer(mnt, tmp_path / "progress", 0, round_pairs)
        goal = rng.randint(len(round_pairs), 4 * len(round_pairs))
        out = _kill_midway(d, proc, tmp_path / "progress", goal, rng.uniform(0, 0.02), f"{goal} renames in round {r}")
        assert out.startswith("error"), f"round {r}: the renamer did not see the daemon die: {out!r}"
        d = mount([low], up, mnt=mnt)
        _check_each_file_once(mnt, pairs, f"after kill {r}")
        assert work_entries(default_workdir(up)) == [], f"round {r}: work dir not cleaned at mount"
        names = {n for p in pairs for n in p}
        stray = {k: v for k, v in upper_layout(up).items() if k not in names or v[0] not in ("reg", "whiteout")}
        assert not stray, f"round {r}: unexpected entries in the upper: {stray}"
    d.stop()
    assert layer_state(low) == lower_before, "the lower layer was modified"


# --------------------------------------------------------------------------
# SIGKILL while whiteouts and opaque directories come and go
# --------------------------------------------------------------------------


def _recreate_layers(low: Path) -> None:
    for k in range(5):
        put(low / f"d/lower{k}", "lower content of d")
    put(low / "f", "LOWER")


def _prepare_recreate(m: Path) -> None:
    """Remove the lower-backed dir and file through the mount: the loop starts from whiteouts."""
    shutil.rmtree(m / "d")
    os.unlink(m / "f")
    _fsync_path(m)


def _check_never_resurrected(m: Path, up: Path, where: str) -> None:
    """What a lower layer had under d and f must never show again, whatever the moment of the crash."""
    if os.path.lexists(m / "d"):
        assert os.listdir(m / "d") == [], f"{where}: lower entries came back in d"
    if os.path.lexists(m / "f"):
        # created (and perhaps killed before its write), never the lower one
        assert (m / "f").read_bytes() in (b"", b"NEW"), f"{where}: the lower f came back"
    layout = upper_layout(up)
    assert layout.get("d") in (("whiteout",), ("dir", b"y")), f"{where}: d in the upper is {layout.get('d')}"
    new_f = {("reg", len(b), hashlib.sha256(b).hexdigest()) for b in (b"", b"NEW")}
    assert layout.get("f") in new_f | {("whiteout",)}, f"{where}: f in the upper is {layout.get('f')}"


def test_recreating_over_whiteouts_on_the_kernel(tmp_path: Path) -> None:
    """Proves the mkdir/rmdir/create/unlink loop and its invariant on the kernel's overlayfs."""
    low, up = tmp_path / "low", tmp_path / "up"
    _recreate_layers(low)
    up.mkdir()
    with kernel_overlay([low], up, tmp_path / "work", tmp_path / "mnt") as m:
        _prepare_recreate(m)
        proc = subprocess.run([sys.executable, "-c", RECREATOR, str(m), str(tmp_path / "progress"), "41"],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith("done"), proc.stdout + proc.stderr
        _check_never_resurrected(m, up, "kernel")
    assert upper_layout(up)["d"] == ("dir", b"y") and upper_layout(up)["f"][0] == "reg"


@pytest.mark.timeout(120)
def test_sigkill_while_recreating_over_whiteouts_never_resurrects_lower_entries(tmp_path: Path, mount: Mount) -> None:
    """kill -9 during mkdir-over-whiteout / create-over-whiteout loops: the lower entries stay hidden.

    A directory made where a whiteout was must replace the whiteout by an
    opaque directory in one step (the kernel exchanges them); removing the
    whiteout first, or setting the opaque mark after the directory appears,
    lets the lower contents show through after a crash.
    """
    low, up, mnt = tmp_path / "low", tmp_path / "up", tmp_path / "mnt"
    _recreate_layers(low)
    up.mkdir()
    mnt.mkdir()
    d = mount([low], up, mnt=mnt)
    _prepare_recreate(mnt)
    rng = random.Random(7)
    for r in range(4):
        progress = tmp_path / "progress"
        progress.write_bytes(b"%12d" % 0)
        proc = subprocess.Popen([sys.executable, "-c", RECREATOR, str(mnt), str(progress), "0"],
                                stdout=subprocess.PIPE, text=True)
        goal = rng.randint(5, 60)
        out = _kill_midway(d, proc, progress, goal, rng.uniform(0, 0.01), f"{goal} loops in round {r}")
        assert out.startswith("error"), f"round {r}: the loop did not see the daemon die: {out!r}"
        d = mount([low], up, mnt=mnt)
        _check_never_resurrected(mnt, up, f"after kill {r}")
        assert work_entries(default_workdir(up)) == [], f"round {r}: work dir not cleaned at mount"
    d.stop()


# --------------------------------------------------------------------------
# Durability: clean unmount, fsync
# --------------------------------------------------------------------------


def _durability_lower(low: Path) -> None:
    put(low / "keep", "keep")
    put(low / "edit", "lower edit")
    put(low / "gone", "gone")
    put(low / "dir/a", "a")
    put(low / "dir/sub/b", "b")
    put(low / "ren", "ren")
    put(low / "meta", "meta")
    put(low / "grow", "")
    os.symlink("keep", low / "sym")


def _durability_changes(m: Path, sync: bool) -> int:
    """Every kind of change; with *sync* each is fsynced (file and directory).  Returns st_ino of "edit"."""
    ino = os.lstat(m / "edit").st_ino
    with open(m / "edit", "r+b") as f:
        f.write(b"UPPER")
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.mkdir(m / "new")
    with open(m / "new/inner", "xb") as f:
        f.write(b"inner\n" * 5000)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.unlink(m / "gone")
    shutil.rmtree(m / "dir")
    os.mkdir(m / "dir")
    put(m / "dir/c", "c")
    os.rename(m / "ren", m / "dir/ren2")
    os.chmod(m / "meta", 0o600)
    os.setxattr(m / "meta", "user.x", b"y")
    os.utime(m / "meta", ns=(5 * 10**9, 6 * 10**9))
    os.symlink("new/inner", m / "sym2")
    os.link(m / "new/inner", m / "new/inner-link")
    os.truncate(m / "grow", 10 * MiB)
    if sync:
        for p in ("meta", "grow", "dir/c", "new", "dir", "."):
            _fsync_path(m / p)
    return ino


def test_clean_unmount_then_remount_shows_the_same_tree(tmp_path: Path, mount: Mount) -> None:
    """After a clean unmount the upper holds exactly what the live view showed (times included)."""
    live, again, inos = {}, {}, {}
    for side in ("kernel", "pyunionfs"):
        low, up, work, mnt = (tmp_path / side / n for n in ("low", "up", "work", "mnt"))
        _durability_lower(low)
        up.mkdir()
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay([low], up, work, mnt):
                lower_ino = _durability_changes(mnt, sync=False)
                live[side] = snapshot(mnt, mtime=True)
                inos[side] = [lower_ino, os.lstat(mnt / "edit").st_ino]
            with kernel_overlay([low], up, work, mnt):
                again[side] = snapshot(mnt, mtime=True)
                inos[side].append(os.lstat(mnt / "edit").st_ino)
        else:
            d = mount([low], up, mnt=mnt)
            lower_ino = _durability_changes(mnt, sync=False)
            live[side] = snapshot(mnt, mtime=True)
            inos[side] = [lower_ino, os.lstat(mnt / "edit").st_ino]
            d.stop()
            work = default_workdir(up)
            assert (work / "work").is_dir(), f"no work dir at {work}/work after copy-ups"
            assert os.lstat(work).st_dev == os.lstat(up).st_dev
            d = mount([low], up, mnt=mnt)
            again[side] = snapshot(mnt, mtime=True)
            inos[side].append(os.lstat(mnt / "edit").st_ino)
            d.stop()
        assert live[side] == again[side], f"{side}: live view (A) vs after remount (B):\n" + "\n".join(
            diff(live[side], again[side]))
        assert len(set(inos[side])) == 1, f"{side}: st_ino of a copied-up file: lower, live, remount = {inos[side]}"
    k, p = _without_times(live["kernel"]), _without_times(live["pyunionfs"])
    assert k == p, "kernel (A) vs pyunionfs (B) after the same changes:\n" + "\n".join(diff(k, p))


def _without_times(s: Snapshot) -> Snapshot:
    """The same snapshot without times (two runs of one scenario differ in their clocks)."""
    return Snapshot(tuple((p, dataclasses.replace(e, mtime_ns=None)) for p, e in s.items()), s.errors, s.root)


def test_fsynced_changes_survive_a_daemon_kill(tmp_path: Path, mount: Mount) -> None:
    """What was fsynced (file and directory) is in the upper even if the daemon dies right after."""
    expected = None
    for side in ("kernel", "pyunionfs"):
        low, up, work, mnt = (tmp_path / side / n for n in ("low", "up", "work", "mnt"))
        _durability_lower(low)
        up.mkdir()
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay([low], up, work, mnt):
                _durability_changes(mnt, sync=True)
                expected = snapshot(mnt)
            continue
        d = mount([low], up, mnt=mnt)
        _durability_changes(mnt, sync=True)
        kill_daemon(d)
        mount([low], up, mnt=mnt)
        got = snapshot(mnt)
        assert expected is not None
        assert got == expected, "kernel, live (A) vs pyunionfs after kill -9 and remount (B):\n" + "\n".join(
            diff(expected, got))


def _mmap_write(m: Path) -> bytes:
    """Write a lower file through a shared mapping (copy-up at open), msync it; return what a read shows."""
    fd = os.open(m / "mapped", os.O_RDWR)
    try:
        with mmap.mmap(fd, 3 * MiB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[5000:5005] = b"HELLO"
            mm[2 * MiB:2 * MiB + 5] = b"WORLD"
            mm.flush()  # msync(MS_SYNC)
    finally:
        os.close(fd)
    return (m / "mapped").read_bytes()


def test_msynced_shared_mapping_survives_a_daemon_kill(tmp_path: Path, mount: Mount) -> None:
    """Writes through a shared mmap reach the upper once msync returns, even if the daemon dies right after."""
    results = {}
    for side in ("kernel", "pyunionfs"):
        low, up, mnt = tmp_path / side / "low", tmp_path / side / "up", tmp_path / side / "mnt"
        put(low / "mapped", bytes(3 * MiB))
        up.mkdir()
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay([low], up, tmp_path / side / "work", mnt):
                live = _mmap_write(mnt)
            results[side] = (live, (up / "mapped").read_bytes())
        else:
            d = mount([low], up, mnt=mnt)
            live = _mmap_write(mnt)
            kill_daemon(d)
            mount([low], up, mnt=mnt)
            results[side] = (live, (mnt / "mapped").read_bytes())
        assert (low / "mapped").read_bytes() == bytes(3 * MiB), f"{side}: the lower file was written"
    expected = bytearray(3 * MiB)
    expected[5000:5005] = b"HELLO"
    expected[2 * MiB:2 * MiB + 5] = b"WORLD"
    assert results["kernel"] == (expected, expected)
    live, after = results["pyunionfs"]
    assert live == expected, "the mapping's writes are not visible through the mount"
    assert after == expected, "msync'ed writes through a shared mapping were lost when the daemon died"


# --------------------------------------------------------------------------
# A large copy-up does not stall the mount
# --------------------------------------------------------------------------


def _probe_during_copy_up(m: Path, watch: tuple[int, Path] | None
                          ) -> tuple[dict[str, Any], list[tuple[float, float]], bool]:
    """Copy up ``m/big`` in a child while this process stats and lists the mount; return timings.

    Returns the writer's result ({t0, t1, errno}), ``(start, latency)`` of
    every probe that started while the copy-up was running (start counted
    from the copy-up's start), and whether a temporary was seen in the
    watched work dir (``watch`` = (daemon pid, workdir)).
    """
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m / "big")], stdout=subprocess.PIPE, text=True)
    probes: list[tuple[float, float]] = []
    seen_tmp = False
    i = 0
    try:
        while writer.poll() is None:
            t_a = time.monotonic()
            os.stat(m / "small")
            assert errno_of(os.stat, m / f"absent-{i}") == errno.ENOENT
            assert len(os.listdir(m / "dir")) == 20
            ls = subprocess.run(["ls", "-l", str(m / "dir")], capture_output=True, timeout=60)
            assert ls.returncode == 0, ls.stderr
            probes.append((t_a, time.monotonic()))
            if watch is not None and not seen_tmp:
                seen_tmp = any(n > 0 for n in temporaries(*watch).values())
            i += 1
        out, _ = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    result = json.loads(out)
    during = [(a - result["t0"], b - a) for a, b in probes if result["t0"] <= a <= result["t1"]]
    return result, during, seen_tmp


@pytest.mark.timeout(180)
def test_large_copy_up_does_not_stall_other_requests(tmp_path: Path, mount: Mount, big_files: list[Path]) -> None:
    """While a 1 GiB file is copied up, stat and ls of other names in the mount answer promptly.

    The bound is generous (at most 2 s) but must be below the copy-up time
    to mean anything: a daemon that serves requests one at a time makes a
    probe wait until the copy ends.  So the copy-up itself is measured, the
    bound is 60% of it (2 s at most), and a probe must have started in the
    first 30% of the copy: a stall would keep that one waiting for at least
    70% of the copy, above the bound.  If the disk copies too fast for that
    to be told apart from scheduling noise, the test skips.
    This run also uses ``-o workdir=`` and checks the temporary is built there.
    """
    low = tmp_path / "low"
    low.mkdir()
    big_files += [low / "big", tmp_path / "kernel-up/big", tmp_path / "up/big"]
    big_hash = fill_file(low / "big", GiB)
    put(low / "small", "small")
    for k in range(20):
        put(low / f"dir/f{k}", str(k))

    kup = tmp_path / "kernel-up"
    kup.mkdir()
    _drop_page_cache()
    with kernel_overlay([low], kup, tmp_path / "kernel-work", tmp_path / "kernel-mnt") as km:
        k_result, k_during, _ = _probe_during_copy_up(km, None)
    assert k_result["errno"] == 0
    k_time = k_result["t1"] - k_result["t0"]
    k_max = max((lat for _, lat in k_during), default=0.0)
    assert k_during and k_max < 2.0, f"kernel: copy-up {k_time:.2f}s, probes (start, latency) {k_during}"

    up, custom = tmp_path / "up", tmp_path / "custom-work"
    up.mkdir()
    custom.mkdir()
    _drop_page_cache()
    d = mount([low], up, f"workdir={custom}", "timeout=0")
    result, during, seen_tmp = _probe_during_copy_up(d.mnt, (d.proc.pid, custom))
    assert result["errno"] == 0, f"copy-up by a write failed: {errname(result['errno'])}"
    copy_time = result["t1"] - result["t0"]
    assert sha256_file(up / "big") == big_hash, "the copied-up file differs from the lower one"
    assert seen_tmp, f"no copy-up temporary was seen in -o workdir={custom} (has {temporaries(0, custom)})"
    assert not default_workdir(up).exists(), "-o workdir was given but the default work dir was created too"
    assert os.lstat(custom).st_dev == os.lstat(up).st_dev
    d.stop()
    bound = min(2.0, 0.6 * copy_time)
    if copy_time < 0.5:
        pytest.skip(f"the copy-up took only {copy_time:.2f}s (kernel {k_time:.2f}s): too fast to observe a stall")
    shown = [(round(a, 2), round(b, 3)) for a, b in during]
    assert during and during[0][0] <= 0.3 * copy_time, (
        f"no probe started early in the {copy_time:.2f}s copy-up, a stall could not be seen: {shown}")
    worst = max(lat for _, lat in during)
    assert worst < bound, (
        f"a stat/ls took {worst:.2f}s during a {copy_time:.2f}s copy-up (bound {bound:.2f}s; kernel: {k_max:.3f}s "
        f"max during {k_time:.2f}s); probes (start, latency): {shown}")


# --------------------------------------------------------------------------
# Concurrent first writes to one lower file
# --------------------------------------------------------------------------

# Child processes that wait for a start signal, then open one file for
# writing at the same moment and each write their own MiB.
RACER = r"""
import os, sys, time
path, start, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(start + ".ready%d" % k, "w").close()
while not os.path.exists(start):
    time.sleep(0.001)
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, bytes([65 + k]) * (1 << 20), k * (4 << 20))
os.close(fd)
"""


def _race_first_writes(path: Path, start: Path, n: int) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(start), str(k)],
                              stderr=subprocess.PIPE, text=True) for k in range(n)]
    try:
        wait_for(lambda: all(Path(f"{start}.ready{k}").exists() for k in range(n)), 30, "the writers to start")
        start.touch()
        return [p.communicate(timeout=60)[1] for p in procs if p.wait(timeout=60) != 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_concurrent_first_writes_copy_up_once_and_lose_nothing(tmp_path: Path, mount: Mount) -> None:
    """Several processes write to one lower file at once: one copy-up, and every write is in it."""
    n = 6
    results = {}
    for side in ("kernel", "pyunionfs"):
        low, up = tmp_path / side / "low", tmp_path / side / "up"
        low.mkdir(parents=True)
        up.mkdir()
        fill_file(low / "f", 4 * n * MiB)
        expected = bytearray((low / "f").read_bytes())
        for k in range(n):
            expected[k * 4 * MiB:(k * 4 + 1) * MiB] = bytes([65 + k]) * MiB
        _drop_page_cache()
        if side == "kernel":
            with kernel_overlay([low], up, tmp_path / side / "work", tmp_path / side / "mnt") as m:
                errors = _race_first_writes(m / "f", tmp_path / side / "go", n)
                seen = hashlib.sha256((m / "f").read_bytes()).hexdigest()
        else:
            d = mount([low], up)
            errors = _race_first_writes(d.mnt / "f", tmp_path / side / "go", n)
            seen = hashlib.sha256((d.mnt / "f").read_bytes()).hexdigest()
            d.stop()
        want = hashlib.sha256(expected).hexdigest()
        results[side] = (errors, seen == want, sha256_file(up / "f") == want)
    assert results["kernel"] == ([], True, True), results["kernel"]
    errors, live_ok, upper_ok = results["pyunionfs"]
    assert not errors, f"writers failed: {errors}"
    assert live_ok, "a write was lost: the file seen through the mount lacks one of the concurrent writes"
    assert upper_ok, "a write was lost: the upper file lacks one of the concurrent writes"


# --------------------------------------------------------------------------
# rename over an existing file is atomic
# --------------------------------------------------------------------------


def _replace_storm(m: Path, n: int) -> tuple[int, list[str]]:
    """Rename fresh and lower files over ``target`` while a thread keeps reading it.

    Returns (reads done, problems seen by the reader).  An atomic replace
    means the reader always finds the name and always a complete version.
    """
    stop = threading.Event()
    problems: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                data = (m / "target").read_bytes()
            except OSError as exc:
                problems.append(f"read: {errname(exc.errno or 0)}")
                continue
            reads += 1
            head = data.split(b"\n", 1)[0]
            if not head.startswith(b"version ") or data != head + b"\n" + head * 2000:
                problems.append(f"torn content: {data[:30]!r}... ({len(data)} bytes)")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(n):
            if k % 2:
                os.rename(m / f"src{k}", m / "target")  # a lower file over it
            else:
                head = b"version new%d" % k
                with open(m / f"tmp{k}", "xb") as f:
                    f.write(head + b"\n" + head * 2000)
                os.rename(m / f"tmp{k}", m / "target")
    finally:
        stop.set()
        t.join(30)
    return reads, problems


def test_rename_over_a_file_is_atomic(tmp_path: Path, mount: Mount) -> None:
    """Replacing a name by rename never lets a reader see it missing or half-written; old names leave whiteouts."""
    n = 300
    outcome = {}
    for side in ("kernel", "pyunionfs"):
        low, up = tmp_path / side / "low", tmp_path / side / "up"
        head = b"version lower"
        put(low / "target", head + b"\n" + head * 2000)
        for k in range(1, n, 2):
            head = b"version src%d" % k
            put(low / f"src{k}", head + b"\n" + head * 2000)
        up.mkdir()
        if side == "kernel":
            with kernel_overlay([low], up, tmp_path / side / "work", tmp_path / side / "mnt") as m:
                reads, problems = _replace_storm(m, n)
                listing = sorted(os.listdir(m))
                final = (m / "target").read_bytes()[:20]
        else:
            d = mount([low], up)
            reads, problems = _replace_storm(d.mnt, n)
            listing = sorted(os.listdir(d.mnt))
            final = (d.mnt / "target").read_bytes()[:20]
            d.stop()
        layout = upper_layout(up)
        outcome[side] = (problems[:5], listing, final, sorted(k for k, v in layout.items() if v == ("whiteout",)))
        assert reads > 0
    assert outcome["kernel"][0] == [], f"kernel: {outcome['kernel'][0]}"
    assert outcome["kernel"][1] == ["target"]
    assert outcome["pyunionfs"] == outcome["kernel"], (
        f"\nkernel    {outcome['kernel']}\npyunionfs {outcome['pyunionfs']}")


@pytest.mark.parametrize("where", ["other-filesystem", "inside-upper", "inside-lower", "mountpoint"])
def test_bad_workdir_is_refused(tmp_path: Path, where: str) -> None:
    """-o workdir must be on the upper's filesystem (copy-up renames from it) and outside layers and mountpoint.

    The kernel refuses the first two the same way; pyunionfs's README also
    refuses a workdir inside a lower or at the mountpoint.
    """
    low, up, mnt, other = (tmp_path / n for n in ("low", "up", "mnt", "other"))
    for p in (low, up, mnt, other):
        p.mkdir()
    put(low / "f", "f")
    work = {"other-filesystem": other / "w", "inside-upper": up / "w", "inside-lower": low / "w",
            "mountpoint": mnt}[where]
    if where == "other-filesystem":
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        work.mkdir(exist_ok=True)
        if where in ("other-filesystem", "inside-upper"):  # (the kernel takes the other two; the README does not)
            with pytest.raises(RuntimeError), kernel_overlay([low], up, work, tmp_path / "kmnt"):
                pass
        res = subprocess.run([sys.executable, "-m", "pyunionfs", "mount", str(low), str(up), str(mnt),
                              "-o", f"workdir={work}"], capture_output=True, text=True, timeout=30)
        mounted = is_mounted(mnt)
        if mounted:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
            force_unmount(mnt)
    finally:
        if where == "other-filesystem":
            subprocess.run(["umount", "-l", str(other)], capture_output=True, timeout=30)
    assert res.returncode in (1, 2) and not mounted, f"mounted with workdir {where}: {res.returncode} {res.stderr}"
    assert res.stderr.startswith("pyunionfs: ") and res.stderr.count("\n") == 1, res.stderr
