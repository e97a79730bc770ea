"""A build step that writes through one name of a lower hard link: the next step sees it under every name.

Why: the issue's Dockerfile-like build.  The base has ``/usr/bin/gunzip``,
``uncompress`` and ``zcat`` as hard links (and ``/bin/gzip-too``, in a
directory the step never touches).  ``RUN echo more >> /usr/bin/uncompress``
copies the file up once, to the work dir's ``index/``, and links only that
name into the upper; the mount shows the new content under every name, so
the next step's ``RUN cmp /usr/bin/uncompress /usr/bin/gunzip`` must find
them equal.  It does only if the exported layer holds every name, which
``commit`` must find through the index and the lowers, since nothing puts
them in the upper.

The kernel's overlayfs with ``index=on`` is the oracle for the upper's layout
(it links only the name used); pyunionfs as the build's mount must give the
same layer.  Both ways of exporting are run: ``commit -o`` with ``--lowers``
and ``--workdir``, and ``commit --from IMAGE --tag`` into a layer store,
where the image gives the lowers and pyunionfs's own work dir is found
beside the upper.  Every mount is unmounted before the test ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from pyunionfs.image.store import Store
from tests.support.layergen import is_mounted
from tests.support.mounting import Daemon
from tests.support.treesnap import Entry, Snapshot, diff, snapshot
from tests.support.writecheck import kernel_overlay

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount -t overlay, trusted xattrs"),
    pytest.mark.skipif(shutil.which("mount") is None or shutil.which("cmp") is None, reason="needs mount(8), cmp(1)"),
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("usr/bin/gunzip", "usr/bin/uncompress", "usr/bin/zcat", "bin/gzip-too")
OLD = b"#!/bin/sh\nexec gzip -d \"$@\"\n"


def build_base(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / NAMES[0]).write_bytes(OLD)
    os.chmod(root / NAMES[0], 0o755)
    for name in NAMES[1:]:
        os.link(root / NAMES[0], root / name)
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("base\n")


def run_step(mnt: Path) -> None:
    """``RUN echo more >> /usr/bin/uncompress``: one name looked up, written."""
    subprocess.run(["sh", "-c", f"echo more >> '{mnt}/usr/bin/uncompress'"], check=True, timeout=30)


def check_next_step(mnt: Path) -> None:
    """``RUN cmp /usr/bin/uncompress /usr/bin/gunzip``, for every name, and one file for all."""
    for name in NAMES[1:]:
        r = subprocess.run(["cmp", mnt / NAMES[0], mnt / name], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
    assert (mnt / NAMES[0]).read_bytes() == OLD + b"more\n"
    sts = [os.stat(mnt / n) for n in NAMES]
    assert {(st.st_ino, st.st_nlink) for st in sts} == {(sts[0].st_ino, len(NAMES))}


def pyunionfs(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "pyunionfs", *args], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


@contextmanager
def mounted(who: str, mount: Callable[..., Daemon], lowers: list[Path] | str, upper: Path | None,
            work: Path | None, mnt: Path, *extra: str) -> Iterator[Path]:
    """The kernel's overlayfs (index=on) or pyunionfs at *mnt*, unmounted on the way out.

    pyunionfs takes *lowers* as a list or ``image:NAME`` (with *extra*
    arguments such as ``--store``), and its default work dir when *work* is None.
    """
    if who == "kernel":
        assert isinstance(lowers, list)
        with kernel_overlay(lowers, upper, work, mnt, ["index=on"] if upper is not None else []):
            yield mnt
        assert not is_mounted(mnt)
        return
    mnt.mkdir(exist_ok=True)
    d = mount(lowers, upper, *([f"workdir={work}"] if work is not None else []), mnt=mnt, extra_args=list(extra))
    try:
        yield mnt
    finally:
        d.stop()
    assert not is_mounted(mnt)


def upper_names(upper: Path) -> list[str]:
    return sorted(str(p.relative_to(upper)) for p in upper.rglob("*") if not p.is_dir())


@pytest.mark.parametrize("who", ["kernel", "pyunionfs"])
def test_commit_with_lowers_holds_every_name(tmp_path: Path, who: str, mount: Callable[..., Daemon]) -> None:
    base, upper, work = tmp_path / "base", tmp_path / "upper", tmp_path / "work"
    build_base(base)
    upper.mkdir()
    with mounted(who, mount, [base], upper, work, tmp_path / "mnt") as m:
        run_step(m)
        check_next_step(m)  # what the container saw
    assert upper_names(upper) == ["usr/bin/uncompress"], "only the name written is in the upper"
    assert len(os.listdir(work / "index")) == 1

    # Without the lowers the other names cannot be found: said once, and the layer lacks them.
    bare = pyunionfs("commit", str(upper), "-o", str(tmp_path / "bare.tar"), "--workdir", str(work))
    assert bare.stderr.count("\n") == 1 and "3 name(s) of hard-linked lower files" in bare.stderr
    listed = pyunionfs("diff", str(upper), "--lowers", str(base), "--workdir", str(work))
    assert listed.stdout.splitlines() == ["C /bin", "C /bin/gzip-too", "C /usr", "C /usr/bin", "C /usr/bin/gunzip",
                                          "C /usr/bin/uncompress", "C /usr/bin/zcat"] and listed.stderr == ""

    out = pyunionfs("commit", str(upper), "-o", str(tmp_path / "step.tar"), "--lowers", str(base),
                    "--workdir", str(work))
    assert out.stderr == ""
    with tarfile.open(tmp_path / "step.tar") as tf:
        links = {m.name: m.linkname for m in tf.getmembers() if m.isfile() or m.islnk()}
    assert links == {"bin/gzip-too": "", **{n: "bin/gzip-too" for n in NAMES[:3]}}

    layer = tmp_path / "layer1"
    pyunionfs("apply", str(tmp_path / "step.tar"), str(layer))
    with mounted(who, mount, [layer, base], None, None, tmp_path / "mnt2") as m:
        check_next_step(m)


@pytest.mark.parametrize("who", ["kernel", "pyunionfs"])
def test_commit_from_an_image_finds_its_lowers(tmp_path: Path, who: str, mount: Callable[..., Daemon]) -> None:
    """The build script's way: ``commit UPPER --from BASE --tag STEP``, no --lowers."""
    base, upper, store = tmp_path / "base", tmp_path / "upper", tmp_path / "store"
    build_base(base)
    upper.mkdir()
    pyunionfs("commit", str(base), "--tag", "base", "--store", str(store))
    lowers = [Path(p) for p in Store(str(store)).lowers("base")]
    work = tmp_path / "work" if who == "kernel" else None  # pyunionfs: its default, beside the upper
    image: list[Path] | str = lowers if who == "kernel" else "image:base"
    with mounted(who, mount, image, upper, work, tmp_path / "mnt", "--store", str(store)) as m:
        run_step(m)
    if who == "pyunionfs":
        assert (tmp_path / ".upper.pyunionfs-work/index").is_dir()

    args = ["--workdir", str(work)] if work is not None else []
    r = pyunionfs("commit", str(upper), "--from", "base", "--tag", "step", "-m", "RUN echo more", "--store", str(store),
                  *args)
    assert r.stderr == ""
    stacked = [Path(p) for p in Store(str(store)).lowers("step")]
    image = stacked if who == "kernel" else "image:step"
    with mounted(who, mount, image, None, None, tmp_path / "mnt2", "--store", str(store)) as m:
        check_next_step(m)


