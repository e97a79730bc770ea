"""Security: the daemon never follows a symlink stored in a layer, and never grants more than was asked.

Why: the daemon runs as root and works on the layers with plain system
calls.  A symlink stored in a layer is data to show, never a path for the
daemon to take: if the daemon followed one, a user able to plant symlinks
in a layer (an image author, a container writing its own upper) could make
the root daemon read, write, chmod or delete anything on the host.  The
README's "Safety" section promises exactly that nothing outside the layer
roots is ever reached.

How the symlink tests tell the daemon's doing from the kernel's: the kernel
resolves the symlinks it is shown on the *merged* view -- that is normal and
not the daemon's doing.  So the links planted here are relative and escape
their layer root on disk (``../outside/...`` from a layer's top,
``../../outside/...`` one level down), where an ``outside/`` directory sits
next to the layers.  Seen through the mount, whose parent holds nothing,
the same targets resolve to nothing: anything that changes in ``outside/``
was done by a daemon that followed a link on disk.  ``outside/`` (names,
data, modes, owners, mtime/ctime, xattrs) is compared before and after.
Absolute links (which the kernel does follow into the host) are used only
with operations that do not follow them.

Where the kernel's overlayfs can show the expected result, the same story
runs on it first and pyunionfs must give the same answers.

Ownership and permission checks that already live elsewhere are not
repeated here: test_write_links.py (uid 1000 creating, refused on root's
files, set-group-ID dirs) and test_write_safety.py (copy-up keeps owner,
mode, times, xattrs).  Added here: refusals after a root-triggered copy-up,
refused changes leave no copy-up behind, modes under various umasks
(over whiteouts too), and the modes of whiteouts and of the work directory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyunionfs.fs.syscalls import RENAME_EXCHANGE, renameat2
from pyunionfs.fuse import control
from tests.support.mounting import Daemon
from tests.support.writecheck import (
    default_workdir,
    errname,
    kernel_overlay,
    layer_state,
    on_kernel_and_ours,
    public_dir,
    put,
    run_as,
)

Mount = Callable[..., Daemon]
Obs = dict[str, Any]

SECRET = b"the host's secret\n"
#: A name that exists only in outside/dir: seeing it through the mount means the daemon listed outside.
ONLY_OUTSIDE = "only-outside"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _outside(out: Path) -> Path:
    """The directory a daemon that follows layer symlinks would reach: a file, an empty dir, a full dir."""
    put(out / "secret", SECRET, 0o644)
    os.setxattr(out / "secret", "trusted.keep", b"keep")
    os.setxattr(out / "secret", "user.keep", b"keep")
    (out / "emptydir").mkdir()
    put(out / "dir/inner", "outside inner\n", 0o644)
    os.setxattr(out / "dir/inner", "trusted.keep", b"keep")
    put(out / "dir" / ONLY_OUTSIDE, "outside only\n", 0o644)
    (out / "dir/sub").mkdir()
    for p in (out / "secret", out / "dir/inner", out / "dir", out / "emptydir", out):
        os.utime(p, ns=(1_000_000_000, 2_000_000_000))  # a fixed mtime: any write moves it
    return out


def outcome(fn: Callable[..., object], *args: Any, **kw: Any) -> str:
    """``ok``, an errno name, or ``unsupported`` (Python refuses, e.g. lchmod on Linux)."""
    try:
        fn(*args, **kw)
    except OSError as exc:
        return errname(exc.errno or -1)
    except NotImplementedError:
        return "unsupported"
    return "ok"


def _mkfile(p: Path | str, data: bytes = b"new\n", mode: int = 0o644, flags: int = 0) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(p: Path | str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def _rdwr(p: Path | str) -> None:
    fd = os.open(p, os.O_RDWR)
    try:
        os.write(fd, b"W")
    finally:
        os.close(fd)


def _dead(out: Obs) -> list[str]:
    """Outcomes that say the daemon is gone (a crash, not an acceptable error)."""
    return [k for k, v in out.items() if v in ("ENOTCONN", "ECONNABORTED")]


def _changed(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[str]:
    """What differs between two layer_state() snapshots, one line per path."""
    return [f"{p}: {before.get(p)} -> {after.get(p)}" for p in sorted(set(before) | set(after))
            if before.get(p) != after.get(p)]


def _stop_allowing_errors(d: Daemon) -> tuple[int, str]:
    """Unmount; return the exit status and the log up to the unmount.

    Tracebacks are allowed: the layers were changed behind the daemon's
    back, and an unexpected error becomes EIO plus a logged traceback.
    """
    rc = d.stop(check=False)
    return rc, d.final_log


# --------------------------------------------------------------------------
# Symlinks stored in the layers, at every position
# --------------------------------------------------------------------------

#: (layer, path, target): relative links whose target escapes the layer root on disk.
_REL = (
    ("low1", "ls", "../outside/secret"),           # lower, leaf, to a file
    ("low1", "ld", "../outside"),                  # lower, to a directory
    ("low1", "le", "../outside/emptydir"),         # lower, to an empty dir (rmdir bait)
    ("low1", "sub/ls", "../../outside/secret"),    # lower, one level down
    ("low1", "sub/ld", "../../outside/dir"),
    ("up", "us", "../outside/secret"),             # upper, leaf
    ("up", "ud", "../outside"),                    # upper, to a directory
    ("up", "usub/us", "../../outside/secret"),
    ("up", "usub/ud", "../../outside/dir"),
    ("up", "v", "../outside"),                     # upper link over a lower directory
    ("low1", "w", "../outside"),                   # top-lower link over a bottom-lower directory
)
#: (layer, path, target inside outside/): absolute links, used only with operations that do not follow them.
_ABS = (
    ("low1", "as", "secret"),
    ("low1", "ad", "dir"),
    ("up", "uas", "secret"),
)


def _symlink_layers(L: Path) -> Path:
    """Layers up/low1/low2 next to outside/; returns outside/."""
    out = _outside(L / "outside")
    for layer, rel, target in _REL:
        p = L / layer / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)
    for layer, rel, target in _ABS:
        os.symlink(out / target, L / layer / rel)
    put(L / "low1/v/x", "lower v/x\n")           # hidden by the upper link v
    put(L / "low2/w/hidden", "hidden by w\n")    # hidden by the top-lower link w
    put(L / "low1/sub/f", "sub/f\n")             # writing it copies up sub, full of links
    put(L / "up/usub/f", "usub/f\n")
    # A directory over a link in a layer below (the link is not merged, so never walked):
    put(L / "low1/m/a", "m/a\n")                 # low1 m/ over low2 m -> ../outside
    (L / "low1/m/empty").mkdir()
    os.symlink("../outside", L / "low2/m")
    put(L / "low1/n/a", "n/a\n")                 # low1 n/ over low2 n -> /abs/outside
    os.symlink(out, L / "low2/n")
    put(L / "up/u/mine", "u/mine\n")             # upper u/ over low1 u -> ../outside
    os.symlink("../outside", L / "low1/u")
    return out


def _follow_ops(m: Path, s: str, target: str) -> Obs:
    """Operations that make the kernel follow link *s*: through the mount it resolves to nothing."""
    p = m / s
    hl = m / (s + ".hlf")
    # open(O_CREAT) creates a dangling link's target if its parent exists: "../outside" from the
    # mount's top would create a file next to the mountpoint, so only deeper targets are used with it
    creat = outcome(_mkfile, p) if len([c for c in target.split("/") if c != ".."]) > 1 else "-"
    return {
        "stat": outcome(os.stat, p),
        "read": outcome(_read, p),
        "open O_RDWR": outcome(_rdwr, p),
        "open O_CREAT": creat,
        "truncate": outcome(os.truncate, p, 0),
        "chmod": outcome(os.chmod, p, 0o777),
        "chown": outcome(os.chown, p, 1000, 1000),
        "utime": outcome(os.utime, p, (1, 1)),
        "setxattr": outcome(os.setxattr, p, "user.x", b"1"),
        "removexattr": outcome(os.removexattr, p, "user.keep"),
        "getxattr": outcome(os.getxattr, p, "user.keep"),
        "listdir": outcome(os.listdir, p),
        "create under": outcome(_mkfile, p / "new"),
        "mkdir under": outcome(os.mkdir, p / "nd"),
        "lstat under": outcome(os.lstat, p / "secret"),
        "unlink under": outcome(os.unlink, p / "secret"),
        "rmdir under": outcome(os.rmdir, p / "emptydir"),
        "rename under": outcome(os.rename, p / "secret", p / "moved"),
        "rename into": outcome(os.rename, m / "sub/f", p / "stolen") if (m / "sub/f").exists() else "-",
        "link(2) (Linux: not followed)": outcome(os.link, p, hl, follow_symlinks=True),
    }


def _nofollow_ops(m: Path, s: str, target: str) -> Obs:
    """Operations on link *s* itself (lower links are copied up): nothing may reach the target."""
    p = m / s
    o: Obs = {}
    st = os.lstat(p)
    o["is a link"] = stat.S_ISLNK(st.st_mode)
    o["readlink"] = os.readlink(p) == target
    o["rmdir"] = outcome(os.rmdir, p)
    o["mkdir over"] = outcome(os.mkdir, p)
    o["lchmod"] = outcome(os.chmod, p, 0o700, follow_symlinks=False)
    o["lchown"] = outcome(os.chown, p, 1000, 1000, follow_symlinks=False)
    o["lchown shows"] = (os.lstat(p).st_uid, os.lstat(p).st_gid)
    o["lutime"] = outcome(os.utime, p, ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
    o["lutime shows"] = os.lstat(p).st_mtime_ns
    o["lsetxattr"] = outcome(os.setxattr, p, "trusted.t", b"on the link", follow_symlinks=False)
    o["lgetxattr"] = os.getxattr(p, "trusted.t", follow_symlinks=False) if o["lsetxattr"] == "ok" else None
    o["lgetxattr of target's"] = outcome(os.getxattr, p, "trusted.keep", follow_symlinks=False)
    o["lremovexattr of target's"] = outcome(os.removexattr, p, "trusted.keep", follow_symlinks=False)
    o["lremovexattr"] = outcome(os.removexattr, p, "trusted.t", follow_symlinks=False)
    o["link"] = outcome(os.link, p, m / (s + ".hl"), follow_symlinks=False)
    o["link is the link"] = os.readlink(m / (s + ".hl")) == target if o["link"] == "ok" else None
    o["rename from"] = outcome(os.rename, p, m / (s + ".mv"))
    o["renamed is the link"] = os.readlink(m / (s + ".mv")) == target if o["rename from"] == "ok" else None
    o["rename back"] = outcome(os.rename, m / (s + ".mv"), p)
    _mkfile(m / (s + ".file"), b"replacement\n")
    o["rename to"] = outcome(os.rename, m / (s + ".file"), p)
    o["replaced"] = _read(p) if o["rename to"] == "ok" else None
    o["unlink"] = outcome(os.unlink, p)
    o["unlink the hard link"] = outcome(os.unlink, m / (s + ".hl"))
    o["gone"] = outcome(os.lstat, p)
    return o


def _merged_dir_ops(m: Path, s: str) -> Obs:
    """A directory whose name is a link to outside/ in a layer below it (that link is never merged in)."""
    p = m / s
    o: Obs = {"listdir": sorted(os.listdir(p))}
    for name in ("secret", "dir", "emptydir", ONLY_OUTSIDE):
        o[f"lstat {name}"] = outcome(os.lstat, p / name)
    o["rmdir outside's name"] = outcome(os.rmdir, p / "emptydir")
    o["unlink outside's name"] = outcome(os.unlink, p / "secret")
    o["create"] = outcome(_mkfile, p / "new", b"created\n", 0o600, os.O_EXCL)
    o["mkdir"] = outcome(os.mkdir, p / "nd")
    o["rename"] = outcome(os.rename, p / "new", p / "new2")
    o["chmod"] = outcome(os.chmod, p, 0o750)
    o["utime"] = outcome(os.utime, p, (7, 7))
    o["setxattr"] = outcome(os.setxattr, p, "trusted.t", b"1")
    if (p / "a").exists():
        o["write a"] = outcome(_rdwr, p / "a")
        o["unlink a"] = outcome(os.unlink, p / "a")
    if (p / "mine").exists():
        o["unlink mine"] = outcome(os.unlink, p / "mine")
    if (p / "empty").exists():
        o["rmdir empty"] = outcome(os.rmdir, p / "empty")
    o["listdir after"] = sorted(os.listdir(p))
    return o


def _merged_tree(m: Path, out: Path) -> list[tuple[str, str, str]]:
    """Every name through the mount (links not followed): (path, kind, link target with outside/ as <outside>)."""
    rows = []
    for dirpath, dirs, files in os.walk(m):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            target = os.readlink(p).replace(str(out), "<outside>") if stat.S_ISLNK(st.st_mode) else ""
            rows.append((os.path.relpath(p, m), stat.filemode(st.st_mode)[0], target))
    return sorted(rows)


def _symlink_story(m: Path, out: Path) -> Obs:
    assert not (m.parent / "outside").exists(), (
        "the test's premise: relative targets followed through the mount must resolve to nothing")
    obs: Obs = {"tree before": _merged_tree(m, out)}
    # copy-up triggers next to links: writing sub/f copies up sub (full of links), writing usub/f does nothing
    obs["write sub/f"] = outcome(_rdwr, m / "sub/f")
    obs["write usub/f"] = outcome(_rdwr, m / "usub/f")
    for _layer, s, target in _REL:
        obs[f"{s}: following"] = _follow_ops(m, s, target)
    # reading through an absolute link is the kernel's doing and reaches the real file; nothing else follows it
    for _layer, s, _t in _ABS:
        obs[f"{s}: read through the kernel"] = _read(m / s) == SECRET if s != "ad" else sorted(os.listdir(m / s))
    for _layer, s, target in _REL:
        obs[f"{s}: the link itself"] = _nofollow_ops(m, s, target)
    for _layer, s, target in _ABS:
        obs[f"{s}: the link itself"] = _nofollow_ops(m, s, str(out / target))
    for s in ("m", "n", "u"):
        obs[f"{s}: dir over a link"] = _merged_dir_ops(m, s)
    obs["tree after"] = _merged_tree(m, out)
    return obs


@pytest.mark.timeout(90)
def test_layer_symlinks_are_shown_never_followed(tmp_path: Path, mount: Mount) -> None:
    """Links in lowers and upper, as leaves and as directories, under every operation: outside/ never changes.

    Every operation kind is done on each link: following it (the kernel
    resolves it on the merged view, to nothing), on the link itself
    (lchown, lutime, lsetxattr, link, rename from and to, unlink: lower
    links get copied up) and on directories whose name is a link in
    another layer.  The kernel's overlayfs over the same layers gives the
    expected answers.
    """
    results: dict[str, Obs] = {}
    for side in ("kernel", "pyunionfs"):
        L, M = tmp_path / side / "L", tmp_path / side / "M"
        for layer in ("up", "low1", "low2"):
            (L / layer).mkdir(parents=True)
        M.mkdir()
        out = _symlink_layers(L)
        outside_before = layer_state(out)
        lowers_before = {n: layer_state(L / n) for n in ("low1", "low2")}
        if side == "kernel":
            with kernel_overlay([L / "low1", L / "low2"], L / "up", L / "work", M / "mnt") as m:
                results[side] = _symlink_story(m, out)
        else:
            d = mount([L / "low1", L / "low2"], L / "up", mnt=M / "mnt")
            results[side] = _symlink_story(d.mnt, out)
            d.stop()  # exit status 0, no traceback in the log
        changed = _changed(outside_before, layer_state(out))
        assert not changed, f"{side}: outside/ was changed through a layer symlink:\n" + "\n".join(changed)
        for n, before in lowers_before.items():
            assert layer_state(L / n) == before, f"{side}: lower {n} was modified"
    k, p = results["kernel"], results["pyunionfs"]
    # the premise, as the kernel shows it: links are links, following them leads nowhere
    assert k["ls: the link itself"]["is a link"] and k["ls: the link itself"]["readlink"]
    assert k["ls: following"]["read"] == "ENOENT" and k["ud: following"]["create under"] == "ENOENT"
    assert k["ls: the link itself"]["lchown"] == "ok" and k["m: dir over a link"]["lstat secret"] == "ENOENT"
    dead = [f"{key}/{op}" for key, o in p.items() if isinstance(o, dict) for op in _dead(o)]
    assert not dead, f"the daemon died: {dead}"
    wrong = []
    for key in k:
        if isinstance(k[key], dict):
            wrong += [f"  {key} / {op}: kernel {v!r}, pyunionfs {p[key].get(op)!r}"
                      for op, v in k[key].items() if p[key].get(op) != v]
        elif p[key] != k[key]:
            wrong.append(f"  {key}:\n    kernel    {k[key]!r}\n    pyunionfs {p[key]!r}")
    assert not wrong, "answers differ from the kernel's overlayfs:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------
# Entries replaced by symlinks behind the mount's back
# --------------------------------------------------------------------------

#: Operations on a file whose layer entry became a link to outside/secret after the kernel learnt it.
#: Each gets (path, fd opened before the swap) and returns what it read, if anything.
_LEAF_OPS: dict[str, Callable[[Path, int], object]] = {
    "read": lambda p, fd: _read(p),
    "stat": lambda p, fd: os.stat(p).st_size,
    "open O_RDWR": lambda p, fd: _rdwr(p),
    "open O_TRUNC": lambda p, fd: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
    "truncate": lambda p, fd: os.truncate(p, 0),
    "ftruncate": lambda p, fd: os.ftruncate(fd, 0),
    "chown": lambda p, fd: os.chown(p, 1000, 1000),
    "fchown": lambda p, fd: os.fchown(fd, 1000, 1000),
    "utime": lambda p, fd: os.utime(p, (1, 1)),
    "touch": lambda p, fd: os.utime(p),
    "futime": lambda p, fd: os.utime(fd, (1, 1)),
    "setxattr": lambda p, fd: os.setxattr(p, "trusted.t", b"1"),
    "fsetxattr": lambda p, fd: os.setxattr(fd, "trusted.t", b"1"),
    "removexattr": lambda p, fd: os.removexattr(p, "trusted.keep"),
    "fremovexattr": lambda p, fd: os.removexattr(fd, "trusted.keep"),
    "getxattr": lambda p, fd: os.getxattr(p, "trusted.keep"),
    "listxattr": lambda p, fd: sorted(os.listxattr(p)),
    "link": lambda p, fd: os.link(p, str(p) + ".hl"),
    "rename": lambda p, fd: os.rename(p, str(p) + ".mv"),
    "unlink": lambda p, fd: os.unlink(p),
}

#: Operations, relative to a directory fd held open, in a directory whose upper entry became a link to outside/dir.
_DIR_OPS: dict[str, Callable[[int], object]] = {
    "create": lambda dfd: os.close(os.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)),
    "mkdir": lambda dfd: os.mkdir("nd", dir_fd=dfd),
    "symlink": lambda dfd: os.symlink("x", "sl", dir_fd=dfd),
    "mknod": lambda dfd: os.mknod("fifo", stat.S_IFIFO | 0o644, dir_fd=dfd),
    "read inner": lambda dfd: _read_at(dfd, "inner"),
    "write inner": lambda dfd: os.close(os.open("inner", os.O_RDWR, dir_fd=dfd)),
    "truncate inner": lambda dfd: os.close(os.open("inner", os.O_WRONLY | os.O_TRUNC, dir_fd=dfd)),
    "chown inner": lambda dfd: os.chown("inner", 1000, 1000, dir_fd=dfd),
    "utime inner": lambda dfd: os.utime("inner", (1, 1), dir_fd=dfd),
    "setxattr inner": lambda dfd: os.setxattr(f"/proc/self/fd/{dfd}/inner", "trusted.t", b"1"),
    "removexattr inner": lambda dfd: os.removexattr(f"/proc/self/fd/{dfd}/inner", "trusted.keep"),
    "getxattr inner": lambda dfd: os.getxattr(f"/proc/self/fd/{dfd}/inner", "trusted.keep"),
    "link inner": lambda dfd: os.link("inner", "inner.hl", src_dir_fd=dfd, dst_dir_fd=dfd),
    "rename inner": lambda dfd: os.rename("inner", "moved", src_dir_fd=dfd, dst_dir_fd=dfd),
    "unlink inner": lambda dfd: os.unlink("inner", dir_fd=dfd),
    "rmdir sub": lambda dfd: os.rmdir("sub", dir_fd=dfd),
    "listdir": lambda dfd: sorted(os.listdir(dfd)),
    "lstat outside's name": lambda dfd: os.stat(ONLY_OUTSIDE, dir_fd=dfd, follow_symlinks=False).st_size,
    "fchown the dir": lambda dfd: os.fchown(dfd, 1000, 1000),
    "futime the dir": lambda dfd: os.utime(dfd, (1, 1)),
    "fsetxattr the dir": lambda dfd: os.setxattr(dfd, "trusted.t", b"1"),
}


def _read_at(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    try:
        return os.read(fd, 1000)
    finally:
        os.close(fd)


def _replace_by_link(path: Path, target: str) -> None:
    """Atomically replace the file *path* in a layer by a symlink (behind the mount's back)."""
    tmp = path.with_name(path.name + ".swap")
    os.symlink(target, tmp)
    os.rename(tmp, path)


def _exchange_with_link(layer: Path, name: str, target: str) -> None:
    """Atomically put a symlink where directory *name* was; the directory stays in the layer as NAME.real."""
    os.symlink(target, layer / (name + ".real"))
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        renameat2(fd, os.fsencode(name), fd, os.fsencode(name + ".real"), RENAME_EXCHANGE)
    finally:
        os.close(fd)


def _run(fn: Callable[[], object]) -> tuple[str, object]:
    """(outcome, returned value)."""
    try:
        return "ok", fn()
    except OSError as exc:
        return errname(exc.errno or -1), None


def _swap_layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    L, M = tmp_path / "L", tmp_path / "M"
    for layer in (L / "low", L / "up", M):
        layer.mkdir(parents=True)
    out = _outside(L / "outside")
    for op in _LEAF_OPS:
        put(L / "low" / f"l-{op}", "lower data\n")
    return L / "low", L / "up", out, M / "mnt"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("caches", ["kept", "dropped"])
def test_entries_replaced_by_symlinks_behind_the_mount_are_not_followed(tmp_path: Path, mount: Mount,
                                                                        caches: str) -> None:
    """Upper files, lower files and upper dirs become links to outside/ after the kernel learnt them.

    The kernel keeps its cached inodes (the default timeout is a day) and
    sends its requests for the old object; files opened before the swap
    send fd-based ones.  With the daemon's caches dropped after the swap, a
    fresh resolution must meet the link and refuse to go through it.
    Errors are expected (the layers changed behind the mount's back); a
    daemon that died, or anything changed, read or listed in outside/, is a
    failure.  chmod is left out: see test_chmod_never_follows_a_symlink_swapped_in.
    """
    low, up, out, mnt = _swap_layers(tmp_path)
    before = layer_state(out)
    d = mount([low], up, mnt=mnt)
    m = d.mnt
    fds: list[int] = []
    try:
        leaf: dict[str, tuple[Path, int]] = {}
        for op in _LEAF_OPS:
            put(m / f"u-{op}", "upper data\n")
            leaf[f"upper {op}"] = (m / f"u-{op}", os.open(m / f"u-{op}", os.O_RDWR))
            os.lstat(m / f"l-{op}")  # known to the kernel as a regular file, not copied up
            leaf[f"lower {op}"] = (m / f"l-{op}", os.open(m / f"l-{op}", os.O_RDONLY))
        dirs: dict[str, int] = {}
        for op in _DIR_OPS:
            (m / f"d-{op}/sub").mkdir(parents=True)
            put(m / f"d-{op}/inner", "upper inner\n")
            os.setxattr(m / f"d-{op}/inner", "trusted.keep", b"mine")
            dirs[op] = os.open(m / f"d-{op}", os.O_RDONLY | os.O_DIRECTORY)
        fds += [fd for _p, fd in leaf.values()] + list(dirs.values())
        for op in _LEAF_OPS:
            _replace_by_link(up / f"u-{op}", "../outside/secret")
            _replace_by_link(low / f"l-{op}", "../outside/secret")
        for op in _DIR_OPS:
            _exchange_with_link(up, f"d-{op}", "../outside/dir")
        if caches == "dropped":
            control.drop_caches(os.fsencode(m))
        results: dict[str, tuple[str, object]] = {}
        touched: list[str] = []
        for key, (p, fd) in leaf.items():
            results[key] = _run(functools.partial(_LEAF_OPS[key.split(" ", 1)[1]], p, fd))
            touched += [f"{key}: {c}" for c in _changed(before, layer_state(out))]
            before = layer_state(out)
        for op, dfd in dirs.items():
            results[f"dir {op}"] = _run(functools.partial(_DIR_OPS[op], dfd))
            touched += [f"dir {op}: {c}" for c in _changed(before, layer_state(out))]
            before = layer_state(out)
        assert sorted(os.listdir(m))  # still answering
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        rc, log = _stop_allowing_errors(d)
    assert rc == 0, f"the daemon exited with {rc}:\n{log}"
    dead = [k for k, (o, _v) in results.items() if o in ("ENOTCONN", "ECONNABORTED")]
    assert not dead, f"the daemon stopped answering at: {dead}\n{log}"
    assert not touched, "outside/ was changed by the daemon through a swapped-in link:\n" + "\n".join(touched)
    leaked = [f"{k}: {v!r}" for k, (_o, v) in results.items()
              if v in (SECRET, b"keep", b"outside inner\n") or (k.endswith(" stat") and v == len(SECRET))
              or (isinstance(v, list) and (ONLY_OUTSIDE in v or "user.keep" in v))]
    assert not leaked, "the daemon read outside/ through a swapped-in link:\n" + "\n".join(leaked)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [
    "upper file, chmod",
    "upper file, fchmod after a cache drop",
    "upper dir, chmod",
    "lower file, chmod copies it up",  # the copy is a link, which chmod skips
])
def test_chmod_never_follows_a_symlink_swapped_in(tmp_path: Path, mount: Mount, case: str) -> None:
    """chmod of a file or dir whose layer entry became a link to outside/ must not chmod outside/.

    The kernel's overlayfs holds the real upper inode and never looks at
    the name again; pyunionfs may fail the call (the layer changed behind
    its back) but must not change the link's target.
    """
    L, M = tmp_path / "L", tmp_path / "M"
    for layer in (L / "low", L / "up", M):
        layer.mkdir(parents=True)
    out = _outside(L / "outside")
    put(L / "low/f", "lower\n", 0o644)
    before = layer_state(out)
    d = mount([L / "low"], L / "up", mnt=M / "mnt")
    m = d.mnt
    fd = -1
    try:
        if case.startswith("upper file"):
            put(m / "f2", "upper\n", 0o644)
            fd = os.open(m / "f2", os.O_RDONLY)
            _replace_by_link(L / "up/f2", "../outside/secret")
            if "fchmod" in case:
                control.drop_caches(os.fsencode(m))
                result = outcome(os.fchmod, fd, 0o777)
            else:
                result = outcome(os.chmod, m / "f2", 0o777)
        elif case.startswith("upper dir"):
            (m / "d").mkdir()
            _exchange_with_link(L / "up", "d", "../outside/emptydir")
            result = outcome(os.chmod, m / "d", 0o777)
        else:
            os.lstat(m / "f")  # the kernel learns a regular file
            _replace_by_link(L / "low/f", "../outside/secret")
            result = outcome(os.chmod, m / "f", 0o777)
        assert sorted(os.listdir(m))  # still answering
    finally:
        if fd >= 0:
            os.close(fd)
        rc, log = _stop_allowing_errors(d)
    assert rc == 0, f"the daemon exited with {rc}:\n{log}"
    changed = _changed(before, layer_state(out))
    assert not changed, f"chmod through the mount ({result}) changed outside/:\n" + "\n".join(changed)


