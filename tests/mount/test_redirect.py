"""Directories the kernel renamed with ``redirect_dir=on``: pyunionfs shows them as the kernel does.

Why: the kernel here follows ``overlay.redirect`` records by default (its
``redirect_always_follow``), so an upper written by a kernel mount with
``redirect_dir=on`` -- or such an upper rotated into the lowers -- must show
the same tree through pyunionfs as through the kernel, where renaming a
directory with lower parts left it.  pyunionfs itself still creates no
redirects (renaming such a directory is EXDEV).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path

import pytest

from tests.support.mounting import Daemon
from tests.support.treesnap import Snapshot, diff, snapshot
from tests.support.writecheck import kernel_overlay, put, upper_layout


def _lowers(root: Path) -> tuple[Path, Path]:
    """Two lowers with directories to move: plain, merged over both, nested, holding a link."""
    top, bottom = root / "l1", root / "l2"
    for d in (top, bottom):
        d.mkdir()
    put(bottom / "a" / "old" / "f", b"a/old/f from l2")
    put(bottom / "a" / "old" / "gone", b"deleted after the move")
    put(bottom / "b" / "deep" / "x" / "y", b"deep y")
    put(bottom / "m" / "low", b"m/low from l2")
    put(top / "m" / "high", b"m/high from l1")
    put(top / "m" / "sub" / "s", b"m/sub/s from l1")
    put(bottom / "n" / "inner" / "i", b"nested")
    put(bottom / "plain" / "p", b"never moved")
    os.link(bottom / "plain" / "p", bottom / "a" / "old" / "hard")
    (bottom / "empty").mkdir()
    put(bottom / "opq" / "o", b"hidden by the opaque copy")
    for i in range(20):
        put(bottom / "many" / f"d{i}" / "f", f"many {i}".encode())
    put(top / "many" / "d5" / "top", b"d5 also in l1")
    (root / "c").mkdir(exist_ok=True)
    put(top / "c" / ".keep", b"")
    return top, bottom


def _kernel_moves(m: Path) -> None:
    """The renames only ``redirect_dir=on`` allows (each directory has lower parts)."""
    os.rename(m / "a" / "old", m / "a" / "new")  # relative: stays in its parent
    os.rename(m / "b" / "deep", m / "c" / "moved")  # absolute: another parent
    os.rename(m / "m", m / "m2")  # merged over both lowers
    os.rename(m / "n" / "inner", m / "n" / "inner2")  # moved, then its parent moved too
    os.rename(m / "n", m / "n2")
    os.mkdir(m / "fresh")
    os.rename(m / "a" / "new", m / "fresh" / "twice")  # an already moved directory again
    os.unlink(m / "fresh" / "twice" / "gone")
    (m / "fresh" / "twice" / "added").write_bytes(b"made after the moves")
    os.rename(m / "m2" / "sub", m / "c" / "sub-of-m")


def _moved_by_the_kernel(root: Path) -> tuple[Path, Path, Path, Snapshot]:
    """The lowers, and an upper where the kernel (redirect_dir=on) made :func:`_kernel_moves`; with its live tree."""
    top, bottom = _lowers(root)
    upper = root / "upper"
    upper.mkdir()
    with kernel_overlay([top, bottom], upper, root / "work", root / "k0", ["redirect_dir=on"]) as k:
        _kernel_moves(k)
        live = snapshot(k)
    return top, bottom, upper, live


@pytest.mark.timeout(120)
def test_a_kernel_upper_with_redirects_shows_the_kernels_tree(tmp_path: Path) -> None:
    top, bottom, upper, live = _moved_by_the_kernel(tmp_path)
    assert b"fresh/twice/f" in live and b"a/new" not in live and b"b/deep" not in live  # the script did move
    # The upper as the kernel left it: redirect records where directories moved.
    assert os.getxattr(upper / "fresh" / "twice", "trusted.overlay.redirect") == b"/a/old"
    assert os.getxattr(upper / "m2", "trusted.overlay.redirect") == b"m"
    ours = tmp_path / "ours"
    ours.mkdir()
    with Daemon([top, bottom], upper, ours, [f"workdir={tmp_path / 'work2'}"]):
        seen = snapshot(ours)
        assert diff(live, seen) == []
        assert (ours / "fresh" / "twice" / "hard").read_bytes() == b"never moved"
        assert (ours / "n2" / "inner2" / "i").read_bytes() == b"nested"
        assert sorted(os.listdir(ours / "m2")) == ["high", "low"]
        with pytest.raises(FileNotFoundError):
            os.stat(ours / "a" / "old")
        # Writing below a moved directory copies up from where its data really is.
        with open(ours / "c" / "moved" / "x" / "y", "ab") as f:
            f.write(b" + appended")
        (ours / "m2" / "new-file").write_bytes(b"new")
    assert (upper / "c" / "moved" / "x" / "y").read_bytes() == b"deep y + appended"
    assert (bottom / "b" / "deep" / "x" / "y").read_bytes() == b"deep y"  # the lower is never written
    with kernel_overlay([top, bottom], upper, tmp_path / "work3", tmp_path / "k1") as k:
        again = snapshot(k)
    assert again[b"c/moved/x/y"] != live[b"c/moved/x/y"]
    ours2 = tmp_path / "ours2"
    ours2.mkdir()
    with Daemon([top, bottom], upper, ours2, [f"workdir={tmp_path / 'work2'}"]):
        assert diff(again, snapshot(ours2)) == []


@pytest.mark.timeout(120)
def test_redirects_in_a_lower_layer_are_followed_as_the_kernel_does(tmp_path: Path) -> None:
    """The kernel's upper rotated into the lowers (as a container image's layers are)."""
    top, bottom, upper, _ = _moved_by_the_kernel(tmp_path)
    with kernel_overlay([upper, top, bottom], None, None, tmp_path / "k1") as k:
        kernel_view = snapshot(k)
    assert b"c/moved/x/y" in kernel_view and b"m2/low" in kernel_view
    ours = tmp_path / "ours"
    ours.mkdir()
    with Daemon([upper, top, bottom], None, ours):
        assert diff(kernel_view, snapshot(ours)) == []


def _redirects(upper: Path) -> dict[str, bytes]:
    """Every ``overlay.redirect`` record of an upper, by path."""
    out = {}
    for dirpath, dirs, _ in os.walk(upper):
        for name in dirs:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):  # no record
                out[os.path.relpath(p, upper)] = os.getxattr(p, "trusted.overlay.redirect", follow_symlinks=False)
    return out


def _more_moves(m: Path) -> list[tuple[str, str]]:
    """Renames the kernel answers differently with and without redirects, and what is done to the
    moved directories afterwards, with their outcomes."""
    log = []

    def step(what: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
            log.append((what, "ok"))
        except OSError as exc:
            log.append((what, os.strerror(exc.errno)))

    for a, b in (("plain", "c/plain"), ("c/plain", "plain2"), ("m2/high", "m2/high2"),
                 ("fresh/twice", "fresh/thrice"), ("c/moved", "m2/inside-merged"), ("n2", "plain2/n3"),
                 ("empty", "c/empty-moved"), ("c/sub-of-m", "m"), ("m", "m-back")):
        step(f"mv {a} {b}", os.rename, m / a, m / b)
    # Into and out of an opaque directory (a merged one removed and made again).
    step("rm -r opq", shutil.rmtree, m / "opq")
    step("mkdir opq", os.mkdir, m / "opq")
    step("mv into opaque", os.rename, m / "many" / "d0", m / "opq" / "d0")
    step("mv out of opaque", os.rename, m / "opq" / "d0", m / "d0-out")
    # Many at once, then one of them removed and its name made again.
    for i in range(1, 20):
        step(f"mv many/d{i}", os.rename, m / "many" / f"d{i}", m / "c" / f"d{i}")
    step("rm -r c/d3", shutil.rmtree, m / "c" / "d3")
    step("mkdir c/d3", os.mkdir, m / "c" / "d3")
    step("mv c/d4 over empty c/d3", os.rename, m / "c" / "d4", m / "c" / "d3")
    step("exchange", _exchange, m / "c" / "d5", m / "c" / "d6")
    return log


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:  # RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@pytest.mark.timeout(120)
def test_renaming_directories_with_lower_parts_as_the_kernel_with_redirect_dir_on(tmp_path: Path) -> None:
    """The same renames through the kernel (redirect_dir=on) and through pyunionfs (-o redirect_dir=on):
    the same trees live, the same records and whiteouts on disk, and each reads the other's upper."""
    uppers = {}
    views = {}
    logs = {}
    for side in ("kernel", "ours"):
        root = tmp_path / side
        root.mkdir()
        top, bottom = _lowers(root)
        upper = root / "upper"
        upper.mkdir()
        mnt = root / "mnt"
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay([top, bottom], upper, root / "work", mnt, ["redirect_dir=on"]):
                _kernel_moves(mnt)
                logs[side] = _more_moves(mnt)
                views[side] = snapshot(mnt)
        else:
            with Daemon([top, bottom], upper, mnt, [f"workdir={root / 'work'}", "redirect_dir=on"]):
                _kernel_moves(mnt)
                logs[side] = _more_moves(mnt)
                views[side] = snapshot(mnt)
                # What moved is still found below its new name, and the old names are gone.
                assert (mnt / "fresh" / "thrice" / "f").read_bytes() == b"a/old/f from l2"
                assert not (mnt / "a" / "old").exists() and not (mnt / "b" / "deep").exists()
        uppers[side] = upper
    assert logs["ours"] == logs["kernel"]
    assert all(outcome == "ok" for _, outcome in logs["ours"])
    assert diff(views["kernel"], views["ours"]) == []
    assert _redirects(uppers["ours"]) == _redirects(uppers["kernel"])
    assert upper_layout(uppers["ours"]) == upper_layout(uppers["kernel"])
    # Swapped: each mounts the other's upper and shows the same tree.
    for side, other in (("kernel", "ours"), ("ours", "kernel")):
        root = tmp_path / other
        mnt = tmp_path / f"swap-{side}"
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay([root / "l1", root / "l2"], uppers[other], tmp_path / "kwork", mnt):
                assert diff(views[other], snapshot(mnt)) == []
        else:
            with Daemon([root / "l1", root / "l2"], uppers[other], mnt, [f"workdir={tmp_path / 'owork'}"]):
                assert diff(views[other], snapshot(mnt)) == []
    # Rotated: our upper as the top lower layer, read by both.
    root = tmp_path / "ours"
    stack = [uppers["ours"], root / "l1", root / "l2"]
    with kernel_overlay(stack, None, None, tmp_path / "rot-k") as k:
        assert diff(views["ours"], snapshot(k)) == []
    (tmp_path / "rot-o").mkdir()
    with Daemon(stack, None, tmp_path / "rot-o"):
        assert diff(views["ours"], snapshot(tmp_path / "rot-o")) == []


