"""The files of a big directory after ``ls -l``: held by the daemon as columns, answered as objects.

Why: ``ls -l`` of a huge lower directory makes the kernel hold an inode for every entry, and the
daemon keeps those nodes as a few bytes in arrays (``fs/residents.py``) instead of an object each.
Whatever the kernel then asks of one of them must reach that very file, as on the kernel's
overlayfs: the attributes and xattrs ``ls -l`` reads, an open, an unlink or a rename with an old
descriptor still open, a copy-up, another user's permission checks.  Each story runs on the kernel
first, then on pyunionfs, which must answer the same; the race at the end runs on pyunionfs only
(the kernel's answers do not depend on timing).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyunionfs.fs.residents import RESIDENT_FROM
from pyunionfs.fuse import control
from tests.support.mounting import Daemon
from tests.support.writecheck import errname, errno_of, on_kernel_and_ours, public_dir, put, run_as

Mount = Callable[..., Daemon]
N = RESIDENT_FROM + 476


def _name(i: int) -> str:
    return f"f{i:04d}"


def _build(low: Path) -> None:
    big = low / "big"
    big.mkdir(mode=0o755)
    os.chmod(low, 0o755)
    for i in range(N):
        put(big / _name(i), f"file {i}\n", 0o600 if i == 11 else 0o644)
    os.setxattr(big / _name(7), "user.colour", b"blue")


def _resident(m: Path) -> int | None:
    """How many nodes pyunionfs holds as columns (None on the kernel, which has no such count)."""
    try:
        return control.stats(os.fsencode(m)).get("resident_nodes")
    except OSError:
        return None


def _story(m: Path) -> dict[str, Any]:
    big = m / "big"
    early = os.open(big / _name(1), os.O_RDONLY)  # opened before the listing
    obs: dict[str, Any] = {}
    try:
        obs["ls -l"] = subprocess.run(["ls", "-l", "--time-style=+", str(big)], capture_output=True, text=True,
                                      check=True, timeout=120).stdout
        obs["resident"] = _resident(m)
        before = {i: os.lstat(big / _name(i)).st_ino for i in range(12)}
        obs["xattrs"] = (os.getxattr(big / _name(7), "user.colour"), os.listxattr(big / _name(6)),
                         errname(errno_of(os.getxattr, big / _name(6), "user.colour")))
        obs["second user"] = run_as(1000, 1000, m, """