# --------------------------------------------------------------------------
# Directories swapped for symlinks while operations run
# --------------------------------------------------------------------------


def _busy_in(m: Path, name: str, i: int, counts: dict[str, int], leaks: list[str]) -> None:
    """One round of changes in directory *name* of the mount; errors are counted, reads checked for leaks."""
    p = m / name

    def do(what: str, fn: Callable[[], object]) -> object:
        try:
            value = fn()
        except OSError as exc:
            counts[errname(exc.errno or -1)] = counts.get(errname(exc.errno or -1), 0) + 1
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise
            return None
        counts["ok"] = counts.get("ok", 0) + 1
        return value

    do("create", lambda: _mkfile(p / f"f{i}", b"data %d\n" % i, 0o600, os.O_EXCL))
    do("write", lambda: _rdwr(p / f"f{i}"))
    do("mkdir", lambda: os.mkdir(p / f"d{i}"))
    do("rename", lambda: os.rename(p / f"f{i}", p / f"g{i}"))
    do("chmod", lambda: os.chmod(p / f"g{i}", 0o640))  # the file itself never becomes a link here
    do("chown", lambda: os.chown(p / f"g{i}", 1000, 1000))
    do("utime", lambda: os.utime(p / f"g{i}", (1, 1)))
    do("truncate", lambda: os.truncate(p / f"g{i}", 1))
    do("setxattr", lambda: os.setxattr(p / f"g{i}", "trusted.t", b"1"))
    do("removexattr", lambda: os.removexattr(p / "inner", "trusted.keep"))
    data = do("read", lambda: _read(p / "inner"))
    names = do("listdir", lambda: os.listdir(p))
    found = do("lstat", lambda: os.lstat(p / ONLY_OUTSIDE))
    do("unlink", lambda: os.unlink(p / f"g{i}"))
    do("rmdir", lambda: os.rmdir(p / f"d{i}"))
    if data == b"outside inner\n" or (isinstance(names, list) and ONLY_OUTSIDE in names) or found is not None:
        leaks.append(f"round {i} in {name}: read {data!r}, listed {names!r}, lstat {found!r}")


