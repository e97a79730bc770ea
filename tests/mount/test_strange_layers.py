"""Strange but legal layer contents are served correctly or refused with the right errno (issue 6).

Why: layers come from anywhere (image tarballs, other tools, other users),
and everything a Linux filesystem allows can be in them: names with
newlines, tabs, backslashes, control characters or bytes that are not
UTF-8, names of exactly 255 bytes, trees 10,000 directories deep (deeper
than any path a single syscall accepts), a directory with a million
entries, fifos, devices, sockets, dangling and looping symlinks, files and
directories nobody may read.  A union filesystem must serve all of it like
a local filesystem, refuse per request with the errno a local filesystem
gives where that is the answer, and never crash (an exception ends
pyfuse3's loop and leaves a dead mount), hang or recurse out of stack.

How: each test builds such a lower (and writes through the mount, so the
upper gets the same strange names), then runs the same story on the
kernel's overlayfs (``index=on,redirect_dir=off,metacopy=off``, as the
other write tests) and on pyunionfs, and requires the same observations:
listings, lstat fields (everything but st_dev, st_ino and st_ctime, which
belong to the instance), data, symlink targets, errnos, and afterwards the
same upper layer on disk (``upper_layout``: whiteouts by exact byte name,
opaque markers, file data).  What the kernel shows is also checked against
the specification (the oracle must not be wrong).  After each story the
daemon must still answer, and it must exit 0 with no traceback in its log
at unmount (the ``mount`` fixture and :meth:`Daemon.stop` check that).

The two big cases build their lowers on a private tmpfs (``scratch``), for
speed and because a 10,000-deep tree cannot be removed with a recursive
``rm`` from Python (unmounting the tmpfs removes everything at once).
Measured on the 2-core machine this was written on (other test runs going):

* the deep tree is 10,000 levels (``PYUNIONFS_DEEP``) for reading *and* for
  the write that copies up all 10,000 parent directories: the walk to the
  leaf takes ~1 s through pyunionfs, the copy-up write ~3 s (the kernel
  ~2.7 s), find(1) over the tree ~4-5 s; the daemon's peak RSS is ~380 MB
  (it keeps each node's full path: the paths alone add up to depth^2 bytes);
  the whole test ~14 s;
* the big directory has 200,000 entries by default (build 0.4 s, 3.3 s per
  full listing through pyunionfs, daemon peak RSS ~270 MB, test ~9 s);
  ``PYUNIONFS_BIG_DIR=1000000`` runs the million: build 3 s, 19-20 s per
  listing through pyunionfs (0.3 s on the kernel's overlayfs), daemon peak
  RSS 1.18 GB (the resolution cache is bounded at 100,000 names, but a
  directory's listing is kept whole, and every entry a READDIRPLUS hands
  out stays in the inode table while the kernel holds it), ~50 s for the
  test, which would put this file past a minute.

Timings and the daemon's peak RSS are printed (``pytest -s`` shows them).

Two deviations from the kernel's overlayfs showed up and are fixed; a
minimal test of each stays at the end (:func:`test_parent_copy_up_nlink`,
:func:`test_readlink_leaves_lower_atime_alone`).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.layergen import mount_points
from tests.support.mounting import Daemon
from tests.support.writecheck import errname, errno_of, kernel_overlay, public_dir, put, run_as, upper_layout

Mount = Callable[..., Daemon]
Obs = dict[str, Any]
Layout = dict[bytes, tuple[Any, ...]]

#: The kernel oracle's options, as in the other write tests: index=on (pyunionfs
#: always keeps an inode index), no redirects (a lower directory cannot be
#: renamed: EXDEV), no metacopy (copy-up copies data).
KERNEL_OPTIONS = ("index=on", "redirect_dir=off", "metacopy=off")
#: Fixed layer times (ns), so that two lowers built the same way stat the same.
T0 = 1_600_000_000_123_456_789

DEEP = int(os.environ.get("PYUNIONFS_DEEP", "10000"))
BIG = int(os.environ.get("PYUNIONFS_BIG_DIR", "200000"))


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs for big layers; unmounted (which frees everything) at the end.

    List it before ``mount`` in a test's arguments, so that it is set up
    first and torn down last, after the daemons are gone.  Anything still
    mounted below it (a failed test) is detached first: nothing is ever
    removed from under a live mount.
    """
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,nr_inodes=0,mode=0755", "pyunionfs-strange", str(where)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield where
    finally:
        prefix = os.fsencode(where) + b"/"
        for point in sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run([b"umount", b"-l", point], capture_output=True, timeout=30)
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60)


