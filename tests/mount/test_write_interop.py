"""Write path, interoperability: an upper written by pyunionfs is a valid kernel overlayfs upper, and back.

Why: pyunionfs promises on-disk compatibility with the kernel's overlayfs.
For the read path that means reading the kernel's markers; for the write
path it means *writing* them so that the kernel reads them the same way --
char 0/0 whiteouts, ``overlay.opaque=y`` directories, copied-up files with
their metadata, and ``overlay.origin`` so that a copied-up file keeps its
inode number -- and reading everything the kernel writes.

Each random stack (tests/support/layergen.py) is built twice from one seed.
The same deterministic list of changes (creates, writes to lower files,
unlinks, rm -r and mkdir of a merged dir, renames, chmod, chown, xattrs,
links, a refused whiteout mknod) is applied through a kernel overlay mount
to one copy and through pyunionfs to the other; the errnos and the live
trees must agree.  Then the uppers are swapped: the kernel mounts
pyunionfs's upper and pyunionfs mounts the kernel's, and each must show the
tree the other showed live.
"""

from __future__ import annotations

import ctypes
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.layergen import Stack, build_stack, kernel_mounted
from tests.support.mounting import EACH_ENGINE, Daemon
from tests.support.treesnap import Entry, Snapshot, diff, fmt_path, snapshot
from tests.support.writecheck import errname, errno_of, kernel_overlay, put, upper_layout, whiteout

#: Run on both FUSE engines: each must agree with the kernel.
pytestmark = EACH_ENGINE

Mount = Callable[..., Daemon]
Log = list[tuple[str, str, str]]

#: ``ovl/deep`` is merged in every layer of every generated stack (layergen's
#: fixed scenarios): the directory that is removed and made again.
_RMTREE = b"ovl/deep"
#: Merged with lower parts in every generated stack: renaming it is EXDEV.
_MERGED_DIR = b"ovl/with space"


def _rmtree(path: bytes, log: Log, rel: bytes) -> None:
    """rm -r in sorted order, logging each step (shutil.rmtree's order depends on readdir)."""
    for name in sorted(os.listdir(path)):
        child = path + b"/" + name
        if stat.S_ISDIR(os.lstat(child).st_mode):
            _rmtree(child, log, rel + b"/" + name)
        else:
            log.append(("unlink", os.fsdecode(rel + b"/" + name), errname(errno_of(os.unlink, child))))
    log.append(("rmdir", os.fsdecode(rel), errname(errno_of(os.rmdir, path))))