@pytest.mark.timeout(120)
def test_without_redirect_dir_on_such_a_rename_is_exdev_and_nofollow_refuses_records(tmp_path: Path) -> None:
    top, bottom = _lowers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    with kernel_overlay([top, bottom], upper, tmp_path / "work", tmp_path / "k", ["redirect_dir=on"]) as k:
        os.rename(k / "a" / "old", k / "a" / "new")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Daemon([top, bottom], upper, mnt, [f"workdir={tmp_path / 'w2'}"]):
        with pytest.raises(OSError) as err:
            os.rename(mnt / "m", mnt / "m2")
        assert err.value.errno == errno.EXDEV  # mv copies
        assert (mnt / "a" / "new" / "f").read_bytes() == b"a/old/f from l2"  # followed by default
    kernel = kernel_overlay([top, bottom], upper, tmp_path / "w3", tmp_path / "k2", ["redirect_dir=nofollow"])
    with kernel as k, pytest.raises(OSError) as kerr:
        os.stat(k / "a" / "new")
    with Daemon([top, bottom], upper, mnt, [f"workdir={tmp_path / 'w2'}", "redirect_dir=nofollow"]), \
            pytest.raises(OSError) as ours:
        os.stat(mnt / "a" / "new")
    assert ours.value.errno == kerr.value.errno == errno.EPERM