def _fields(st: os.stat_result) -> tuple[Any, ...]:
    """What stat shows that must agree between two mounts (not st_dev, st_ino, st_ctime)."""
    return (stat.filemode(st.st_mode), oct(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_rdev,
            st.st_size, st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns)


def _short(st: os.stat_result) -> tuple[Any, ...]:
    """The fields that do not depend on when a change happened (for entries changed by the story)."""
    return (stat.filemode(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size)


def _lstat(path: bytes, fields: Callable[[os.stat_result], tuple[Any, ...]] = _fields, **kw: Any) -> Any:
    try:
        return fields(os.stat(path, follow_symlinks=False, **kw))
    except OSError as exc:
        return errname(exc.errno or 0)


def _stat(path: bytes, fields: Callable[[os.stat_result], tuple[Any, ...]] = _fields) -> Any:
    try:
        return fields(os.stat(path))
    except OSError as exc:
        return errname(exc.errno or 0)


def _read(path: bytes, **kw: Any) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | kw.pop("flags", 0), **kw)
    except OSError as exc:
        return errname(exc.errno or 0)
    try:
        return os.read(fd, 1 << 20)
    except OSError as exc:
        return "read " + errname(exc.errno or 0)
    finally:
        os.close(fd)


def _write(path: bytes, data: bytes, flags: int, mode: int = 0o644, **kw: Any) -> str:
    """Open with *flags* and write *data*: "ok", or the open's errno name."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, mode, **kw)
    except OSError as exc:
        return errname(exc.errno or 0)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return "ok"


def _append(path: bytes, data: bytes, **kw: Any) -> str:
    return _write(path, data, os.O_APPEND, **kw)


def _create(path: bytes, data: bytes, mode: int = 0o644, **kw: Any) -> str:
    return _write(path, data, os.O_CREAT | os.O_EXCL, mode, **kw)


def _readlink(path: bytes) -> Any:
    try:
        return os.readlink(path)
    except OSError as exc:
        return errname(exc.errno or 0)


def _listing(path: bytes | int) -> Any:
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return errname(exc.errno or 0)


def _fix_times(top: Path) -> None:
    """Give every entry below *top* (and *top*) the same atime and mtime, deepest first."""
    for dirpath, dirs, files in os.walk(os.fsencode(top), topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(dirpath, name), ns=(T0, T0), follow_symlinks=False)
    os.utime(top, ns=(T0, T0))


def _vm(pid: int) -> dict[str, str]:
    """VmHWM (peak RSS) and VmRSS of a process, as /proc shows them."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = " ".join(value.split())
    return out


def _still_answers(d: Daemon) -> None:
    """The daemon is alive and serves the mount (asked before every unmount)."""
    assert d.proc.poll() is None, f"the daemon died:\n{d.log_text()}"
    os.stat(d.mnt)
    os.listdir(d.mnt)


def _stop(d: Daemon) -> None:
    """Unmount after a failed story, keeping the daemon's log in the test output."""
    text = d.log_text() if d.log.exists() else ""
    alive = d.proc.poll() is None
    d.stop(check=False)
    print(f"daemon {'alive' if alive else f'dead ({d.proc.returncode})'} when the story failed; its log:\n{text}",
          file=sys.stderr)


def _on_both(base: Path, mount: Mount, story: Callable[[Path], Obs], *, build: Callable[[Path], object] | None = None,
             lower: Path | None = None, mnt_base: Path | None = None, ours: tuple[str, ...] = (),
             deadline: float = 100.0) -> dict[str, tuple[Obs, Path]]:
    """Run *story(mnt)* on the kernel's overlayfs, then on pyunionfs; ``{side: (observations, upper)}``.

    Each side gets its own upper (under ``base/SIDE``) and either its own
    lower made by *build* (in ``base/SIDE/low``; *build* may return a list of
    lowers it made, topmost first) or the shared read-only *lower*.  Mountpoints go
    below *mnt_base* when given (a public directory, for other users).  Both
    mounts are always unmounted; pyunionfs must still answer after the story
    and exit 0 at unmount.
    """
    out: dict[str, tuple[Obs, Path]] = {}
    for side in ("kernel", "pyunionfs"):
        root = base / side
        root.mkdir(parents=True)
        lowers = [lower] if lower is not None else []
        if lower is None:
            assert build is not None
            low = root / "low"
            low.mkdir()
            made = build(low)  # may return the lowers it made, topmost first
            lowers = list(made) if isinstance(made, list) else [low]
        up = root / "up"
        up.mkdir()
        mnt = (mnt_base or root) / f"{side}-mnt"
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay(lowers, up, root / "work", mnt, KERNEL_OPTIONS):
                out[side] = (story(mnt), up)
        else:
            d = mount(lowers, up, *ours, mnt=mnt, deadline=deadline)
            try:
                obs = story(mnt)
                _still_answers(d)
            except BaseException:
                _stop(d)
                raise
            d.stop()
            out[side] = (obs, up)
    return out


def _same(kernel: dict[Any, Any], ours: dict[Any, Any], what: str) -> None:
    """pyunionfs's observations equal the kernel's, key by key, with a readable message."""
    keys = list(kernel) + [k for k in ours if k not in kernel]
    wrong = [f"  {k}:\n    kernel    {kernel.get(k, '<missing>')!r}\n    pyunionfs {ours.get(k, '<missing>')!r}"
             for k in keys if kernel.get(k, "<missing>") != ours.get(k, "<missing>")]
    assert not wrong, f"{what}: pyunionfs differs from the kernel's overlayfs in {len(wrong)} places:\n" + "\n".join(
        wrong[:40])


def _layout(up: Path) -> Layout:
    """The upper on disk (``upper_layout``), keyed by bytes paths."""
    return {os.fsencode(k): v for k, v in upper_layout(up).items()}


# --------------------------------------------------------------------------
# Strange names
# --------------------------------------------------------------------------

#: Legal names a shell or a UTF-8 decoder would trip over; each is used in every group below.
NAMES: dict[str, bytes] = {
    "newline": b"new\nline",
    "trailing newline": b"ends\n",
    "tab": b"tab\tname",
    "backslash": b"back\\slash",
    "invalid utf-8": b"bad\xff\xfe\xc3(",
    "latin-1": b"caf\xe9",
    "leading dash": b"-rf",
    "double dash": b"--help",
    "three dots": b"...",
    "control chars": b"\x01\x1b[31m\x7f",
    "spaces": b" lead and trail ",
    "colon comma": b"a:b,c=d",
    "glob": b"*?[x]",
    "255 bytes": b"N" * 255,
    "255 invalid": b"\xe9" * 255,
    "255 newlines": b"\n" * 255,
}
#: One byte over NAME_MAX: refused with ENAMETOOLONG by every call that would make or find it.
TOO_LONG = (b"N" * 256, b"\xe9" * 256, b"\n" * 256)
#: Lower directories holding one regular file per strange name, one directory per operation.
FILE_GROUPS = (b"read", b"write", b"unlink", b"rename", b"rename2", b"recreate", b"links")
#: Lower directories that start empty (targets of new entries).
EMPTY_GROUPS = (b"renamed", b"new", b"newdirs", b"newlinks", b"linked")


def _renamed(name: bytes) -> bytes:
    """Another name of the same length (255 stays 255)."""
    return name[:-1] + b"~"


#: A directory of many 255-byte names: readdir replies pack few of them per page.
MANY = [b"%04d" % i + bytes([0x80 + i % 120]) * 251 for i in range(1000)]


def _build_names(low: Path) -> list[Path]:
    """The strange names in *low*; below it a second lower whose strange names *low* whites out."""
    top = os.fsencode(low)
    os.mkdir(top + b"/many255")
    for name in MANY:
        os.mknod(b"/".join((top, b"many255", name)), stat.S_IFREG | 0o644)
    bottom = low.parent / "low2"
    for group in (b"hidden", b"many255"):
        os.makedirs(os.fsencode(bottom) + b"/" + group)
    for name in NAMES.values():
        with open(b"/".join((os.fsencode(bottom), b"hidden", name)), "wb") as f:
            f.write(b"hidden below\n")
    os.mkdir(top + b"/hidden")
    for name in list(NAMES.values())[::2]:  # half hidden by whiteouts above, half showing through
        os.mknod(b"/".join((top, b"hidden", name)), stat.S_IFCHR | 0o600, 0)
    with open(os.fsencode(bottom) + b"/many255/" + MANY[-1][:-1] + b"~", "wb"):
        pass  # merged into the listing of many255
    _fix_times(bottom)
    for group in FILE_GROUPS + EMPTY_GROUPS + (b"dirs", b"rmdir", b"symlinks"):
        os.mkdir(top + b"/" + group)
    for group in FILE_GROUPS:
        for name in NAMES.values():
            with open(b"/".join((top, group, name)), "wb") as f:
                f.write(b"%s holds %r\n" % (group, name))
    for name in NAMES.values():
        # a directory with a strange name holding a file of the same name
        os.mkdir(b"/".join((top, b"dirs", name)), 0o750)
        with open(b"/".join((top, b"dirs", name, name)), "wb") as f:
            f.write(b"inside %r\n" % name)
        os.mkdir(b"/".join((top, b"rmdir", name)))
        # a symlink with a strange name to a strange name
        os.symlink(b"../read/" + name, b"/".join((top, b"symlinks", name)))
    _fix_times(low)
    return [low, bottom]


def _names_story(m: Path) -> Obs:
    top = os.fsencode(m)

    def p(*parts: bytes) -> bytes:
        return b"/".join((top, *parts))

    obs: Obs = {}
    names = list(NAMES.values())
    groups = FILE_GROUPS + EMPTY_GROUPS + (b"dirs", b"rmdir", b"symlinks", b"hidden", b"many255")
    obs["list /"] = _listing(top)
    obs["list many255"] = _listing(p(b"many255"))
    obs["list hidden"] = _listing(p(b"hidden"))
    for n in names:
        obs[f"lstat hidden/{n!r}"] = _lstat(p(b"hidden", n))
    for g in groups[:-2]:
        obs[f"list {g!r}"] = _listing(p(g))
        for n in names:
            obs[f"lstat {g!r}/{n!r}"] = _lstat(p(g, n))
    for n in names:
        obs[f"read {n!r}"] = _read(p(b"read", n))
        obs[f"list dirs/{n!r}"] = _listing(p(b"dirs", n))
        obs[f"read dirs/{n!r}/{n!r}"] = _read(p(b"dirs", n, n))
        obs[f"readlink {n!r}"] = _readlink(p(b"symlinks", n))
        obs[f"read through link {n!r}"] = _read(p(b"symlinks", n))
        obs[f"O_NOFOLLOW {n!r}"] = _read(p(b"symlinks", n), flags=os.O_NOFOLLOW)
    # changes: copy-up, whiteouts, renames, new entries, all under the strange names
    for n in names:
        obs[f"write {n!r}"] = _append(p(b"write", n), b"+appended\n")
        obs[f"write dirs/{n!r}/{n!r}"] = _append(p(b"dirs", n, n), b"+appended\n")
        obs[f"unlink {n!r}"] = errname(errno_of(os.unlink, p(b"unlink", n)))
        obs[f"unlink again {n!r}"] = errname(errno_of(os.unlink, p(b"unlink", n)))
        obs[f"rename {n!r}"] = errname(errno_of(os.rename, p(b"rename", n), p(b"renamed", n)))
        obs[f"rename in place {n!r}"] = errname(errno_of(os.rename, p(b"rename2", n), p(b"rename2", _renamed(n))))
        obs[f"recreate: unlink {n!r}"] = errname(errno_of(os.unlink, p(b"recreate", n)))
        obs[f"recreate: create {n!r}"] = _create(p(b"recreate", n), b"again %r\n" % n)
        obs[f"rmdir {n!r}"] = errname(errno_of(os.rmdir, p(b"rmdir", n)))
        obs[f"rmdir dirs/{n!r} (not empty)"] = errname(errno_of(os.rmdir, p(b"dirs", n)))
        obs[f"rename lower dir {n!r}"] = errname(errno_of(os.rename, p(b"dirs", n), p(b"renamed", _renamed(n))))
        obs[f"create {n!r}"] = _create(p(b"new", n), b"new %r\n" % n)
        obs[f"create again {n!r}"] = _create(p(b"new", n), b"")
        obs[f"mkdir {n!r}"] = errname(errno_of(os.mkdir, p(b"newdirs", n)))
        obs[f"symlink {n!r}"] = errname(errno_of(os.symlink, n, p(b"newlinks", n)))
        obs[f"link {n!r}"] = errname(errno_of(os.link, p(b"links", n), p(b"linked", n)))
    for n in names[::2]:  # half of the removed directories come back (opaque, over a whiteout)
        obs[f"mkdir over whiteout {n!r}"] = errname(errno_of(os.mkdir, p(b"rmdir", n)))
    for n in names:  # the names of the lower below: whited out in the lower above, or not yet
        obs[f"hidden: unlink {n!r}"] = errname(errno_of(os.unlink, p(b"hidden", n)))
        obs[f"hidden: create {n!r}"] = _create(p(b"hidden", n), b"on top\n")
    obs["many255: unlink some"] = [errname(errno_of(os.unlink, p(b"many255", n))) for n in MANY[::7]]
    # one byte too long: refused by every call, before anything is made
    for t in TOO_LONG:
        src = p(b"read", NAMES["leading dash"])
        obs[f"{len(t)}: create {t[:3]!r}"] = _create(p(b"new", t), b"")
        obs[f"{len(t)}: lstat {t[:3]!r}"] = _lstat(p(b"new", t))
        obs[f"{len(t)}: mkdir {t[:3]!r}"] = errname(errno_of(os.mkdir, p(b"newdirs", t)))
        obs[f"{len(t)}: mkfifo {t[:3]!r}"] = errname(errno_of(os.mkfifo, p(b"new", t)))
        obs[f"{len(t)}: symlink {t[:3]!r}"] = errname(errno_of(os.symlink, b"x", p(b"newlinks", t)))
        obs[f"{len(t)}: link {t[:3]!r}"] = errname(errno_of(os.link, src, p(b"linked", t)))
        obs[f"{len(t)}: rename to {t[:3]!r}"] = errname(errno_of(os.rename, src, p(b"renamed", t)))
        obs[f"{len(t)}: unlink {t[:3]!r}"] = errname(errno_of(os.unlink, p(b"read", t)))
        # a target may be longer than a name: stored and read back, refused only when followed
        obs[f"{len(t)}: symlink to {t[:3]!r}"] = errname(errno_of(os.symlink, t, p(b"newlinks", b"long-" + t[:3])))
        obs[f"{len(t)}: readlink to {t[:3]!r}"] = _readlink(p(b"newlinks", b"long-" + t[:3]))
        obs[f"{len(t)}: follow to {t[:3]!r}"] = _stat(p(b"newlinks", b"long-" + t[:3]))
    obs.update(_names_tree(m))
    return obs


def _names_tree(m: Path) -> Obs:
    """The merged tree after the story: every name, its kind and data."""
    top = os.fsencode(m)
    obs: Obs = {}
    for g in FILE_GROUPS + EMPTY_GROUPS + (b"dirs", b"rmdir", b"symlinks", b"hidden", b"many255"):
        listing = _listing(top + b"/" + g)
        obs[f"after: list {g!r}"] = listing
        for n in listing if isinstance(listing, list) else []:
            path = b"/".join((top, g, n))
            obs[f"after: lstat {g!r}/{n!r}"] = _lstat(path, _short)
            if stat.S_ISREG(os.lstat(path).st_mode):
                obs[f"after: read {g!r}/{n!r}"] = _read(path)
            elif stat.S_ISDIR(os.lstat(path).st_mode):
                obs[f"after: list {g!r}/{n!r}"] = _listing(path)
    return obs


@pytest.mark.timeout(90)
def test_strange_names(tmp_path: Path, mount: Mount) -> None:
    """Newlines, tabs, backslashes, non-UTF-8 bytes, leading dashes, 255-byte names: listed, stat'ed, read,
    written (copy-up), renamed, unlinked (whiteout of exactly that byte name), created; 256 bytes: ENAMETOOLONG."""
    t = time.monotonic()
    res = _on_both(tmp_path, mount, _names_story, build=_build_names)
    (k_obs, k_up), (p_obs, p_up) = res["kernel"], res["pyunionfs"]
    # the oracle shows what the specification asks
    for n in NAMES.values():
        assert k_obs[f"read {n!r}"] == b"read holds %r\n" % n
        assert k_obs[f"unlink {n!r}"] == "ok" and k_obs[f"unlink again {n!r}"] == "ENOENT"
        assert k_obs[f"rename lower dir {n!r}"] == "EXDEV"
        assert k_obs[f"after: read b'write'/{n!r}"] == b"write holds %r\n+appended\n" % n
    for t_ in TOO_LONG:
        assert k_obs[f"256: create {t_[:3]!r}"] == "ENAMETOOLONG"
        assert k_obs[f"256: rename to {t_[:3]!r}"] == "ENAMETOOLONG"
    _same(k_obs, p_obs, "strange names through the mount")
    k_layout, p_layout = _layout(k_up), _layout(p_up)
    for n in NAMES.values():
        assert k_layout[b"unlink/" + n] == ("whiteout",)
        assert k_layout[b"rename/" + n] == ("whiteout",)
        assert k_layout[b"renamed/" + n][0] == "reg"
        assert k_layout[b"rmdir/" + n] == (("dir", b"y") if n in list(NAMES.values())[::2] else ("whiteout",))
        assert k_layout[b"hidden/" + n][0] == "reg"
    assert k_obs["list hidden"] == sorted(list(NAMES.values())[1::2])
    assert k_obs["list many255"] == sorted([*MANY, MANY[-1][:-1] + b"~"])
    assert all(k_layout[b"many255/" + n] == ("whiteout",) for n in MANY[::7])
    _same(k_layout, p_layout, "the upper layer on disk after the story")
    # pyunionfs mounted again over the upper it wrote shows the same tree
    lowers = [tmp_path / "pyunionfs" / "low", tmp_path / "pyunionfs" / "low2"]
    d = mount(lowers, p_up, mnt=tmp_path / "pyunionfs" / "pyunionfs-mnt")
    try:
        again = _names_tree(d.mnt)
        _still_answers(d)
    except BaseException:
        _stop(d)
        raise
    d.stop()
    _same({k: v for k, v in k_obs.items() if k.startswith("after: ")}, again,
          "the strange names after a remount of pyunionfs over its upper")
    print(f"\nstrange names: {time.monotonic() - t:.1f} s for both mounts and the remount")


# --------------------------------------------------------------------------
# Special files and symlinks
# --------------------------------------------------------------------------

#: A symlink chain one longer than the kernel follows (40), and one it just follows.
CHAIN_TOO_LONG = 41
CHAIN_OK = 40


def _build_specials(low: Path) -> None:
    os.mkfifo(low / "fifo", 0o640)
    os.mknod(low / "chr", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null
    os.mknod(low / "blk", stat.S_IFBLK | 0o660, os.makedev(240, 7))  # a local/experimental major: no driver
    dfd = os.open(low, os.O_PATH | os.O_DIRECTORY)
    try:  # bound through the directory's fd: tmp_path may be longer than sun_path allows
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(f"/proc/self/fd/{dfd}/sock")
    finally:
        os.close(dfd)
    os.chmod(low / "sock", 0o755)
    put(low / "realdir" / "f", "in realdir\n")
    links = {
        "broken": "does/not/exist",
        "dangling": "target-to-be",
        "abs-broken": "/nonexistent-pyunionfs-strange/x",
        "loop-a": "loop-b",
        "loop-b": "loop-a",
        "self": "self",
        "loopdir": ".",
        "todir": "realdir",
        "tofile": "realdir/f",
        "tofifo": "fifo",
        "empty-dir-link": "realdir/",
    }
    for i in range(CHAIN_TOO_LONG):
        links[f"long{i}"] = f"long{i + 1}" if i + 1 < CHAIN_TOO_LONG else "realdir/f"
    for i in range(CHAIN_OK):
        links[f"ok{i}"] = f"ok{i + 1}" if i + 1 < CHAIN_OK else "realdir/f"
    for name, target in links.items():
        os.symlink(target, low / name)
    _fix_times(low)


SPECIALS = ("fifo", "chr", "blk", "sock", "broken", "dangling", "abs-broken", "loop-a", "loop-b", "self", "loopdir",
            "todir", "tofile", "tofifo", "empty-dir-link", "long0", "ok0", "realdir")


def _specials_story(m: Path) -> Obs:
    top = os.fsencode(m)

    def p(*parts: bytes | str) -> bytes:
        return b"/".join((top, *(os.fsencode(x) for x in parts)))

    obs: Obs = {"list": _listing(top)}
    for n in SPECIALS:
        obs[f"lstat {n}"] = _lstat(p(n), _fields)
        obs[f"readlink {n}"] = _readlink(p(n))
        # (loopdir leads to the mount's root, whose times and blocks belong to the instance)
        obs[f"stat {n}"] = _stat(p(n), _short if n == "loopdir" else _fields)
        obs[f"open {n}"] = _read(p(n), flags=os.O_NONBLOCK)
        obs[f"open O_NOFOLLOW {n}"] = _read(p(n), flags=os.O_NONBLOCK | os.O_NOFOLLOW)
        obs[f"open O_PATH|O_NOFOLLOW {n}"] = errname(errno_of(lambda q: os.close(
            os.open(q, os.O_PATH | os.O_NOFOLLOW)), p(n)))
        obs[f"list {n}"] = _listing(p(n))
    obs["loop through loopdir x39"] = _stat(p(*["loopdir"] * 39, "tofile"))
    obs["loop through loopdir x41"] = _stat(p(*["loopdir"] * 41, "tofile"))
    obs["loop-a/x"] = _lstat(p("loop-a", "x"))
    obs["self/x"] = _lstat(p("self", "x"))
    obs["fifo/x"] = _lstat(p("fifo", "x"))
    obs["chr/x"] = _lstat(p("chr", "x"))
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            os.chdir(m)  # sun_path is short: connect relative to the mount
            obs["connect sock"] = errname(errno_of(s.connect, "sock"))
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    # creation through links
    obs["create through broken"] = _create(p("broken"), b"x")
    obs["create through dangling"] = errname(errno_of(lambda q: os.close(
        os.open(q, os.O_WRONLY | os.O_CREAT, 0o640)), p("dangling")))
    obs["create O_EXCL through dangling"] = _create(p("dangling"), b"x")
    obs["stat dangling now"] = _stat(p("dangling"), _short)
    obs["create through loop"] = errname(errno_of(
        lambda q: os.close(os.open(q, os.O_WRONLY | os.O_CREAT)), p("loop-a")))
    obs["mkdir over loop"] = errname(errno_of(os.mkdir, p("loop-a")))
    obs["create through todir"] = _create(p("todir", "new"), b"made through a link\n")
    obs["append through tofile"] = _append(p("tofile"), b"+appended\n")
    obs["read tofile"] = _read(p("tofile"))
    # copy-up of special files: chmod, chown, utimes (mtimes are kept by a copy-up)
    for n, mode in (("fifo", 0o600), ("chr", 0o600), ("blk", 0o600), ("sock", 0o700)):
        obs[f"chmod {n}"] = errname(errno_of(os.chmod, p(n), mode))
        obs[f"after chmod {n}"] = _lstat(p(n))
    obs["lchown loop-a"] = errname(errno_of(os.chown, p("loop-a"), 1234, 4321, follow_symlinks=False))
    obs["utime self"] = errname(errno_of(os.utime, p("self"), ns=(T0 + 5, T0 + 7), follow_symlinks=False))
    obs["lchown broken"] = errname(errno_of(os.chown, p("abs-broken"), 1, 1, follow_symlinks=False))
    for n in ("loop-a", "self", "abs-broken"):
        obs[f"after {n}"] = (_lstat(p(n), _fields), _readlink(p(n)))
    obs["chmod through todir"] = errname(errno_of(os.chmod, p("todir"), 0o711))
    obs["chmod loop"] = errname(errno_of(os.chmod, p("loop-a"), 0o600))
    obs["unlink loop-b"] = errname(errno_of(os.unlink, p("loop-b")))
    obs["open loop-a now"] = _read(p("loop-a"))
    obs["rename broken"] = errname(errno_of(os.rename, p("broken"), p("broken2")))
    obs["rename chr over blk"] = errname(errno_of(os.rename, p("chr"), p("blk")))
    obs["mkfifo"] = errname(errno_of(os.mkfifo, p("newfifo"), 0o620))
    obs["mknod chr 1,5"] = errname(errno_of(os.mknod, p("newchr"), stat.S_IFCHR | 0o640, os.makedev(1, 5)))
    obs["mknod whiteout-like 0,0"] = errname(errno_of(os.mknod, p("fake-wh"), stat.S_IFCHR | 0o600, 0))
    obs["mknod sock"] = errname(errno_of(os.mknod, p("newsock"), stat.S_IFSOCK | 0o600))
    listing = _listing(top)
    obs["after: list"] = listing
    for n in listing:
        obs[f"after: lstat {n!r}"] = _lstat(p(n), _short)
        obs[f"after: readlink {n!r}"] = _readlink(p(n))
    return obs


@pytest.mark.timeout(90)
def test_special_files_and_symlinks(tmp_path: Path, mount: Mount) -> None:
    """Fifos, devices, sockets, broken symlinks, symlink loops and long chains: lstat/readlink/open like the kernel
    (ELOOP, ENOENT, ENXIO...), and chmod/chown copy them up as what they are."""
    t = time.monotonic()
    # `dev`: the kernel's overlay is mounted with device files working; FUSE's default is nodev
    res = _on_both(tmp_path, mount, _specials_story, build=_build_specials, ours=("dev",))
    (k_obs, k_up), (p_obs, p_up) = res["kernel"], res["pyunionfs"]
    for n in ("loop-a", "loop-b", "self", "long0"):
        assert k_obs[f"open {n}"] == "ELOOP", n
    assert k_obs["open ok0"] == b"in realdir\n"
    assert k_obs["open broken"] == "ENOENT" and k_obs["open chr"] == b"" and k_obs["open blk"] == "ENXIO"
    assert k_obs["open sock"] == "ENXIO" and k_obs["open O_NOFOLLOW tofile"] == "ELOOP"
    assert k_obs["loop through loopdir x41"] == "ELOOP" and k_obs["connect sock"] == "ECONNREFUSED"
    assert k_obs["loop through loopdir x39"][0] == "-rw-r--r--"  # 39 + 1 links: just within the limit
    _same(k_obs, p_obs, "special files and symlinks through the mount")
    k_layout, p_layout = _layout(k_up), _layout(p_up)
    assert k_layout[b"fifo"] == ("p",) and k_layout[b"sock"] == ("s",) and k_layout[b"loop-b"] == ("whiteout",)
    assert k_layout[b"loop-a"] == ("lnk", "loop-b")
    _same(k_layout, p_layout, "the upper layer on disk after the story")
    for n in ("chr", "blk", "fifo", "sock", "newchr", "loop-a", "self"):
        k, ours = os.lstat(k_up / n), os.lstat(p_up / n)
        assert _short(ours) == _short(k), f"upper/{n}: {_short(ours)} (pyunionfs) != {_short(k)} (kernel)"
    print(f"\nspecial files: {time.monotonic() - t:.1f} s for both mounts")


# --------------------------------------------------------------------------
# Files and directories nobody may read
# --------------------------------------------------------------------------


def _build_closed(low: Path) -> None:
    put(low / "secret", "top secret\n", mode=0o000)
    put(low / "closed" / "inside", "inside\n", mode=0o666)
    (low / "closed" / "sub").mkdir()
    os.chmod(low / "closed", 0o000)
    put(low / "searchonly" / "visible", "visible\n", mode=0o644)
    os.chmod(low / "searchonly", 0o111)
    put(low / "writeonly", "w\n", mode=0o222)
    _fix_times(low)


_AS_USER = r"""
def read(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)
def res(fn, *a):
    try:
        return fn(*a)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def st(p):
    s = os.lstat(p)
    return [oct(s.st_mode), s.st_uid, s.st_size]
def append(p):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"by 1000\n")
    os.close(fd)
for name in ("secret", "closed", "closed/inside", "closed/sub", "searchonly", "searchonly/visible", "writeonly"):
    out["stat " + name] = res(st, m + "/" + name)
out["read secret"] = res(read, m + "/secret")
out["write secret"] = err(openw, m + "/secret")
out["list closed"] = res(lambda p: sorted(os.listdir(p)), m + "/closed")
out["read closed/inside"] = res(read, m + "/closed/inside")
out["create in closed"] = err(mkfile, m + "/closed/new")
out["list searchonly"] = res(lambda p: sorted(os.listdir(p)), m + "/searchonly")
out["read searchonly/visible"] = res(read, m + "/searchonly/visible")
out["read writeonly"] = res(read, m + "/writeonly")
out["append writeonly"] = err(append, m + "/writeonly")
out["chmod secret"] = err(os.chmod, m + "/secret", 0o644)
out["unlink secret"] = err(os.unlink, m + "/secret")
"""


def _closed_story(m: Path) -> Obs:
    obs: Obs = {}
    obs["uid 1000, before"] = run_as(1000, 1000, m, _AS_USER)
    # root bypasses the modes, as on a local filesystem
    obs["root: read secret"] = _read(os.fsencode(m / "secret"))
    obs["root: list closed"] = _listing(os.fsencode(m / "closed"))
    obs["root: read closed/inside"] = _read(os.fsencode(m / "closed/inside"))
    obs["root: lstat"] = {n: _lstat(os.fsencode(m / n)) for n in ("secret", "closed", "closed/inside", "searchonly")}
    # copy-up of mode-000 objects by root keeps mode 000
    obs["root: append secret"] = _append(os.fsencode(m / "secret"), b"+root\n")
    obs["root: append closed/inside"] = _append(os.fsencode(m / "closed/inside"), b"+root\n")
    obs["root: create in closed/sub"] = _create(os.fsencode(m / "closed/sub/made"), b"made\n")
    obs["root: after"] = {n: (_lstat(os.fsencode(m / n), _short), _read(os.fsencode(m / n)))
                          for n in ("secret", "closed", "closed/inside", "closed/sub", "closed/sub/made")}
    obs["uid 1000, after root's copy-up"] = run_as(1000, 1000, m, _AS_USER)
    return obs


@pytest.mark.timeout(90)
def test_unreadable_files_and_directories(tmp_path: Path, mount: Mount) -> None:
    """Mode-000 files and directories: root reads and lists them (and copy-up keeps mode 000), uid 1000 gets
    EACCES, on the lower objects and on their copies alike."""
    t = time.monotonic()
    with public_dir() as pub:
        res = _on_both(tmp_path, mount, _closed_story, build=_build_closed, mnt_base=pub)
    (k_obs, k_up), (p_obs, p_up) = res["kernel"], res["pyunionfs"]
    before = k_obs["uid 1000, before"]
    assert before["read secret"] == "EACCES" and before["list closed"] == "EACCES"
    assert before["stat closed/inside"] == "EACCES" and before["list searchonly"] == "EACCES"
    assert before["read searchonly/visible"] == "visible\n" and before["append writeonly"] == "ok"
    assert k_obs["root: read secret"] == b"top secret\n" and k_obs["root: list closed"] == [b"inside", b"sub"]
    assert k_obs["root: after"]["secret"] == (("-" + "-" * 9, 1, 0, 0, 0, 17), b"top secret\n+root\n")
    _same(k_obs, p_obs, "mode-000 layers through the mount")
    k_layout, p_layout = _layout(k_up), _layout(p_up)
    _same(k_layout, p_layout, "the upper layer on disk after the story")
    for n in ("secret", "closed", "closed/inside", "closed/sub", "writeonly"):
        k, ours = os.lstat(k_up / n), os.lstat(p_up / n)
        assert oct(ours.st_mode) == oct(k.st_mode), f"upper/{n}: {oct(ours.st_mode)} != {oct(k.st_mode)} (kernel)"
    assert stat.S_IMODE(os.lstat(p_up / "secret").st_mode) == 0 and stat.S_IMODE(os.lstat(p_up / "closed").st_mode) == 0
    print(f"\nmode 000: {time.monotonic() - t:.1f} s for both mounts")


# --------------------------------------------------------------------------
# A 10,000-deep tree
# --------------------------------------------------------------------------

#: The name of every level of the deep tree: at two bytes a level, its leaf is
#: five times deeper than PATH_MAX allows in one path.
LEVEL = "d"


def _build_deep(low: Path, depth: int) -> None:
    fd = os.open(low, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir(LEVEL, 0o755 if i % 3 else 0o750, dir_fd=fd)
            os.utime(fd, ns=(T0 + i, T0 + i))  # each level its own time, set once its child is made
            nfd = os.open(LEVEL, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
        os.utime("leaf", ns=(T0, T0), dir_fd=fd)
        os.utime(fd, ns=(T0 + depth, T0 + depth))
    finally:
        os.close(fd)


def _walk(top: Path | str, depth: int, sample: Callable[[int, int], None] | None = None) -> int:
    """An O_PATH fd of the directory *depth* levels down, opened one component at a time."""
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
    try:
        for i in range(1, depth + 1):
            nfd = os.open(LEVEL, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if sample is not None:
                sample(i, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chain(top: Path, depth: int) -> tuple[int, list[tuple[Any, ...]]]:
    """Walk down a layer's chain as far as it goes: (levels found, [(mode, mtime, opaque) of each])."""
    out = []
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            try:
                nfd = os.open(LEVEL, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            try:
                opaque: bytes | None = os.getxattr(f"/proc/self/fd/{fd}", "trusted.overlay.opaque")
            except OSError:
                opaque = None
            out.append((oct(st.st_mode), st.st_uid, st.st_mtime_ns, opaque))
    finally:
        os.close(fd)
    return len(out), out


def _deep_story(depth: int, timings: dict[str, float]) -> Callable[[Path], Obs]:
    def story(m: Path) -> Obs:
        obs: Obs = {}
        samples = {1, 2, depth // 2, depth - 1, depth}

        def sample(i: int, fd: int) -> None:
            if i in samples:
                obs[f"fstat level {i}"] = _fields(os.fstat(fd))

        t = time.monotonic()
        fd = _walk(m, depth, sample)
        try:
            obs["bottom: lstat leaf"] = _lstat(b"leaf", dir_fd=fd)
            obs["bottom: read leaf"] = _read(b"leaf", dir_fd=fd)
            timings["walk + read"] = time.monotonic() - t
            lfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                obs["bottom: list"] = _listing(lfd)
            finally:
                os.close(lfd)
            # a path longer than PATH_MAX is refused by the kernel before any filesystem sees it
            obs["one path of 2100 levels"] = _lstat(os.fsencode(m) + b"/d" * 2100)
            obs["one path of 2000 levels"] = _lstat(os.fsencode(m) + b"/d" * 2000, _short)
            t = time.monotonic()
            # the write copies up every one of the parent directories first
            obs["bottom: append leaf"] = _append(b"leaf", b"+appended\n", dir_fd=fd)
            timings["copy-up write"] = time.monotonic() - t
            obs["bottom: read leaf after"] = _read(b"leaf", dir_fd=fd)
            obs["bottom: lstat leaf after"] = _lstat(b"leaf", _short, dir_fd=fd)
            obs["bottom: create"] = _create(b"new", b"new at the bottom\n", dir_fd=fd)
            obs["bottom: mkdir"] = errname(errno_of(os.mkdir, "sub", dir_fd=fd))
            obs["bottom: unlink new"] = errname(errno_of(os.unlink, "new", dir_fd=fd))
            lfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                obs["bottom: list after"] = _listing(lfd)
            finally:
                os.close(lfd)
        finally:
            os.close(fd)
        # find(1) reads every level's directory (readdir at 10,000 depths) and finds the leaf
        t = time.monotonic()
        found = subprocess.run(["find", str(m), "-name", "leaf", "-printf", "%d %s %m\n"], capture_output=True,
                               timeout=120)
        timings["find"] = time.monotonic() - t
        obs["find"] = (found.returncode, found.stdout, found.stderr)
        # a second walk after the copy-up sees the upper chain, with the same attributes
        t = time.monotonic()
        obs.update({f"after: {k}": v for k, v in _after_walk(m, depth, samples).items()})
        timings["second walk"] = time.monotonic() - t
        return obs

    return story


def _after_walk(m: Path, depth: int, samples: set[int]) -> Obs:
    obs: Obs = {}

    def sample(i: int, fd: int) -> None:
        # (not the bottom's mtime: the story made files there)
        if i in samples:
            st = os.fstat(fd)
            obs[f"fstat level {i}"] = _short(st) + (None if i == depth else st.st_mtime_ns,)

    fd = _walk(m, depth, sample)
    try:
        obs["read leaf"] = _read(b"leaf", dir_fd=fd)
    finally:
        os.close(fd)
    return obs


@pytest.mark.timeout(180)
def test_deep_tree(scratch: Path, tmp_path: Path, mount: Mount) -> None:
    """A 10,000-deep lower tree: walked with dir fds one level at a time, its leaf read and written (copy-up of
    all 10,000 parents); the upper then holds the whole chain with the lower's modes and times."""
    low = scratch / "low"
    low.mkdir()
    t = time.monotonic()
    _build_deep(low, DEEP)
    build_s = time.monotonic() - t
    timings: dict[str, dict[str, float]] = {"kernel": {}, "pyunionfs": {}}
    stories = {side: _deep_story(DEEP, timings[side]) for side in timings}
    hwm: dict[str, str] = {}

    def story(m: Path) -> Obs:
        side = "kernel" if "kernel" in m.name else "pyunionfs"
        obs = stories[side](m)
        if side == "pyunionfs":
            pid = next(d.proc.pid for d in daemons)
            hwm.update(_vm(pid))
        return obs

    daemons: list[Daemon] = []

    def tracking_mount(*a: Any, **kw: Any) -> Daemon:
        d = mount(*a, **kw)
        daemons.append(d)
        return d

    res = _on_both(scratch, tracking_mount, story, lower=low, deadline=170)
    (k_obs, k_up), (p_obs, p_up) = res["kernel"], res["pyunionfs"]
    assert k_obs["bottom: read leaf"] == b"at the bottom\n"
    assert k_obs["bottom: read leaf after"] == b"at the bottom\n+appended\n"
    assert k_obs["one path of 2100 levels"] == "ENAMETOOLONG"
    assert k_obs["find"] == (0, b"%d 24 640\n" % (DEEP + 1), b"")
    _same(k_obs, p_obs, f"a {DEEP}-deep tree through the mount")
    # the upper holds the whole chain, as the kernel's does: each level a plain (not opaque) copy
    t = time.monotonic()
    (k_levels, k_chain), (p_levels, p_chain) = _chain(k_up, DEEP), _chain(p_up, DEEP)
    _, lower_chain = _chain(low, DEEP)
    assert k_levels == DEEP, f"the kernel's upper has {k_levels} of {DEEP} levels"
    assert p_levels == DEEP, f"pyunionfs's upper has {p_levels} of {DEEP} levels"
    # (the bottom level's mtime moved: files were made in it)
    k_chain[-1], p_chain[-1] = k_chain[-1][:2] + k_chain[-1][3:], p_chain[-1][:2] + p_chain[-1][3:]
    first = next((i for i, (a, b) in enumerate(zip(k_chain, p_chain, strict=True)) if a != b), None)
    assert first is None, f"upper level {first + 1 if first is not None else 0}: kernel {k_chain[first or 0]}, " \
                          f"pyunionfs {p_chain[first or 0]}"
    wrong = [i + 1 for i, (a, b) in enumerate(zip(p_chain[:-1], lower_chain[:-1], strict=True))
             if a[:3] != b[:3] or a[3]]
    assert not wrong, f"upper levels {wrong[:10]}... differ from the lower (mode, owner, mtime) or are opaque"
    leaf = _walk(p_up, DEEP)
    try:
        assert _read(b"leaf", dir_fd=leaf) == b"at the bottom\n+appended\n"
    finally:
        os.close(leaf)
    check_s = time.monotonic() - t
    # pyunionfs mounted again over its upper: the merged chain walks the same, the leaf has the change
    t = time.monotonic()
    d = mount([low], p_up, mnt=scratch / "pyunionfs" / "pyunionfs-mnt", deadline=100)
    try:
        again = _after_walk(d.mnt, DEEP, {1, DEEP // 2, DEEP - 1})
        _still_answers(d)
    except BaseException:
        _stop(d)
        raise
    d.stop()
    _same({k: p_obs[f"after: {k}"] for k in again}, again, f"the {DEEP}-deep tree after a remount")
    remount_s = time.monotonic() - t
    print(f"\ndeep tree ({DEEP} levels): build {build_s:.1f} s; "
          + "; ".join(f"{side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in tm.items()) for side, tm in timings.items())
          + f"; upper checks {check_s:.1f} s; remount + walk {remount_s:.1f} s; pyunionfs daemon {hwm}")


# --------------------------------------------------------------------------
# A directory with a million entries
# --------------------------------------------------------------------------


def _big_names(n: int) -> Iterator[bytes]:
    return (b"e%d" % i for i in range(n))


def _digest(names: list[bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name + b"\0")
    return h.hexdigest()


def _timed_listing(path: bytes, tm: dict[str, float], what: str, prefix: str) -> Obs:
    """List *path* once, timing it as *what*: how many names, how many distinct, their digest."""
    t = time.monotonic()
    names = os.listdir(path)
    tm[what] = time.monotonic() - t
    return {f"{prefix}count": len(names), f"{prefix}distinct": len(set(names)),
            f"{prefix}sha256 of the sorted names": _digest(names)}


@pytest.mark.timeout(120 + BIG // 4000)
def test_huge_directory(scratch: Path, tmp_path: Path, mount: Mount) -> None:
    """A lower directory with BIG entries (200,000 by default, PYUNIONFS_BIG_DIR=1000000 for the million): the
    listing has every name exactly once, random names stat like the kernel's, a file can be created and unlinked
    and a lower name whited out, and the listing then has exactly the change.  The daemon's peak RSS is printed."""
    low = scratch / "low"
    (low / "big").mkdir(parents=True)
    t = time.monotonic()
    fd = os.open(low / "big", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in _big_names(BIG):
            os.mknod(name, stat.S_IFREG | 0o644, dir_fd=fd)
    finally:
        os.close(fd)
    put(low / "big" / "e7", b"seven\n")  # one with data, to read through the mount
    build_s = time.monotonic() - t
    expected = _digest(list(_big_names(BIG)))
    picks = random.Random(6).sample(range(BIG), 20)
    timings: dict[str, dict[str, float]] = {"kernel": {}, "pyunionfs": {}}
    memory: dict[str, str] = {}
    daemons: list[Daemon] = []

    def tracking_mount(*a: Any, **kw: Any) -> Daemon:
        d = mount(*a, **kw)
        daemons.append(d)
        return d

    def story(m: Path) -> Obs:
        side = "kernel" if "kernel" in m.name else "pyunionfs"
        tm = timings[side]
        big = os.fsencode(m / "big")
        obs: Obs = {}
        obs.update(_timed_listing(big, tm, "list", ""))
        if side == "pyunionfs":
            memory.update(_vm(daemons[-1].proc.pid))
        for i in picks:
            obs[f"lstat e{i}"] = _lstat(big + b"/e%d" % i)
        obs["read e7"] = _read(big + b"/e7")
        obs["lstat missing"] = _lstat(big + b"/e%d" % BIG)
        t = time.monotonic()
        obs["create"] = _create(big + b"/created", b"new\n")
        obs["lstat created"] = _lstat(big + b"/created", _short)
        obs["unlink created"] = errname(errno_of(os.unlink, big + b"/created"))
        obs["lstat created after"] = _lstat(big + b"/created")
        obs["unlink lower e5"] = errname(errno_of(os.unlink, big + b"/e5"))
        obs["create e_new"] = _create(big + b"/e_new", b"")
        tm["create + unlink"] = time.monotonic() - t
        obs.update(_timed_listing(big, tm, "list again", "again: "))
        return obs

    res = _on_both(scratch, tracking_mount, story, lower=low, deadline=100 + BIG // 5000)
    (k_obs, k_up), (p_obs, p_up) = res["kernel"], res["pyunionfs"]
    assert (k_obs["count"], k_obs["distinct"], k_obs["sha256 of the sorted names"]) == (BIG, BIG, expected)
    changed = [n for n in _big_names(BIG) if n != b"e5"] + [b"e_new"]
    assert (k_obs["again: count"], k_obs["again: sha256 of the sorted names"]) == (BIG, _digest(changed))
    _same(k_obs, p_obs, f"a directory of {BIG} entries through the mount")
    k_layout, p_layout = _layout(k_up), _layout(p_up)
    assert k_layout[b"big/e5"] == ("whiteout",)
    _same(k_layout, p_layout, "the upper layer on disk after the story")
    print(f"\nbig directory ({BIG} entries): build {build_s:.1f} s; "
          + "; ".join(f"{side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in tm.items()) for side, tm in timings.items())
          + f"; pyunionfs daemon after the first listing {memory}")


# --------------------------------------------------------------------------
# pyunionfs bugs these stories found (fixed), each kept as a minimal case
# --------------------------------------------------------------------------


def _build_parent(low: Path) -> None:
    put(low / "d" / "f", "f\n")
    (low / "d" / "sub").mkdir()


def _parent_story(m: Path) -> Obs:
    before = os.lstat(m / "d").st_nlink
    with open(m / "d" / "f", "a") as f:  # copies up d (a lower-only directory) as f's parent
        f.write("more\n")
    return {"st_nlink of d before": before, "st_nlink of d after": os.lstat(m / "d").st_nlink}


@pytest.mark.timeout(60)
def test_parent_copy_up_nlink(tmp_path: Path, mount: Mount) -> None:
    """A directory copied up as a parent reports st_nlink 1 at once, as on the kernel's overlayfs."""
    res = _on_both(tmp_path, mount, _parent_story, build=_build_parent)
    assert res["kernel"][0] == {"st_nlink of d before": 3, "st_nlink of d after": 1}
    _same(res["kernel"][0], res["pyunionfs"][0], "st_nlink of a directory copied up as a parent")


def _build_link(low: Path) -> None:
    os.symlink("target", low / "l")
    os.symlink("target", low / "m")
    _fix_times(low)


def _readlink_story(m: Path) -> Obs:
    low = m.parent / "low"
    obs: Obs = {"readlink": os.readlink(m / "l")}
    obs["lower l: atime after readlink through the mount"] = os.lstat(low / "l").st_atime_ns
    os.readlink(m / "m")
    os.chown(m / "m", 1, 1, follow_symlinks=False)  # copies it up: the copy gets the lower's times
    obs["m: atime after readlink and copy-up"] = os.lstat(m / "m").st_atime_ns
    return obs


@pytest.mark.timeout(60)
def test_readlink_leaves_lower_atime_alone(tmp_path: Path, mount: Mount) -> None:
    """Reading a lower symlink through the mount changes nothing in the lower, not even its atime."""
    res = _on_both(tmp_path, mount, _readlink_story, build=_build_link)
    assert res["kernel"][0] == {"readlink": "target", "lower l: atime after readlink through the mount": T0,
                                "m: atime after readlink and copy-up": T0}
    _same(res["kernel"][0], res["pyunionfs"][0], "atimes of lower symlinks read through the mount")
