"""No user can starve the others, and ``trusted.*`` stays hidden from callers who may not see it.

* The daemon holds an fd for every open file on the mount: with one fd limit for everyone, a user
  holding as many open files as that limit made every open, ``ls`` and create fail with EMFILE,
  root's included.  Now the daemon's limit is what the system allows and each uid's handles are
  bounded (``-o max_files_per_uid=N``): the hog gets EMFILE, everyone else carries on.
* Open directories cost the native engine nothing: the kernel opens them without asking
  (``FUSE_NO_OPENDIR_SUPPORT``), so no user can run the daemon out of handles with them.  The
  listings their readers are in the middle of are held, bounded in names whatever the number of
  readers; a reader resumes in the listing it started on, whatever changed in the directory.
  The reference engine has a handle per open directory; they share the listing of the directory
  version they read, freed when the last one closes.
* ``listxattr`` shows ``trusted.*`` only to callers with CAP_SYS_ADMIN, as the kernel's overlayfs:
  compared with it as a plain user, as root without CAP_SYS_ADMIN and as root, with system calls,
  a dump as ``getfattr -d -m -`` makes it (each listed name read back) and with ``cp -a`` and
  ``tar --xattrs``.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyunionfs.fs.cache import MAX_HELD_NAMES
from pyunionfs.fs.directories import offset_of
from pyunionfs.fuse import control
from tests.support.mounting import EACH_ENGINE, Daemon
from tests.support.writecheck import on_kernel_and_ours, public_dir, put, run_as

Mount = Callable[..., Daemon]

#: Opens a file per name given on stdin-less argv until one fails, keeps them open, says so, and
#: waits for a line on stdin; then checks that opening works again after closing them.
_HOG = r"""
import errno, json, os, sys
os.setgroups([]); os.setgid(1000); os.setuid(1000)
m = sys.argv[1]
def err(fn, *a):
    try:
        r = fn(*a)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    if isinstance(r, int):
        os.close(r)
    return "ok"
held, refused = [], None
for i in range(200):
    try:
        held.append(os.open(f"{m}/files/f{i}", os.O_RDONLY))
    except OSError as e:
        refused = errno.errorcode.get(e.errno, str(e.errno))
        break
out = {"held": len(held), "refused": refused,
       "opendir": err(os.open, f"{m}/files", os.O_RDONLY | os.O_DIRECTORY),
       "create": err(os.open, f"{m}/pub/hog-new", os.O_WRONLY | os.O_CREAT, 0o644)}
print(json.dumps(out), flush=True)
sys.stdin.readline()
for fd in held:
    os.close(fd)
# The kernel sends RELEASE after close() has returned, and the daemon's workers may answer the
# next OPEN first: the handles are given back within moments, not at once.
import time
deadline = time.monotonic() + 10
while (again := err(os.open, f"{m}/files/f0", os.O_RDONLY)) == "EMFILE" and time.monotonic() < deadline:
    time.sleep(0.01)