@pytest.mark.timeout(90)
def test_directories_swapped_for_symlinks_while_operations_run(tmp_path: Path, mount: Mount) -> None:
    """A thread keeps exchanging upper directories with links to outside/dir, behind the mount's back.

    One directory is upper-only, one is merged with a lower one; now and
    then the daemon's caches are dropped so that it resolves the names
    afresh.  Meanwhile the main thread creates, writes, renames, changes
    metadata, lists and removes inside them through the mount.  Errors are
    fine; a daemon that dies, that changes outside/ or that shows what is
    in it is not.  (chmod of the swapped directory itself is the known bug
    of test_chmod_never_follows_a_symlink_swapped_in and is not done here.)
    """
    L, M = tmp_path / "L", tmp_path / "M"
    for layer in (L / "low", L / "up", M):
        layer.mkdir(parents=True)
    out = _outside(L / "outside")
    put(L / "low/merged/lowfile", "lower\n")
    before = layer_state(out)
    d = mount([L / "low"], L / "up", mnt=M / "mnt")
    m = d.mnt
    names = ("dir", "merged")
    for name in names:
        (m / name).mkdir(exist_ok=True)
        put(m / name / "inner", "upper inner\n")
        os.setxattr(m / name / "inner", "trusted.keep", b"mine")
        os.symlink("../outside/dir", L / "up" / (name + ".real"))
    stop = threading.Event()
    swaps = [0]
    thread_errors: list[BaseException] = []

    def swapper() -> None:
        fd = os.open(L / "up", os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not stop.is_set():
                for name in names:
                    renameat2(fd, name.encode(), fd, name.encode() + b".real", RENAME_EXCHANGE)
                    swaps[0] += 1
                if swaps[0] % 40 == 0:  # about every 20 ms: the daemon and the kernel look the names up again
                    with contextlib.suppress(Exception):
                        control.drop_caches(os.fsencode(m))
                time.sleep(0.0005)
        except BaseException as exc:  # reported by the main thread
            thread_errors.append(exc)
        finally:
            os.close(fd)

    counts: dict[str, int] = {}
    leaks: list[str] = []
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 3
        i = 0
        while time.monotonic() < deadline:
            for name in names:
                _busy_in(m, name, i, counts, leaks)
            i += 1
    finally:
        stop.set()
        t.join(timeout=30)
    try:
        assert not thread_errors, f"the swapping thread failed: {thread_errors[0]!r}"
        for name in names:  # put the real directories back where they were
            if (L / "up" / name).is_symlink():
                _exchange = os.open(L / "up", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    renameat2(_exchange, name.encode(), _exchange, name.encode() + b".real", RENAME_EXCHANGE)
                finally:
                    os.close(_exchange)
        control.drop_caches(os.fsencode(m))
        assert sorted(os.listdir(m)) == ["dir", "dir.real", "merged", "merged.real"], "no longer answering"
        assert (m / "dir/inner").read_bytes() == b"upper inner\n"
    finally:
        rc, log = _stop_allowing_errors(d)
    assert rc == 0, f"the daemon exited with {rc}:\n{log}"
    assert swaps[0] > 100 and counts.get("ok", 0) > 100, f"too little happened: {swaps[0]} swaps, {counts}"
    changed = _changed(before, layer_state(out))
    assert not changed, f"outside/ was changed through a swapped-in link ({counts}):\n" + "\n".join(changed)
    assert not leaks, "outside/ was shown through the mount:\n" + "\n".join(leaks[:10])


# --------------------------------------------------------------------------
# A second uid: refusals after copy-ups, nothing stored more permissive than asked
# --------------------------------------------------------------------------


def _perm_lower(low: Path) -> None:
    for d, mode, owner in (("rootdir", 0o755, 0), ("rootdir2", 0o755, 0), ("priv700", 0o700, 0),
                           ("userdir", 0o700, 1000), ("pub", 0o777, 0)):
        (low / d).mkdir(parents=True)
        os.chown(low / d, owner, owner)
        os.chmod(low / d, mode)
    put(low / "rootdir/secret", "root only\n", 0o600)
    put(low / "rootdir2/pub", "root's, readable\n", 0o644)
    put(low / "priv700/f", "behind a 0700 dir\n", 0o644)
    put(low / "userdir/own600", "uid 1000's\n", 0o600)
    os.chown(low / "userdir/own600", 1000, 1000)
    put(low / "pub/gone", "root's, to be deleted\n", 0o644)
    put(low / "pub/w1", "root's, to be deleted\n", 0o644)
    (low / "pub/gone-dir").mkdir()


def _as_root(m: Path) -> None:
    """Copy-ups and whiteouts made by root before uid 1000 comes."""
    for p in ("rootdir/secret", "priv700/f", "userdir/own600"):
        with open(m / p, "ab") as f:
            f.write(b"appended by root\n")
    os.unlink(m / "pub/gone")
    os.unlink(m / "pub/w1")
    os.rmdir(m / "pub/gone-dir")


_PERM_AS_USER = r"""
def mk(p, mode):
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
def readf(p):
    with open(p, "rb") as f:
        f.read()
out["refused"] = {
    "read root's 0600 file copied up by root": err(readf, m + "/rootdir/secret"),
    "chmod root's copied-up file": err(os.chmod, m + "/rootdir/secret", 0o644),
    "unlink root's copied-up file": err(os.unlink, m + "/rootdir/secret"),
    "create in root's copied-up 0755 dir": err(mk, m + "/rootdir/new", 0o600),
    "list root's copied-up 0700 dir": err(os.listdir, m + "/priv700"),
    "stat in root's copied-up 0700 dir": err(os.stat, m + "/priv700/f"),
    "write root's lower file": err(openw, m + "/rootdir2/pub"),
    "truncate root's lower file": err(os.truncate, m + "/rootdir2/pub", 0),
    "chmod root's lower file": err(os.chmod, m + "/rootdir2/pub", 0o666),
    "chown root's lower file to self": err(os.chown, m + "/rootdir2/pub", 1000, 1000),
    "chgrp root's lower file": err(os.chown, m + "/rootdir2/pub", -1, 1000),
    "touch root's lower file": err(os.utime, m + "/rootdir2/pub"),
    "set times of root's lower file": err(os.utime, m + "/rootdir2/pub", (1, 1)),
    "setxattr on root's lower file": err(os.setxattr, m + "/rootdir2/pub", "user.x", b"1"),
    "rename root's lower file away": err(os.rename, m + "/rootdir2/pub", m + "/pub/stolen"),
    "unlink root's lower file": err(os.unlink, m + "/rootdir2/pub"),
    "chmod root's lower dir": err(os.chmod, m + "/rootdir2", 0o777),
    "create in root's lower dir": err(mk, m + "/rootdir2/new", 0o600),
    "read own 0600 file copied up by root": err(readf, m + "/userdir/own600"),
}
os.umask(0o022)
mk(m + "/pub/c600", 0o600)
mk(m + "/pub/c666", 0o666)
os.mkdir(m + "/pub/d700", 0o700)
os.mkdir(m + "/pub/d777", 0o777)
mk(m + "/pub/gone", 0o600)           # over root's whiteout: built in the work dir, then moved
os.mkdir(m + "/pub/gone-dir", 0o700)  # over the whiteout of a lower dir
os.umask(0o077)
mk(m + "/pub/u077", 0o666)
os.mkdir(m + "/pub/du077", 0o777)
"""

#: What the upper must hold, as [uid, gid, mode]: owners of the callers, modes no wider than asked.
_PERM_EXPECTED = {
    "rootdir": [0, 0, oct(stat.S_IFDIR | 0o755)],
    "rootdir/secret": [0, 0, oct(stat.S_IFREG | 0o600)],
    "priv700": [0, 0, oct(stat.S_IFDIR | 0o700)],
    "priv700/f": [0, 0, oct(stat.S_IFREG | 0o644)],
    "userdir": [1000, 1000, oct(stat.S_IFDIR | 0o700)],
    "userdir/own600": [1000, 1000, oct(stat.S_IFREG | 0o600)],
    "pub": [0, 0, oct(stat.S_IFDIR | 0o777)],
    "pub/c600": [1000, 1000, oct(stat.S_IFREG | 0o600)],
    "pub/c666": [1000, 1000, oct(stat.S_IFREG | 0o644)],
    "pub/d700": [1000, 1000, oct(stat.S_IFDIR | 0o700)],
    "pub/d777": [1000, 1000, oct(stat.S_IFDIR | 0o755)],
    "pub/gone": [1000, 1000, oct(stat.S_IFREG | 0o600)],
    "pub/gone-dir": [1000, 1000, oct(stat.S_IFDIR | 0o700)],
    "pub/u077": [1000, 1000, oct(stat.S_IFREG | 0o600)],
    "pub/du077": [1000, 1000, oct(stat.S_IFDIR | 0o700)],
}


def _upper_owners(up: Path) -> dict[str, list[Any]]:
    out = {}
    for dirpath, dirs, files in os.walk(up):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, up)] = [st.st_uid, st.st_gid, oct(st.st_mode)]
    return out