@pytest.mark.timeout(120)
def test_open_files_and_a_working_directory_inside_a_moved_directory_keep_working(tmp_path: Path) -> None:
    """Identity, not paths: fds and a cwd opened before the move reach the same objects after it."""
    top, bottom = _lowers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    here = os.getcwd()
    with Daemon([top, bottom], upper, mnt, [f"workdir={tmp_path / 'work'}", "redirect_dir=on"]):
        reader = os.open(mnt / "b" / "deep" / "x" / "y", os.O_RDONLY)
        writer = os.open(mnt / "a" / "old" / "f", os.O_WRONLY | os.O_APPEND)
        os.chdir(mnt / "m")
        try:
            os.rename(mnt / "b" / "deep", mnt / "c" / "deep-moved")
            os.rename(mnt / "a", mnt / "c" / "a-moved")  # the parent of a file open for writing
            os.rename(mnt / "m", mnt / "m-moved")
            assert os.pread(reader, 100, 0) == b"deep y"
            os.write(writer, b" + after the move")
            assert sorted(os.listdir(".")) == ["high", "low", "sub"]
            with open("made-in-cwd", "wb") as f:
                f.write(b"cwd")
        finally:
            os.chdir(here)
            os.close(reader)
            os.close(writer)
        assert (mnt / "c" / "a-moved" / "old" / "f").read_bytes() == b"a/old/f from l2 + after the move"
        assert (mnt / "m-moved" / "made-in-cwd").read_bytes() == b"cwd"
        assert not (mnt / "a").exists() and not (mnt / "m").exists()
    assert (upper / "c" / "a-moved" / "old" / "f").read_bytes() == b"a/old/f from l2 + after the move"
    assert os.getxattr(upper / "c" / "a-moved", "trusted.overlay.redirect") == b"/a"
    assert (bottom / "a" / "old" / "f").read_bytes() == b"a/old/f from l2"