out = {"again": again, "ls": len(os.listdir(f"{m}/files"))}
print(json.dumps(out), flush=True)
"""

_OTHERS = """
out["open"] = err(lambda: os.close(os.open(m + "/files/f1", os.O_RDONLY)))
out["ls"] = len(os.listdir(m + "/files"))
out["create"] = err(mkfile, m + "/pub/by-" + str(os.getuid()))
"""


def _daemon_limits(d: Daemon) -> tuple[int, int]:
    for line in Path(f"/proc/{d.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no fd limit in /proc/PID/limits")


@pytest.mark.timeout(120)
def test_the_daemon_takes_every_fd_the_system_allows(tmp_path: Path, mount: Mount) -> None:
    for layer in ("low", "up"):
        (tmp_path / layer).mkdir()
    d = mount([tmp_path / "low"], tmp_path / "up")
    # Up to fs.nr_open with CAP_SYS_RESOURCE (which the daemon inherits from us), else the hard limit.
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    probe = f"import resource as r; r.setrlimit(r.RLIMIT_NOFILE, ({nr_open}, {nr_open}))"
    capable = subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    most = nr_open if capable else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert _daemon_limits(d) == (most, most)


@EACH_ENGINE
@pytest.mark.timeout(180)
def test_a_user_holding_many_files_starves_only_itself(tmp_path: Path, mount: Mount, engine: str) -> None:
    with public_dir() as pub:
        low = pub / "low"
        for i in range(60):
            put(low / f"files/f{i}", b"x")
        (low / "pub").mkdir()
        os.chmod(low / "pub", 0o777)
        (pub / "up").mkdir()
        d = mount([low], pub / "up", "max_files_per_uid=40", mnt=pub / "mnt")
        m = str(d.mnt)
        hog = subprocess.Popen([sys.executable, "-c", _HOG, m], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
        try:
            assert hog.stdout is not None and hog.stdin is not None
            first = json.loads(hog.stdout.readline())
            # The hog reached its own bound: its opens and creates fail with EMFILE; its opendirs
            # too where a directory costs a handle (pyfuse3: the native engine holds none for them).
            opendir = "EMFILE" if engine == "pyfuse3" else "ok"
            assert first == {"held": 40, "refused": "EMFILE", "opendir": opendir, "create": "EMFILE"}
            assert not (pub / "up/pub/hog-new").exists()
            # Everyone else carries on: root, and another user.
            with open(d.mnt / "files/f2", "rb") as f:
                assert f.read() == b"x"
            assert len(os.listdir(d.mnt / "files")) == 60
            (d.mnt / "pub/by-root").write_bytes(b"r")
            assert run_as(1001, 1001, d.mnt, _OTHERS) == {"open": "ok", "ls": 60, "create": "ok"}
            hog.stdin.write("\n")
            hog.stdin.flush()
            # Its files closed, the hog opens and lists again.
            assert json.loads(hog.stdout.readline()) == {"again": "ok", "ls": 60}
            assert hog.wait(timeout=30) == 0
        finally:
            if hog.poll() is None:
                hog.kill()
                hog.wait()


def _vmrss(pid: int) -> int:
    """Resident memory of process *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _big_directory(tmp_path: Path, n: int = 20_000) -> tuple[list[Path], Path]:
    """A lower holding ``big/`` with *n* entries of longish names, and an empty upper."""
    low = tmp_path / "low"
    (low / "big").mkdir(parents=True)
    for i in range(n):
        (low / "big" / f"entry-with-a-longish-name-{i:06d}").touch()
    (tmp_path / "up").mkdir()
    return [low], tmp_path / "up"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["pyfuse3"], indirect=True)
def test_open_directories_share_their_listing(tmp_path: Path, mount: Mount, engine: str) -> None:
    """200 handles on a 20,000-entry directory, each opened after a change made and undone in it
    (a temporary file), hold one listing; all of them closed, none (the reference engine, whose
    directories have handles; the daemon's memory shows it)."""
    d = mount(*_big_directory(tmp_path))
    big = d.mnt / "big"
    fds = [os.open(big, os.O_RDONLY | os.O_DIRECTORY)]
    assert len(os.listdir(big)) == 20_000
    before = _vmrss(d.proc.pid)
    for _ in range(199):
        (big / "tmp").write_bytes(b"")
        (big / "tmp").unlink()
        fds.append(os.open(big, os.O_RDONLY | os.O_DIRECTORY))
    grown = _vmrss(d.proc.pid) - before
    for fd in fds:
        os.close(fd)
    # A listing of 20,000 names costs about 2 MB: 200 of them would be 400 MB.
    assert grown < 40 << 20, f"the daemon grew by {grown >> 20} MiB for 200 handles on one directory"


def _take(it: Iterator[os.DirEntry[str]], count: int) -> list[str]:
    """The next *count* names (fewer at the end) of directory iterator *it*."""
    return [e.name for e in itertools.islice(it, count)]