@pytest.mark.timeout(90)
def test_second_uid_is_refused_after_copy_ups_and_nothing_is_stored_wider_than_asked(tmp_path: Path,
                                                                                       mount: Mount) -> None:
    """uid 1000 through allow_other: refusals hold after root's copy-ups and leave no copy-up behind.

    Root first copies up a 0600 file, a file in a 0700 dir and uid 1000's
    own 0600 file in its 0700 dir, and deletes a few lower entries.  Then
    uid 1000 is refused whatever a local filesystem would refuse, and a
    refused change copies nothing up.  What uid 1000 creates (umask 022 and
    077, over whiteouts too) is stored with its owner and exactly the mode
    asked minus the umask; whiteouts and the work directory are closed to
    others.  The kernel's overlayfs over the same layers is the reference.
    """
    def story(mnt: Path) -> Any:
        _as_root(mnt)
        return run_as(1000, 1000, mnt, _PERM_AS_USER)["refused"]

    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _perm_lower, story, pub)
    k_refused, p_refused = results["kernel"], results["pyunionfs"]
    k_upper, p_upper = (_upper_owners(tmp_path / side / "up") for side in ("kernel", "pyunionfs"))
    # the spec, as the kernel shows it
    assert all(v in ("EACCES", "EPERM") for k, v in k_refused.items() if not k.startswith("read own")), k_refused
    assert k_refused["read own 0600 file copied up by root"] == "ok"
    assert {p: k_upper.get(p) for p in _PERM_EXPECTED} == _PERM_EXPECTED, k_upper
    wrong = [f"  {k}: kernel {v}, pyunionfs {p_refused.get(k)}" for k, v in k_refused.items() if p_refused.get(k) != v]
    assert not wrong, "uid 1000's calls are answered differently from the kernel's:\n" + "\n".join(wrong)
    wrong = [f"  {p}: expected {v}, pyunionfs stored {p_upper.get(p)}" for p, v in _PERM_EXPECTED.items()
             if p_upper.get(p) != v]
    assert not wrong, "owner/mode stored in the upper:\n" + "\n".join(wrong)
    assert not [p for p in p_upper if p.startswith("rootdir2")], f"a refused change was copied up: {p_upper}"
    assert sorted(p_upper) == sorted(k_upper), "the upper holds other entries than the kernel's"
    whiteout = p_upper["pub/w1"]
    assert stat.S_ISCHR(int(whiteout[2], 8)) and int(whiteout[2], 8) & 0o022 == 0, (
        f"whiteout writable by group or others: {whiteout} (the kernel's: {k_upper['pub/w1']})")
    work = default_workdir(tmp_path / "pyunionfs" / "up")
    for p in (work, work / "work", work / "index"):
        st = os.lstat(p)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0, (
            f"{p} is open to others: {stat.filemode(st.st_mode)} uid {st.st_uid}")
    assert os.listdir(work / "work") == [], "temporaries left in the work directory"
