"""Metadata-only copy-up (``metacopy=on``), with the kernel's overlayfs as the oracle.

Why: ``chown -R`` or ``chmod -R`` over an image's /usr copied every byte of
every file; the kernel's ``metacopy=on`` copies only the metadata, with an
``overlay.metacopy`` record, and the data at the first write.  The kernel
here also refuses such copies (EPERM) where metacopy is off, and reads them
where it is on: an upper it wrote must show the same tree through us.  So
the same operations run on the kernel and on pyunionfs, and the trees, the
records on disk and each side's reading of the other's upper must agree.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.mounting import Daemon
from tests.support.treesnap import diff, snapshot
from tests.support.writecheck import kernel_overlay, put, upper_layout

META = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"
BIG = bytes(range(256)) * 1200  # 300 KiB: its data copy runs outside the core's lock


def _lowers(root: Path) -> tuple[Path, Path]:
    top, bottom = root / "l1", root / "l2"
    put(bottom / "f", b"hello")
    put(bottom / "g", b"world")
    put(bottom / "big", BIG)
    put(bottom / "d" / "x", b"x in d")
    put(bottom / "d" / "w", b"written later")
    put(bottom / "t", b"truncated later")
    put(bottom / "setuid", b"#!/bin/sh\n")
    os.chmod(bottom / "setuid", 0o4755)
    put(top / "e" / "keep", b"e is only in l1")
    put(top / "f2", b"f2 from l1")
    return top, bottom


def _ops(m: Path) -> list[tuple[str, str]]:
    """Metadata changes, renames and links of lower files, then writes to some of them."""
    log: list[tuple[str, str]] = []

    def step(what: str, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
            log.append((what, "ok"))
        except OSError as exc:
            log.append((what, os.strerror(exc.errno)))

    step("chown f", os.chown, m / "f", 1000, 1001)
    step("chmod g", os.chmod, m / "g", 0o600)
    step("utime big", os.utime, m / "big", (1_000_000_000, 1_500_000_000))
    step("setxattr d/x", os.setxattr, m / "d" / "x", "user.note", b"meta")
    step("mv d/x d/y", os.rename, m / "d" / "x", m / "d" / "y")  # same directory: a relative redirect
    step("mv big e/big", os.rename, m / "big", m / "e" / "big")  # another directory: an absolute one
    step("ln g g2", os.link, m / "g", m / "g2")
    step("mv f2 d/f2", os.rename, m / "f2", m / "d" / "f2")  # copied up by the rename itself
    step("chown setuid", os.chown, m / "setuid", 0, 0)  # chown clears set-user-ID
    step("chmod d/w", os.chmod, m / "d" / "w", 0o640)
    step("append d/w", _append, m / "d" / "w", b" + more")  # the data follows at the first write
    step("chmod t", os.chmod, m / "t", 0o600)
    step("truncate t", os.truncate, m / "t", 4)
    return log


def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as f:
        f.write(data)


def _records(upper: Path) -> dict[str, tuple[bytes | None, bytes | None, bool]]:
    """Per regular file of an upper: (metacopy record, redirect record, whether it holds no data)."""
    out = {}
    for dirpath, _, files in os.walk(upper):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            got = []
            for key in (META, REDIRECT):
                try:
                    got.append(os.getxattr(p, key, follow_symlinks=False))
                except OSError:
                    got.append(None)
            out[os.path.relpath(p, upper)] = (got[0], got[1], st.st_blocks * 512 <= st.st_blksize)
    return out


def _impure(upper: Path) -> list[str]:
    """The directories of an upper that carry the overlay's impure record."""
    return sorted(os.path.relpath(d, upper) for d, _, _ in os.walk(upper)
                  if "trusted.overlay.impure" in os.listxattr(d))


def _blocks(m: Path) -> dict[str, int]:
    return {str(p.relative_to(m)): os.lstat(p).st_blocks for p in sorted(m.rglob("*")) if p.is_file()}