@pytest.mark.timeout(300)
def test_open_directories_hold_nothing_and_their_listings_are_bounded(tmp_path: Path, mount: Mount) -> None:
    """200 open directories hold no handle in the daemon.  Their 200 readers, half-way through 200
    versions of a 20,000-entry directory (each read begun after a change made and undone in it),
    hold at most the bound's names; each then reads on to the end and sees every name once."""
    d = mount(*_big_directory(tmp_path))
    big, mnt = d.mnt / "big", os.fsencode(d.mnt)
    names = {f"entry-with-a-longish-name-{i:06d}" for i in range(20_000)}
    readers = [os.scandir(big) for _ in range(200)]
    try:
        assert control.stats(mnt)["open_dirs"] == 0
        before = _vmrss(d.proc.pid)
        seen = []
        for it in readers:
            (big / "tmp").write_bytes(b"")  # a new version, and the kernel's cached listing dropped
            (big / "tmp").unlink()
            seen.append(_take(it, 10_000))
        held = control.stats(mnt)
        grown = _vmrss(d.proc.pid) - before
        for it, listed in zip(readers, seen, strict=True):
            listed += _take(it, 30_000)
    finally:
        for it in readers:
            it.close()
    # 200 listings of 20,000 names would be 400 MB; MAX_HELD_NAMES bounds them to about 20 MiB.
    assert held["open_dirs"] == 0 and 0 < held["held_names"] <= MAX_HELD_NAMES
    assert grown < 60 << 20, f"the daemon grew by {grown >> 20} MiB for 200 readers of one directory"
    for listed in seen:
        assert len(listed) == 20_000 and set(listed) == names


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_a_reader_resumes_in_its_listing_whatever_changes_meanwhile(tmp_path: Path, mount: Mount, where: str) -> None:
    """Half-way through a directory (of the lower, or made through the mount), half the names not
    read yet are removed and 1,000 made: every name neither removed nor made is still read exactly
    once (POSIX), none twice.  (In the upper, a removed name leaves no whiteout: the names after it
    would move down in a new listing.)"""
    d = mount(*_big_directory(tmp_path, 5_000 if where == "lower" else 0))
    big = d.mnt / "big"
    before = {f"entry-with-a-longish-name-{i:06d}" for i in range(5_000)}
    if where == "upper":
        big = d.mnt / "made"
        big.mkdir()
        for name in before:
            (big / name).write_bytes(b"")
    # (Nothing else reads the directory meanwhile: the kernel would finish its cached listing and
    # the reader read on from there, not ask the daemon.)
    with os.scandir(big) as it:
        first = _take(it, 2_500)
        gone = sorted(before - set(first))[::2]
        for name in gone:
            os.unlink(big / name)
        for i in range(1_000):
            (big / f"new-{i}").write_bytes(b"")
        listed = first + _take(it, 100_000)
    assert len(listed) == len(set(listed)), "a name was read twice"
    assert before - set(gone) <= set(listed), "a name that stayed was skipped"


#: Guessed offsets: versions 1 to 64 in each form an offset may take (short with the position
#: bits of 200 or 2,000 names, or long), pointing at the first name.
_GUESSES = [offset_of(v, bits, 2) for v in range(1, 65) for bits in (8, 11, None)]
_GUESS = f"""
fd = os.open(m + "/open", os.O_RDONLY | os.O_DIRECTORY)
seen = set()
for cookie in {_GUESSES!r}:
    for _ in range(2):  # (READDIRPLUS after a lookup in the directory, READDIR otherwise)
        os.lseek(fd, cookie, os.SEEK_SET)
        with os.scandir(fd) as it:
            seen.update(e.name for e in it)
out["hidden"] = sorted(n for n in seen if n.startswith("hidden-"))
out["shown"] = len([n for n in seen if n.startswith("shown-")])
out["secret"] = err(os.listdir, m + "/secret")
"""


@pytest.mark.timeout(120)
def test_no_offset_lists_a_directory_its_reader_may_not_read(tmp_path: Path, mount: Mount) -> None:
    """Offsets carry the version of the listing they point into, and a reader may lseek its
    directory to any offset: a user guessing the versions of root's 0700 directory's listing,
    held while root reads it, sees none of its names through a directory of its own."""
    with public_dir() as pub:
        low = pub / "low"
        for i in range(2_000):  # (more than one READDIRPLUS holds: the rest come by READDIR)
            put(low / f"secret/hidden-{i:04d}", b"")
        for i in range(200):
            put(low / f"open/shown-{i:03d}", b"")
        os.chmod(low / "secret", 0o700)
        (pub / "up").mkdir()
        d = mount([low], pub / "up", mnt=pub / "mnt")
        with os.scandir(d.mnt / "secret") as it:  # root, part-way through: its listing is held
            assert len(_take(it, 1_000)) == 1_000
            out = run_as(1000, 1000, d.mnt, _GUESS)
        assert out == {"hidden": [], "shown": 200, "secret": "EACCES"}