def mutate(m: Path, seed: int, userxattr: bool = False) -> Log:
    """Apply a deterministic set of changes to the merged tree at *m*; return ``(op, path, outcome)``.

    Targets are drawn with ``random.Random(seed)`` from a snapshot of the
    tree, so the same seed on two mounts showing the same tree makes the
    same changes.  Hardlinked files are never chosen for data or metadata
    changes: the kernel without ``index=on`` breaks such links on copy-up,
    pyunionfs keeps them (tests/mount/test_write_links.py covers that).
    """
    rng = random.Random(seed)
    view = snapshot(m)
    root = os.fsencode(m)
    log: Log = []
    claimed: list[bytes] = [_RMTREE, _MERGED_DIR]

    def free(p: bytes) -> bool:
        return all(p != c and not p.startswith(c + b"/") and not c.startswith(p + b"/") for c in claimed)

    def pick(want: Callable[[bytes, Entry], bool], n: int = 1) -> list[bytes]:
        cands = [p for p, e in view.items() if p != b"." and free(p) and want(p, e)]
        chosen = rng.sample(cands, min(n, len(cands)))
        claimed.extend(chosen)
        return chosen

    def single_reg(p: bytes, e: Entry) -> bool:
        return e.kind == "reg" and e.links == (p,)

    def do(op: str, rel: bytes, fn: Callable[..., object], *args: object, **kw: object) -> None:
        log.append((op, os.fsdecode(rel), errname(errno_of(fn, *args, **kw))))

    def at(rel: bytes) -> bytes:
        return root + b"/" + rel

    def overwrite(p: bytes) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, b"<written through the mount>", 0)
        finally:
            os.close(fd)

    def append(p: bytes) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, b"<appended>")
        finally:
            os.close(fd)

    def replace(p: bytes) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        try:
            os.write(fd, b"replaced\n")
        finally:
            os.close(fd)

    def create(p: bytes, data: bytes = b"new\n") -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    # a merged directory cannot be renamed without redirect_dir (nothing changes)
    do("rename-merged-dir", _MERGED_DIR, os.rename, at(_MERGED_DIR), at(b"ovl/renamed dir"))

    # data changes to lower (or upper) files
    w = pick(single_reg, 4)
    for fn, p in zip((overwrite, append, replace), w, strict=False):
        do(fn.__name__, p, fn, at(p))
    for p in w[3:]:
        do("truncate-grow", p, os.truncate, at(p), view[p].size + 300_000)  # type: ignore[operator]

    # metadata
    for p, mode in zip(pick(single_reg, 2), (0o640, 0o4711), strict=False):
        do("chmod", p, os.chmod, at(p), mode)
    for p in pick(lambda p, e: e.kind == "dir", 1):
        do("chmod-dir", p, os.chmod, at(p), 0o711)
    for p in pick(lambda p, e: single_reg(p, e) or e.kind == "lnk", 2):
        do("lchown", p, os.lchown, at(p), 4321, 4321)
    for p in pick(lambda p, e: single_reg(p, e) or e.kind == "dir", 2):
        do("setxattr", p, os.setxattr, at(p), b"user.added", b"by the test")
    for p in pick(lambda p, e: (single_reg(p, e) or e.kind == "dir") and "user.test" in dict(e.xattrs), 1):
        do("removexattr", p, os.removexattr, at(p), b"user.test")

    # deletions, and a merged directory removed and made again (opaque)
    for p in pick(lambda p, e: e.kind in ("reg", "lnk", "fifo") and e.links == (p,), 3):
        do("unlink", p, os.unlink, at(p))
    _rmtree(at(_RMTREE), log, _RMTREE)
    do("mkdir", _RMTREE, os.mkdir, at(_RMTREE), 0o750)
    do("create", _RMTREE + b"/fresh", create, at(_RMTREE + b"/fresh"))
    do("rmdir-nonempty", b"ovl", os.rmdir, at(b"ovl"))

    # renames: within a dir, across dirs, over an existing file
    r = pick(single_reg, 4)
    if len(r) == 4:
        do("rename", r[0], os.rename, at(r[0]), at(r[0] + b".moved"))
        do("rename-across", r[1], os.rename, at(r[1]), at(b"ovl/moved-here"))
        do("rename-replace", r[2], os.rename, at(r[2]), at(r[3]))

    # creates, in the root and in a (lower) directory that must be copied up first
    do("create", b"new-file", create, at(b"new-file"), b"new file\n" * 100)
    do("mkdir", b"new-dir", os.mkdir, at(b"new-dir"), 0o755)
    do("create", b"new-dir/inner", create, at(b"new-dir/inner"))
    do("rename-upper-dir", b"new-dir", os.rename, at(b"new-dir"), at(b"new-dir-renamed"))
    do("symlink", b"new-link", os.symlink, b"new-file", at(b"new-link"))
    do("mkfifo", b"new-fifo", os.mkfifo, at(b"new-fifo"), 0o600)
    do("link", b"new-file", os.link, at(b"new-file"), at(b"new-file-link"))
    do("mknod-whiteout", b"new-wh", os.mknod, at(b"new-wh"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for p in pick(single_reg, 1):
        do("link-lower", p, os.link, at(p), at(b"linked-from-lower"))
    for p in pick(lambda p, e: e.kind == "dir", 2):
        do("create-in", p, create, at(p + b"/created-here"))
    _mutate_more(rng, view, pick, do, at, userxattr)
    return log


def _renameat2(src: bytes, dst: bytes, flags: int) -> None:
    """renameat2(2) (Python has no wrapper): RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, src, -100, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mutate_more(rng: random.Random, view: Snapshot, pick: Callable[..., list[bytes]],
                 do: Callable[..., None], at: Callable[[bytes], bytes], userxattr: bool) -> None:
    """Rarer operations: escaped overlay xattrs, devices, renameat2 flags, times, non-regular files.

    With ``userxattr`` no lower symlink is hard-linked: the kernel cannot put
    its user.overlay.origin on a symlink and then shows the two names of the
    copied-up symlink with different st_ino (pyunionfs shows one; the kernel
    is the odd one out there, so that case is not compared).
    """

    def single_reg(p: bytes, e: Entry) -> bool:
        return e.kind == "reg" and e.links == (p,)

    def nonempty(p: bytes) -> bool:
        return any(q.startswith(p + b"/") for q in view)

    for p in pick(single_reg, 1):
        do("setxattr-overlay-escaped", p, os.setxattr, at(p), b"trusted.overlay.test", b"escaped")
    for p in pick(lambda p, e: e.kind == "lnk" and e.links == (p,), 1):
        do("setxattr-symlink", p, os.setxattr, at(p), b"trusted.t", b"on a symlink", 0, follow_symlinks=False)
    do("mknod-chr", b"new-null", os.mknod, at(b"new-null"), stat.S_IFCHR | 0o640, os.makedev(1, 3))
    x = pick(single_reg, 3)
    if len(x) == 3:
        do("rename-exchange", x[0], _renameat2, at(x[0]), at(x[1]), 2)
        do("rename-noreplace", x[2], _renameat2, at(x[2]), at(x[0]), 1)
    do("rename-exchange-file-dir", b"new-file", _renameat2, at(b"new-file"), at(b"new-dir-renamed"), 2)
    timed = pick(single_reg, 1) + pick(lambda p, e: e.kind == "dir", 1)
    for p in timed:
        do("utime", p, os.utime, at(p), ns=(1_234_567_890_123, 1_234_567_891_456))
    for p in pick(lambda p, e: single_reg(p, e) and (e.size or 0) > 10, 1):
        do("truncate-shrink", p, os.truncate, at(p), 7)
    for p in pick(lambda p, e: e.kind in ("lnk", "fifo") and e.links == (p,), 2):
        do("rename-special", p, os.rename, at(p), at(p + b"-moved"))
    for p in pick(lambda p, e: e.kind == "lnk" and e.links == (p,), 0 if userxattr else 1):
        do("link-symlink", p, os.link, at(p), at(b"symlink-hardlink"), follow_symlinks=False)
    for p in pick(lambda p, e: e.kind == "reg" and e.links is not None and len(e.links) > 1, 1):
        do("unlink-alias", p, os.unlink, at(p))
    for p in pick(lambda p, e: e.kind == "dir" and not nonempty(p), 1):
        do("rmdir-empty", p, os.rmdir, at(p))
    for p in pick(lambda p, e: e.kind == "dir", 1):
        do("chmod-dir-setgid", p, os.chmod, at(p), 0o2775)
        do("chown-dir", p, os.chown, at(p), 1234, 4321)
    do("mkdir-in-opaque", _RMTREE + b"/sub", os.mkdir, at(_RMTREE + b"/sub"))
    # after the exchange above, new-file is the upper-only directory
    do("rename-upper-dir-into-merged", b"new-file", os.rename, at(b"new-file"), at(b"ovl/moved-dir"))
    do("rename-file-over-dir", b"new-file-link", os.rename, at(b"new-file-link"), at(b"ovl"))
    do("rename-dir-over-file", _RMTREE, os.rename, at(_RMTREE), at(b"new-fifo"))
    for p in timed:  # (snapshots leave times out; these were set explicitly, so they must match)
        st = os.lstat(at(p))
        do(f"times {st.st_atime_ns} {st.st_mtime_ns}", p, os.lstat, at(p))


def _changed_files(log: Log) -> list[bytes]:
    """Paths of regular files that the changes copied up in place (same name before and after)."""
    kinds = {"overwrite", "append", "replace", "truncate-grow", "chmod", "setxattr", "removexattr"}
    return [os.fsencode(p) for op, p, res in log if op in kinds and res == "ok"]


def _fresh(stack: Stack, work: Path) -> Stack:
    """The same layers with another (empty) kernel workdir."""
    work.mkdir()
    return Stack(lowers=stack.lowers, upper=stack.upper, work=work, xattr_ns=stack.xattr_ns)


VARIANTS = [(0, "trusted"), (1, "trusted"), (3, "trusted"), (2, "user"), (4, "user")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("seed", "ns"), VARIANTS, ids=[f"seed{s}-{ns}" for s, ns in VARIANTS])
def test_uppers_are_interchangeable_with_the_kernel(tmp_path: Path, mount: Mount, seed: int, ns: str) -> None:
    """Same changes through the kernel and pyunionfs agree; then each one's upper mounts on the other."""
    kstack = build_stack(tmp_path / "k", seed, xattr_ns=ns)
    pstack = build_stack(tmp_path / "p", seed, xattr_ns=ns)
    opts = ["userxattr"] if ns == "user" else []
    kmnt, pmnt = tmp_path / "kmnt", tmp_path / "pmnt"
    kmnt.mkdir()
    pmnt.mkdir()

    with kernel_mounted(kstack, kmnt, opts):
        klog = mutate(kmnt, seed, ns == "user")
        klive = snapshot(kmnt)
    # The kernel shows what the spec says (else the scenario, not pyunionfs, is wrong).
    outcomes = {op: res for op, _, res in klog}
    assert outcomes["rename-merged-dir"] == "EXDEV" and outcomes["mknod-whiteout"] == "EPERM"
    assert outcomes["rmdir-nonempty"] == "ENOTEMPTY" and outcomes["rename-upper-dir"] == "ok"

    failures: list[str] = []  # every comparison runs, so one report shows all that differs
    d = mount(list(pstack.lowers), pstack.upper, *opts, mnt=pmnt)
    plog = mutate(pmnt, seed, ns == "user")
    plive = snapshot(pmnt)
    d.stop()
    if plog != klog:
        failures.append("outcomes of the same operations, kernel vs pyunionfs:\n" + "\n".join(
            f"  {k} vs {p}" for k, p in zip(klog, plog, strict=False) if k != p))
    if problems := diff(klive, plive):
        failures.append("live views after the same changes, kernel (A) vs pyunionfs (B):\n" + "\n".join(problems))

    # (a) pyunionfs wrote the upper, the kernel reads it
    with kernel_mounted(_fresh(pstack, tmp_path / "kwork2"), kmnt, opts):
        k_on_p = snapshot(kmnt)
    if problems := diff(plive, k_on_p):
        failures.append("pyunionfs live (A) vs kernel over pyunionfs's upper (B):\n" + "\n".join(problems))

    # (b) the kernel wrote the upper, pyunionfs reads it
    d = mount(list(kstack.lowers), kstack.upper, *opts, mnt=pmnt)
    p_on_k = snapshot(pmnt)
    d.stop()
    if problems := diff(klive, p_on_k):
        failures.append("kernel live (A) vs pyunionfs over the kernel's upper (B):\n" + "\n".join(problems))
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------
# ORIGIN INODE CHECK -- tune here.
# pyunionfs writes trusted.overlay.origin in the kernel's format, so the kernel
# shows a copied-up file with the lower file's inode number, as pyunionfs does.
# ORIGIN_PYUNIONFS_TO_KERNEL: the kernel reads pyunionfs's origin (the spec).
# ORIGIN_KERNEL_TO_PYUNIONFS: pyunionfs reads the kernel's origin (st_ino
# stable across a remount of a kernel-written upper; stricter than the spec).
# --------------------------------------------------------------------------
ORIGIN_PYUNIONFS_TO_KERNEL = True
ORIGIN_KERNEL_TO_PYUNIONFS = True


def _inos(m: Path, paths: list[bytes]) -> dict[bytes, int]:
    return {p: os.lstat(os.fsencode(m) + b"/" + p).st_ino for p in paths}


@pytest.mark.timeout(60)
def test_origin_keeps_inode_numbers_across_kernel_and_pyunionfs(tmp_path: Path, mount: Mount) -> None:
    """A copied-up file has the lower file's st_ino on both implementations, whichever wrote the upper."""
    seed = 0
    kstack = build_stack(tmp_path / "k", seed)
    pstack = build_stack(tmp_path / "p", seed)
    kmnt, pmnt = tmp_path / "kmnt", tmp_path / "pmnt"
    kmnt.mkdir()
    pmnt.mkdir()

    with kernel_mounted(kstack, kmnt):
        kbefore = snapshot(kmnt)
        every = {p: os.lstat(os.fsencode(kmnt) + b"/" + p).st_ino for p in kbefore if p != b"."}
        klog = mutate(kmnt, seed)
        files = [p for p in _changed_files(klog) if p in kbefore]
        k_live = _inos(kmnt, files)
    assert files, "the changes copied nothing up"
    # the kernel keeps the number on copy-up (all layers on one filesystem: the lower's real number)
    assert k_live == {p: every[p] for p in files}, "kernel: st_ino changed on copy-up"
    d = mount(list(pstack.lowers), pstack.upper, mnt=pmnt)
    p_before = _inos(pmnt, files)
    mutate(pmnt, seed)
    p_live = _inos(pmnt, files)
    d.stop()
    assert p_live == p_before, "st_ino changed on copy-up in pyunionfs"

    if ORIGIN_PYUNIONFS_TO_KERNEL:
        with kernel_mounted(_fresh(pstack, tmp_path / "kwork2"), kmnt):
            k_on_p = _inos(kmnt, files)
        wrong = {fmt_path(p): (p_live[p], k_on_p[p]) for p in files if p_live[p] != k_on_p[p]}
        assert not wrong, f"(pyunionfs st_ino, kernel st_ino) over pyunionfs's upper: {wrong}"
    if ORIGIN_KERNEL_TO_PYUNIONFS:
        d = mount(list(kstack.lowers), kstack.upper, mnt=pmnt)
        p_on_k = _inos(pmnt, files)
        d.stop()
        wrong = {fmt_path(p): (k_live[p], p_on_k[p]) for p in files if k_live[p] != p_on_k[p]}
        assert not wrong, f"(kernel st_ino, pyunionfs st_ino) over the kernel's upper: {wrong}"


# --------------------------------------------------------------------------
# The upper layout, entry by entry
# --------------------------------------------------------------------------


def _layout_layers(base: Path) -> tuple[list[Path], Path]:
    top, low, up = base / "top", base / "low", base / "up"
    put(low / "lower-file", "l")
    put(low / "dir/a", "a")
    put(low / "dir/sub/b", "b")
    put(top / "dir/c", "c")
    put(top / "merged/x", "x")
    put(low / "merged/y", "y")
    put(low / "hidden", "hidden below a whiteout")
    whiteout(top / "hidden")
    put(low / "deep/er/file", "f")
    up.mkdir()
    return [top, low], up


def _layout_changes(m: Path) -> dict[str, str]:
    out = {}
    out["unlink lower"] = errname(errno_of(os.unlink, m / "lower-file"))
    put(m / "upper-only", "u")
    out["unlink upper-only"] = errname(errno_of(os.unlink, m / "upper-only"))
    os.mkdir(m / "upper-dir")
    out["rmdir upper-only"] = errname(errno_of(os.rmdir, m / "upper-dir"))
    for p in ("dir/sub/b", "dir/a", "dir/c"):
        out[f"unlink {p}"] = errname(errno_of(os.unlink, m / p))
    out["rmdir dir/sub"] = errname(errno_of(os.rmdir, m / "dir/sub"))
    out["rmdir dir"] = errname(errno_of(os.rmdir, m / "dir"))
    out["mkdir over whiteout"] = errname(errno_of(os.mkdir, m / "dir"))
    out["listdir new dir"] = ",".join(sorted(os.listdir(m / "dir")))
    out["mkdir over old whiteout"] = errname(errno_of(os.mkdir, m / "hidden"))
    out["listdir hidden"] = ",".join(sorted(os.listdir(m / "hidden")))
    out["rename merged"] = errname(errno_of(os.rename, m / "merged", m / "merged2"))
    out["rename lower-only dir"] = errname(errno_of(os.rename, m / "deep", m / "deep2"))
    os.mkdir(m / "fresh")
    put(m / "fresh/f", "f")
    out["rename upper-only dir"] = errname(errno_of(os.rename, m / "fresh", m / "fresh2"))
    out["mknod 0/0"] = errname(errno_of(os.mknod, m / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0)))
    out["mknod 0/0 over lower"] = errname(
        errno_of(os.mknod, m / "merged/y", stat.S_IFCHR | 0o600, os.makedev(0, 0)))
    out["create deep"] = errname(errno_of(put, m / "deep/er/new", "n"))
    return out


def test_upper_layout_whiteouts_and_opaque_dirs_like_the_kernel(tmp_path: Path, mount: Mount) -> None:
    """Whiteouts only for names a lower has, opaque=y for a dir made over a whiteout, EPERM/EXDEV like the kernel."""
    results = {}
    for side in ("kernel", "pyunionfs"):
        lowers, up = _layout_layers(tmp_path / side)
        if side == "kernel":
            with kernel_overlay(lowers, up, tmp_path / side / "work", tmp_path / side / "mnt") as m:
                outcome = _layout_changes(m)
                view = snapshot(m)
        else:
            d = mount(lowers, up)
            outcome = _layout_changes(d.mnt)
            view = snapshot(d.mnt)
            d.stop()
        results[side] = (outcome, upper_layout(up), view)
    k_out, k_layout, k_view = results["kernel"]
    # the spec, as the kernel shows it
    assert k_out["mknod 0/0"] == "EPERM" and k_out["rename merged"] == "EXDEV"
    assert k_out["rename lower-only dir"] == "EXDEV" and k_out["rename upper-only dir"] == "ok"
    assert k_layout["lower-file"] == ("whiteout",) and "upper-only" not in k_layout and "upper-dir" not in k_layout
    assert k_layout["dir"] == ("dir", b"y")
    # Over a whiteout that lives in a *lower* layer the kernel makes a plain dir
    # (nothing below is visible to hide); opaque there would be harmless too.
    assert k_layout.pop("hidden") == ("dir", None)
    p_out, p_layout, p_view = results["pyunionfs"]
    assert p_layout.pop("hidden", None) in (("dir", None), ("dir", b"y"))
    assert p_out == k_out, "\n".join(f"{k}: kernel {k_out[k]}, pyunionfs {p_out.get(k)}" for k in k_out
                                     if k_out[k] != p_out.get(k))
    assert p_layout == k_layout, "upper layout, kernel vs pyunionfs:\n" + "\n".join(
        f"  {k}: {k_layout.get(k)} vs {p_layout.get(k)}" for k in sorted(set(k_layout) | set(p_layout))
        if k_layout.get(k) != p_layout.get(k))
    problems = diff(k_view, p_view)
    assert not problems, "kernel (A) vs pyunionfs (B):\n" + "\n".join(problems)