@pytest.mark.timeout(120)
def test_metadata_changes_copy_up_only_metadata_as_the_kernel_with_metacopy_on(tmp_path: Path) -> None:
    uppers, views, logs, blocks = {}, {}, {}, {}
    for side in ("kernel", "ours"):
        root = tmp_path / side
        top, bottom = _lowers(root)
        upper, mnt = root / "upper", root / "mnt"
        upper.mkdir()
        mnt.mkdir()
        if side == "kernel":
            with kernel_overlay([top, bottom], upper, root / "work", mnt, ["metacopy=on"]):
                logs[side], views[side], blocks[side] = _ops(mnt), snapshot(mnt), _blocks(mnt)
        else:
            with Daemon([top, bottom], upper, mnt, [f"workdir={root / 'work'}", "metacopy=on"]):
                logs[side], views[side], blocks[side] = _ops(mnt), snapshot(mnt), _blocks(mnt)
                assert (mnt / "e" / "big").read_bytes() == BIG
                assert (mnt / "g2").read_bytes() == b"world"
        uppers[side] = upper
    assert logs["ours"] == logs["kernel"]
    assert all(outcome == "ok" for _, outcome in logs["ours"])
    assert diff(views["kernel"], views["ours"]) == []
    assert blocks["ours"] == blocks["kernel"]  # a metadata-only copy shows its data's blocks
    records = _records(uppers["ours"])
    assert records == _records(uppers["kernel"])
    # What the records say: no data copied for the metadata changes, redirects where names moved.
    assert records["f"] == (b"", None, True)
    assert records["e/big"] == (b"", b"/big", True)
    assert records["d/y"] == (b"", b"x", True)
    assert records["g"] == records["g2"] == (b"", b"/g", True)
    assert records["d/w"][0] is None and records["t"][0] is None  # written: data in, record gone
    assert upper_layout(uppers["ours"]) == upper_layout(uppers["kernel"])
    assert _impure(uppers["ours"]) == _impure(uppers["kernel"])  # where metadata-only copies may be
    assert (uppers["ours"] / "d" / "w").read_bytes() == b"written later + more"
    assert (tmp_path / "ours" / "l2" / "big").read_bytes() == BIG  # the lower is never written
    # Swapped: each side mounts the other's upper (metacopy=on) and shows the same tree.
    for side, other in (("kernel", "ours"), ("ours", "kernel")):
        root = tmp_path / other
        mnt = tmp_path / f"swap-{side}"
        layers = [root / "l1", root / "l2"]
        if side == "kernel":
            with kernel_overlay(layers, uppers[other], tmp_path / "kwork", mnt, ["metacopy=on"]):
                assert diff(views[other], snapshot(mnt)) == []
        else:
            mnt.mkdir()
            with Daemon(layers, uppers[other], mnt, [f"workdir={tmp_path / 'owork'}", "metacopy=on"]):
                assert diff(views[other], snapshot(mnt)) == []
                assert _blocks(mnt) == blocks[other]
    # Rotated: our upper as the top lower layer, read by both.
    root = tmp_path / "ours"
    stack = [uppers["ours"], root / "l1", root / "l2"]
    with kernel_overlay(stack, None, None, tmp_path / "rot-k", ["metacopy=on"]) as k:
        rotated = snapshot(k)
    assert diff(views["ours"], rotated) == []
    (tmp_path / "rot-o").mkdir()
    with Daemon(stack, None, tmp_path / "rot-o", ["metacopy=on"]):
        assert diff(rotated, snapshot(tmp_path / "rot-o")) == []


def _kernel_metacopy_upper(root: Path) -> tuple[Path, Path, Path]:
    top, bottom = _lowers(root)
    upper = root / "upper"
    upper.mkdir()
    with kernel_overlay([top, bottom], upper, root / "kwork", root / "k", ["metacopy=on"]) as k:
        os.chown(k / "f", 7, 7)
        os.rename(k / "d" / "x", k / "d" / "y")
    return top, bottom, upper


def _stat_errnos(mnt: Path, names: tuple[str, ...]) -> list[int]:
    """stat(2) of each name: 0, or the errno it failed with."""
    out = []
    for n in names:
        try:
            os.stat(mnt / n)
            out.append(0)
        except OSError as exc:
            out.append(exc.errno)
    return out