def _move_out_of_a_moved_directory(root: Path, mount) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Two mounts, the upper rotated between them: a/d moves to e/d, then e/d/pop out to e/pop
    (its record, /a/d... or /e/d/pop, names a path that only the moved parent's record leads to)."""
    low = root / "l"
    put(low / "a" / "d" / "pop" / "b", b"b in pop")
    put(low / "a" / "d" / "x", b"x in d")
    u1, u2 = root / "u1", root / "u2"
    u1.mkdir()
    u2.mkdir()
    with mount([low], u1, root / "w1", root / "m1") as m:
        os.mkdir(m / "e")
        os.rename(m / "a" / "d", m / "e" / "d")
    with mount([u1, low], u2, root / "w2", root / "m2") as m:
        os.rename(m / "e" / "d" / "pop", m / "e" / "pop")
        first = (m / "e" / "pop" / "b").read_bytes()
    with mount([u2, u1, low], None, None, root / "m3") as m:
        return {"first": first, "rotated": (m / "e" / "pop" / "b").read_bytes(),
                "d": b" ".join(sorted(os.fsencode(n) for n in os.listdir(m / "e" / "d"))),
                "records": _redirects(u2).get("e/pop", b"")}


@pytest.mark.timeout(120)
def test_a_directory_moved_out_of_a_moved_directory_is_found_through_both_records(tmp_path: Path) -> None:
    """Found by the kernel's unionmount-testsuite (rename-move-dir, rotated layers): an absolute
    redirect is looked up component by component, and a directory on the way that carries a
    record of its own replaces the path's prefix, as ovl_lookup_layer does."""

    @contextlib.contextmanager
    def ours(lowers, upper, work, mnt):  # type: ignore[no-untyped-def]
        mnt.mkdir()
        opts = [f"workdir={work}", "redirect_dir=on"] if upper is not None else []
        with Daemon(lowers, upper, mnt, opts):
            yield mnt

    def kernel(lowers, upper, work, mnt):  # type: ignore[no-untyped-def]
        return kernel_overlay(lowers, upper, work, mnt, ["redirect_dir=on"] if upper is not None else [])

    seen = {side: _move_out_of_a_moved_directory(tmp_path / side, how)
            for side, how in (("kernel", kernel), ("ours", ours))}
    assert seen["ours"] == seen["kernel"]
    assert seen["ours"]["first"] == seen["ours"]["rotated"] == b"b in pop"
    assert seen["ours"]["d"] == b"x"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("who", ["kernel", "ours"])
def test_commit_of_moved_directories_gives_the_merged_tree(tmp_path: Path, who: str) -> None:
    """A layer cannot say "moved": a directory renamed with redirect_dir=on goes into it opaque
    with its whole merged subtree (read through the lowers given), its old name whited out.
    Flattened over the lowers (each committed as a layer), the layer gives the tree the mount
    showed; without --lowers the commit is refused in one line."""
    import subprocess
    import sys

    if who == "kernel":
        top, bottom, upper, live = _moved_by_the_kernel(tmp_path)
    else:
        top, bottom = _lowers(tmp_path)
        upper, mnt = tmp_path / "upper", tmp_path / "mnt"
        upper.mkdir()
        mnt.mkdir()
        with Daemon([top, bottom], upper, mnt, [f"workdir={tmp_path / 'work'}", "redirect_dir=on"]):
            _kernel_moves(mnt)
            live = snapshot(mnt)

    def pyunionfs(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "pyunionfs", *args], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        assert (res.returncode == 0) == ok, res.stderr
        return res

    refused = pyunionfs("commit", str(upper), "-o", str(tmp_path / "no.tar"), ok=False)
    assert refused.stderr.count("\n") == 1 and "--lowers" in refused.stderr
    pyunionfs("commit", str(upper), "-o", str(tmp_path / "step.tar"), "--lowers", f"{top}:{bottom}")
    flat = tmp_path / "flat"
    for layer, src in (("l2.tar", bottom), ("l1.tar", top)):
        pyunionfs("commit", str(src), "-o", str(tmp_path / layer))
        pyunionfs("apply", "--flatten", str(tmp_path / layer), str(flat))
    pyunionfs("apply", "--flatten", str(tmp_path / "step.tar"), str(flat))
    # Everything as the mount showed it -- but a lower hard link with a name inside a moved
    # directory and one outside: the layer holds the inside one as a file of its own (a layer
    # cannot link to a file of another layer).
    outside = (b"fresh/twice/hard", b"plain/p")
    shown, flattened = (t.subset(lambda p, _: p not in (b".", *outside)) for t in (live, snapshot(flat)))
    assert diff(shown, flattened, limit=None) == []
    assert all((flat / os.fsdecode(p)).read_bytes() == b"never moved" for p in outside)