# -- trusted.* by capability, against the kernel ----------------------------------------------------

#: Each xattr call of a caller on a lower file and on an upper one, a dump of every listed name,
#: then cp -a and tar --xattrs: their exit status and whether they complained.
_XATTR_PROBE = r"""
import errno, json, os, subprocess, sys
m, dest = sys.argv[1], sys.argv[2]
def e(fn, *a):
    try:
        r = fn(*a)
    except OSError as x:
        return errno.errorcode.get(x.errno, str(x.errno))
    return sorted(r) if isinstance(r, list) else (r.decode() if isinstance(r, bytes) else "ok")
out = {}
for name in ("lowerfile", "upperfile"):
    p = f"{m}/{name}"
    out[name] = {"list": e(os.listxattr, p), "get": e(os.getxattr, p, "trusted.t"),
                 "get_missing": e(os.getxattr, p, "trusted.none"), "get_user": e(os.getxattr, p, "user.u"),
                 "set": e(os.setxattr, p, "trusted.t", b"new"), "set_new": e(os.setxattr, p, "trusted.n", b"1"),
                 "remove": e(os.removexattr, p, "trusted.t"), "remove_missing": e(os.removexattr, p, "trusted.none")}
cp = subprocess.run(["cp", "-a", f"{m}/lowerfile", f"{dest}/copy"], capture_output=True, text=True)
# getfattr -d -m -: every listed name read back (a listed name that cannot be read is an error).
out["dump"] = {n: e(os.getxattr, f"{m}/lowerfile", n) for n in os.listxattr(f"{m}/lowerfile")}
out["cp -a"] = [cp.returncode, cp.stderr.replace(m, "MNT")]
tar = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-cf", f"{dest}/t.tar", "-C", m, "lowerfile"],
                     capture_output=True, text=True)
out["tar --xattrs"] = [tar.returncode, tar.stderr.replace(m, "MNT")]
print(json.dumps(out))
"""

#: setpriv arguments of each identity the probe runs as.
_WHO = {
    "uid 1000": ["--reuid=1000", "--regid=1000", "--clear-groups"],
    "root without CAP_SYS_ADMIN": ["--inh-caps=-sys_admin", "--bounding-set=-sys_admin"],
    "root": [],
}


def _xattr_lower(low: Path) -> None:
    put(low / "lowerfile", b"l")
    os.setxattr(low / "lowerfile", "trusted.t", b"lower")
    os.setxattr(low / "lowerfile", "user.u", b"u")


def _xattr_story(m: Path) -> dict[str, object]:
    (m / "upperfile").write_bytes(b"u")
    os.setxattr(m / "upperfile", "trusted.t", b"upper")
    os.setxattr(m / "upperfile", "user.u", b"u")
    os.chmod(m / "upperfile", 0o666)
    out: dict[str, object] = {}
    with public_dir("pyunionfs-dest-") as dest:
        for who, args in _WHO.items():
            os.chmod(dest, 0o777)
            res = subprocess.run(["setpriv", *args, "--", sys.executable, "-c", _XATTR_PROBE, str(m), str(dest)],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"the probe as {who} failed:\n{res.stderr}"
            out[who] = json.loads(res.stdout)
            for leftover in dest.iterdir():
                leftover.unlink()
    return out


@EACH_ENGINE
@pytest.mark.timeout(180)
def test_trusted_xattrs_are_the_kernels_business_by_capability(tmp_path: Path, mount: Mount) -> None:
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _xattr_lower, _xattr_story, mnt_parent=pub)
    kernel, ours = results["kernel"], results["pyunionfs"]
    # What the kernel says (so that the comparison below compares the right thing).
    plain = kernel["uid 1000"]["lowerfile"]
    assert plain["list"] == ["user.u"] and plain["get"] == "ENODATA" and plain["set"] == "EPERM"
    assert kernel["root"]["lowerfile"]["list"] == ["trusted.t", "user.u"]
    assert kernel["uid 1000"]["cp -a"] == [0, ""]
    for who in _WHO:
        assert ours[who] == kernel[who], f"as {who}:\n  kernel    {kernel[who]}\n  pyunionfs {ours[who]}"