@pytest.mark.timeout(120)
def test_without_metacopy_a_metadata_only_copy_is_refused_and_one_without_data_is_eio(tmp_path: Path) -> None:
    top, bottom, upper = _kernel_metacopy_upper(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    seen = {}
    for side in ("kernel", "ours"):
        if side == "kernel":
            with kernel_overlay([top, bottom], upper, tmp_path / "w1", tmp_path / "k1") as k:
                seen[side] = _stat_errnos(k, ("f", "d/y", "g"))
        else:
            with Daemon([top, bottom], upper, mnt, [f"workdir={tmp_path / 'w2'}"]):
                seen[side] = _stat_errnos(mnt, ("f", "d/y", "g"))
    assert seen["ours"] == seen["kernel"] == [errno.EPERM, errno.EPERM, 0]  # "refusing to follow metacopy origin"
    # The upper alone, as a lower with nothing below: the data is nowhere.
    empty = tmp_path / "empty"
    empty.mkdir()
    with kernel_overlay([upper, empty], None, None, tmp_path / "k2", ["metacopy=on"]) as k:
        kernel = _stat_errnos(k, ("f", "d/y"))
    with Daemon([upper, empty], None, mnt, ["metacopy=on"]):
        ours = _stat_errnos(mnt, ("f", "d/y"))
    assert ours == kernel == [errno.EIO, errno.EIO]


@pytest.mark.timeout(120)
def test_open_files_of_a_metadata_only_copy_see_its_data_and_then_the_writes(tmp_path: Path) -> None:
    """Identity across the data copy-up: an fd opened before it reads what is written after it,
    on the kernel and on pyunionfs; and a kernel-made copy is written through us."""
    top, bottom, upper = _kernel_metacopy_upper(tmp_path)
    results = {}
    for side in ("kernel", "ours"):
        mnt = tmp_path / f"m-{side}"
        mnt.mkdir()
        up = tmp_path / f"up-{side}"
        # The same kernel-made upper for both sides (cp fills the small holes
        # with zeros: only the records say these files hold no data).
        subprocess.run(["cp", "-a", str(upper), str(up)], check=True, timeout=30)
        if side == "kernel":
            ctx = kernel_overlay([top, bottom], up, tmp_path / "kw", mnt, ["metacopy=on"])
        else:
            ctx = Daemon([top, bottom], up, mnt, [f"workdir={tmp_path / 'ow'}", "metacopy=on"])
        with ctx:
            reader = os.open(mnt / "f", os.O_RDONLY)
            try:
                before = os.pread(reader, 100, 0)
                with open(mnt / "f", "r+b") as w:
                    w.write(b"HE")
                after = os.pread(reader, 100, 0)
            finally:
                os.close(reader)
            st = os.stat(mnt / "f")
            results[side] = (before, after, st.st_uid, (mnt / "d" / "y").read_bytes())
        assert (up / "f").read_bytes() == b"HEllo"
        with pytest.raises(OSError):
            os.getxattr(up / "f", META)
    assert results["ours"] == results["kernel"] == (b"hello", b"HEllo", 7, b"x in d")
    assert (bottom / "f").read_bytes() == b"hello"


@pytest.mark.timeout(60)
def test_metacopy_on_with_another_redirect_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    out = subprocess.run([sys.executable, "-m", "pyunionfs", "mount", "-o", "metacopy=on,redirect_dir=follow",
                          str(tmp_path / "l"), str(tmp_path / "u"), str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "conflicting options: metacopy=on,redirect_dir=follow" in out.stderr


@pytest.mark.timeout(120)
def test_commit_of_a_metacopy_upper_reads_the_data_from_the_lowers(tmp_path: Path) -> None:
    """A layer holds what the container saw: a metadata-only copy's data comes from the lowers
    given (and without them the commit is refused in one line, naming what to pass)."""
    import tarfile

    top, bottom = _lowers(tmp_path)
    upper, mnt = tmp_path / "upper", tmp_path / "mnt"
    upper.mkdir()
    mnt.mkdir()
    with Daemon([top, bottom], upper, mnt, [f"workdir={tmp_path / 'work'}", "metacopy=on"]):
        os.chown(mnt / "f", 1000, 1001)
        os.rename(mnt / "big", mnt / "e" / "big")
        os.chmod(mnt / "d" / "x", 0o600)
    assert os.getxattr(upper / "e" / "big", META) == b""
    cmd = [sys.executable, "-m", "pyunionfs", "commit", str(upper), "-o"]
    refused = subprocess.run([*cmd, str(tmp_path / "no.tar")], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1 and "--lowers" in refused.stderr
    assert not (tmp_path / "no.tar").exists()
    done = subprocess.run([*cmd, str(tmp_path / "layer.tar"), "--lowers", f"{top}:{bottom}",
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "layer.tar") as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        assert (members["f"].uid, members["f"].gid) == (1000, 1001)
        assert tar.extractfile(members["f"]).read() == b"hello"  # type: ignore[union-attr]
        assert tar.extractfile(members["e/big"]).read() == BIG  # type: ignore[union-attr]
        assert members["d/x"].mode & 0o777 == 0o600
        assert tar.extractfile(members["d/x"]).read() == b"x in d"  # type: ignore[union-attr]
        assert "big" not in members or members["big"].name.startswith(".wh.")
        assert ".wh.big" in members  # the old name is deleted in the layer