out["cat 11"] = err(lambda: open(m + "/big/f0011").read())
out["cat 12"] = open(m + "/big/f0012").read()
out["stat 11 mode"] = oct(os.lstat(m + "/big/f0011").st_mode)
""")
        fd2 = os.open(big / _name(2), os.O_RDONLY)
        os.unlink(big / _name(2))
        obs["unlinked: nlink, data, name"] = (os.fstat(fd2).st_nlink, os.pread(fd2, 100, 0),
                                              errname(errno_of(os.lstat, big / _name(2))))
        os.close(fd2)
        os.rename(big / _name(3), big / "moved")
        obs["moved: data, old name, same inode"] = ((big / "moved").read_bytes(),
                                                   errname(errno_of(os.lstat, big / _name(3))),
                                                   os.lstat(big / "moved").st_ino == before[3])
        os.chmod(big / _name(4), 0o640)
        obs["chmod"] = (oct(os.lstat(big / _name(4)).st_mode), os.lstat(big / _name(4)).st_ino == before[4])
        with open(big / _name(5), "ab") as f:
            f.write(b"more\n")
        obs["appended"] = (big / _name(5)).read_bytes()
        os.setxattr(big / _name(6), "user.t", b"1")
        obs["xattr set"] = (os.getxattr(big / _name(6), "user.t"), os.lstat(big / _name(6)).st_ino == before[6])
        fd8 = os.open(big / _name(8), os.O_RDONLY)
        os.rename(big / _name(9), big / _name(8))
        obs["replaced: old fd, name, numbers"] = (os.pread(fd8, 100, 0), (big / _name(8)).read_bytes(),
                                                  os.fstat(fd8).st_ino == before[8],
                                                  os.lstat(big / _name(8)).st_ino == before[9])
        os.close(fd8)
        obs["early fd"] = (os.pread(early, 100, 0), os.fstat(early).st_ino == os.lstat(big / _name(1)).st_ino)
        obs["entries"] = sorted((e.name, e.stat(follow_symlinks=False).st_size) for e in os.scandir(big))
        obs["ls -l after"] = subprocess.run(["ls", "-l", "--time-style=+", str(big)], capture_output=True,
                                            text=True, check=True, timeout=120).stdout
    finally:
        os.close(early)
    return obs


def test_files_listed_with_ls_l_answer_as_themselves(tmp_path: Path, mount: Mount) -> None:
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _build, _story, mnt_parent=pub)
    k, p = results["kernel"], results["pyunionfs"]
    assert k.pop("resident") is None
    resident = p.pop("resident")
    assert resident is not None and resident >= N - 2, f"{resident} of {N} listed files held as columns"
    assert k["second user"] == {"cat 11": "EACCES", "cat 12": "file 12\n", "stat 11 mode": "0o100600"}, k
    assert k["replaced: old fd, name, numbers"] == (b"file 8\n", b"file 9\n", True, True), k
    for key in k:
        assert p[key] == k[key], f"{key}:\nkernel:    {k[key]!r}\npyunionfs: {p[key]!r}"


def _race(big: Path, numbers: dict[int, bytes], names: range, seconds: float,
          others: list[Callable[[threading.Event], None]]) -> list[str]:
    """Open the files *names* again and again for *seconds* while *others* run: every descriptor
    must read the file its number says (*numbers*: inode number -> content).  What went wrong."""
    stop = threading.Event()
    failures: list[str] = []
    threads = [threading.Thread(target=fn, args=(stop,)) for fn in others]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i in names:
                try:
                    fd = os.open(big / _name(i), os.O_RDONLY)
                except FileNotFoundError:
                    continue  # (caught between two renames)
                try:
                    data, ino = os.pread(fd, 100, 0), os.fstat(fd).st_ino
                finally:
                    os.close(fd)
                if numbers.get(ino) != data:
                    failures.append(f"{_name(i)}: inode {ino} read {data!r}, its file holds {numbers.get(ino)!r}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return failures


def test_listings_forgets_renames_and_opens_racing_never_swap_objects(tmp_path: Path, mount: Mount) -> None:
    """First, with the directory as it is in the lower, ``ls -l`` makes nodes resident while the
    kernel forgets them (its caches dropped) and files are opened and read by name; then names are
    renamed around meanwhile as well.  Every descriptor reads the file its name held when it was
    opened, and stat of it shows that file's number."""
    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    up.mkdir()
    _build(low)
    m = mount([low], up).mnt
    big = m / "big"
    numbers = {os.lstat(low / "big" / _name(i)).st_ino: f"file {i}\n".encode() for i in range(N)}
    failures: list[str] = []

    def lister(stop: threading.Event) -> None:
        while not stop.is_set():
            res = subprocess.run(["ls", "-l", str(big)], capture_output=True, text=True, timeout=120)
            # (A name renamed away between its listing and its lstat is gone, as on any filesystem.)
            odd = [line for line in res.stderr.splitlines() if "No such file or directory" not in line]
            if odd or res.returncode not in (0, 1):
                failures.append(f"ls -l: {res.returncode} {odd}")

    def forgetter(stop: threading.Event) -> None:
        while not stop.wait(0.05):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")

    def renamer(stop: threading.Event) -> None:
        k = 0
        while not stop.is_set():
            a, b = 20 + k % 20, 20 + (k * 7 + 3) % 20
            if a != b:
                os.rename(big / _name(a), big / "swap")
                os.rename(big / _name(b), big / _name(a))
                os.rename(big / "swap", big / _name(b))
            k += 1

    failures += _race(big, numbers, range(0, N, 37), 2, [lister, forgetter])
    assert not failures, failures[:5]
    failures += _race(big, numbers, range(20, 40), 2, [lister, forgetter, renamer])
    assert not failures, failures[:5]
    assert sorted(f"file {i}\n".encode() for i in range(20, 40)) == sorted(
        (big / _name(i)).read_bytes() for i in range(20, 40))