def build_two_groups(root: Path) -> None:
    build_base(root)
    (root / "sbin").mkdir()
    (root / "opt").mkdir()
    (root / "sbin/a").write_bytes(b"a\n")
    os.link(root / "sbin/a", root / "sbin/b")
    os.link(root / "sbin/a", root / "opt/c")
    for p in sorted([root, *root.rglob("*")], key=lambda p: len(p.parts), reverse=True):
        os.utime(p, (1_690_000_000, 1_690_000_000), follow_symlinks=False)


def longer_story(m: Path) -> None:
    """Each step leaves a different trace: a write, a link of a lower-only
    name, an unlink of another, a metadata change, a directory removed."""
    run_step(m)
    (m / "usr/local/bin").mkdir(parents=True)
    os.link(m / "usr/bin/zcat", m / "usr/local/bin/zz")
    os.unlink(m / "bin/gzip-too")
    os.chmod(m / "sbin/a", 0o700)
    shutil.rmtree(m / "opt")


def tree(root: Path) -> Snapshot:
    """What a program sees, mtimes in whole seconds (a layer keeps seconds)."""
    snap = snapshot(root, mtime=True).subset(lambda p, e: p != b".")
    out: list[tuple[bytes, Entry]] = []
    for p, e in snap.items():
        ns = e.mtime_ns
        out.append((p, replace(e, mtime_ns=None if ns is None else ns - ns % 1_000_000_000)))
    return Snapshot(tuple(out))


@pytest.mark.parametrize("who", ["kernel", "pyunionfs"])
def test_layer_over_its_lowers_is_the_merged_view(tmp_path: Path, who: str, mount: Callable[..., Daemon]) -> None:
    """Applied over the base (flattened, and stacked as one more lower),
    the layer gives exactly the tree the container saw, hard-link groups included."""
    base, upper, work = tmp_path / "base", tmp_path / "upper", tmp_path / "work"
    build_two_groups(base)
    upper.mkdir()
    with mounted(who, mount, [base], upper, work, tmp_path / "mnt") as m:
        longer_story(m)
        merged = tree(m)
    assert merged[b"usr/bin/gunzip"].links == (b"usr/bin/gunzip", b"usr/bin/uncompress", b"usr/bin/zcat",
                                               b"usr/local/bin/zz")
    assert merged[b"sbin/b"].links == (b"sbin/a", b"sbin/b") and merged[b"sbin/b"].mode & 0o777 == 0o700
    assert not (upper / "usr/bin/gunzip").exists() and not (upper / "sbin/b").exists()

    out = pyunionfs("commit", str(upper), "-o", str(tmp_path / "step.tar"), "--lowers", str(base),
                    "--workdir", str(work))
    assert out.stderr == ""
    pyunionfs("commit", str(base), "-o", str(tmp_path / "base.tar"))
    flat = tmp_path / "flat"
    for layer in ("base.tar", "step.tar"):
        pyunionfs("apply", "--flatten", str(tmp_path / layer), str(flat))
    assert diff(merged, tree(flat), limit=None) == []

    pyunionfs("apply", str(tmp_path / "step.tar"), str(tmp_path / "layer1"))
    with mounted(who, mount, [tmp_path / "layer1", base], None, None, tmp_path / "mnt2") as m:
        assert diff(merged, tree(m), limit=None) == []
