"""Image layers through a mount: apply, mount, change, commit, apply again.

Why: ``commit`` and ``apply`` promise that an upper written by the kernel
becomes an OCI layer that means exactly what the mount showed.  The oracle is
the kernel itself: lower layers are made by ``apply`` (kernel markers), the
kernel mounts them under an upper, ordinary syscalls change the tree (write,
unlink of lower files at several depths, rm -r + mkdir making a directory
opaque, chmod, chown, xattrs, hard links, new symlink, fifo and device), and
the merged view is recorded before unmounting.  Then the upper is committed
with the command line and

* every layer applied with ``--flatten`` into an empty directory must be that
  view: names, types, modes, owners, contents, symlinks, xattrs, devices,
  hard-link groups, and mtimes to the second;
* the committed layer applied as one more lower (kernel markers) and mounted
  read-only by the kernel under the same lowers must show that view again.

The same story runs with pyunionfs as the container's mount (and pyunionfs
mounting the stacked layers): its upper must commit to the same tree.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest

from pyunionfs.image.layerapply import apply_layer
from pyunionfs.image.layertar import commit
from tests.support.layergen import is_mounted
from tests.support.mounting import Daemon
from tests.support.treesnap import Entry, Snapshot, diff, snapshot
from tests.support.writecheck import kernel_overlay

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount -t overlay, mknod, trusted xattrs"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount(8)"),
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parents[2]
CAP = struct.pack("<IIIII", 0x02000000 | 1, 1 << 12, 0, 0, 0)  # v2, effective: cap_net_admin
T0 = 1_690_000_000


def _put(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _freeze(root: Path, sec: int) -> None:
    paths = [root, *root.rglob("*")]
    for p in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        os.utime(p, (sec, sec), follow_symlinks=False)


def build_base(root: Path) -> None:
    _put(root / "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    _put(root / "etc/shadow", b"root:*:1::::::\n", 0o640, (0, 42))
    _put(root / "etc/old-name", b"renamed later\n")
    _put(root / "bin/tool", b"\x7fELF tool\n", 0o755)
    _put(root / "bin/ls", b"\x7fELF ls\n", 0o755)
    _put(root / "bin/ping", b"\x7fELF ping\n", 0o755)
    os.setxattr(root / "bin/ping", "security.capability", CAP)
    os.symlink("tool", root / "bin/tool-link")
    os.symlink("/does/not/exist", root / "bin/dangling")
    _put(root / "lib/x.so", b"shared\n")
    os.link(root / "lib/x.so", root / "lib/y.so")
    _put(root / "usr/share/doc/pkg/README", b"readme\n")
    _put(root / "usr/share/doc/pkg/COPYING", b"license\n")
    _put(root / "opt/app/bin/run", b"#!/bin/sh\n", 0o755)
    _put(root / "opt/app/etc/conf", b"conf\n", 0o600, (1000, 1000))
    (root / "srv/empty").mkdir(parents=True)
    os.mkfifo(root / "srv/fifo", 0o600)
    os.mknod(root / "srv/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _put(root / "home/user/notes", b"notes\n", 0o600, (1000, 1000))
    os.setxattr(root / "home/user/notes", "user.tag", b"base")
    _put(root / "var/lib/state", b"0\n")
    _freeze(root, T0)


def build_middle(root: Path) -> None:
    """A layer in the kernel's format: a whiteout, an opaque directory, new files."""
    (root / "usr/share/doc").mkdir(parents=True)
    os.mknod(root / "usr/share/doc/pkg", stat.S_IFCHR, os.makedev(0, 0))
    (root / "home/user").mkdir(parents=True)
    os.setxattr(root / "home/user", "trusted.overlay.opaque", b"y")
    _put(root / "home/user/profile", b"export A=1\n", 0o644, (1000, 1000))
    os.chown(root / "home/user", 1000, 1000)
    _put(root / "usr/share/doc/other/README", b"other\n")
    _freeze(root, T0 + 3600)


def change_through_the_mount(m: Path) -> None:
    """Ordinary syscalls on the merged tree, each one leaving a different trace in the upper."""
    with open(m / "etc/passwd", "ab") as f:  # copy-up + write
        f.write(b"user:x:1000:1000::/home/user:/bin/sh\n")
    _put(m / "etc/new", b"new file\n", 0o640)
    os.link(m / "etc/new", m / "etc/new-link")  # a new hard link group
    os.link(m / "bin/ls", m / "bin/ls-again")  # a lower file linked: copy-up, then both names in the upper
    os.unlink(m / "etc/shadow")  # whiteout at depth 1
    os.unlink(m / "usr/share/doc/other/README")  # whiteout at depth 4
    os.rename(m / "etc/old-name", m / "etc/new-name")
    shutil.rmtree(m / "opt/app")  # rm -r of a lower directory ...
    os.mkdir(m / "opt/app", 0o750)  # ... and mkdir: an opaque directory
    _put(m / "opt/app/fresh", b"fresh\n")
    os.rmdir(m / "srv/empty")  # a lower directory whited out
    os.chmod(m / "bin/tool", 0o4755)  # setuid on a lower file: metadata copy-up
    os.chmod(m / "var", 0o750)
    os.chown(m / "var/lib/state", 1000, 100)
    os.setxattr(m / "home/user/profile", "user.tag", b"changed")
    os.setxattr(m / "bin/ls", "security.capability", CAP)
    os.symlink("../etc/new", m / "bin/new-link")
    os.mkfifo(m / "srv/new-fifo", 0o640)
    os.mknod(m / "srv/zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))


def _seconds(snap: Snapshot) -> Snapshot:
    """The snapshot with mtimes cut to whole seconds (a layer keeps seconds, as docker's do)."""
    out = []
    for p, e in snap.items():
        values = {f.name: getattr(e, f.name) for f in fields(Entry)}
        if values["mtime_ns"] is not None:
            values["mtime_ns"] -= values["mtime_ns"] % 1_000_000_000
        out.append((p, Entry(**values)))
    return Snapshot(tuple(out))


def _tree(root: Path) -> Snapshot:
    return _seconds(snapshot(root, mtime=True).subset(lambda p, e: p != b"."))


def _cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pyunionfs", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


@contextmanager
def mounted(who: str, mount: Callable[..., Daemon], lowers: list[Path], upper: Path | None, work: Path | None,
            mnt: Path) -> Iterator[Path]:
    """The kernel's overlayfs or pyunionfs over these layers at *mnt*, unmounted on the way out."""
    if who == "kernel":
        with kernel_overlay(lowers, upper, work, mnt):
            yield mnt
        return
    mnt.mkdir(exist_ok=True)
    d = mount(lowers, upper, *([f"workdir={work}"] if work is not None else []), mnt=mnt)
    yield mnt
    d.stop()


@pytest.mark.parametrize("who", ["kernel", "pyunionfs"])
def test_upper_committed_and_applied_again(tmp_path: Path, who: str, mount: Callable[..., Daemon]) -> None:
    src0, src1 = tmp_path / "src0", tmp_path / "src1"
    build_base(src0)
    build_middle(src1)
    tars = [tmp_path / "l0.tar", tmp_path / "l1.tar"]
    commit(str(src0), str(tars[0]))
    commit(str(src1), str(tars[1]), gzip_too=True)
    lowers = [tmp_path / "lower1", tmp_path / "lower0"]  # topmost first
    apply_layer(str(tars[1]) + ".gz", str(lowers[0]))
    apply_layer(str(tars[0]), str(lowers[1]))
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir()

    with mounted(who, mount, lowers, upper, work, mnt):
        assert not (mnt / "usr/share/doc/pkg").exists() and (mnt / "home/user/profile").exists()
        assert not (mnt / "home/user/notes").exists(), "the applied opaque marker hides the base's file"
        change_through_the_mount(mnt)
        merged = _tree(mnt)
    assert not is_mounted(mnt)
    assert b"bin/ls" in merged and merged[b"bin/ls"].links == (b"bin/ls", b"bin/ls-again")
    assert merged[b"lib/x.so"].links == (b"lib/x.so", b"lib/y.so")

    listed = _cli("diff", str(upper), "--lowers", f"{lowers[0]}:{lowers[1]}").splitlines()
    for line in ("C /etc/passwd", "A /etc/new", "D /etc/shadow", "D /etc/old-name", "A /etc/new-name",
                 "C /opt/app", "D /opt/app/bin", "A /opt/app/fresh", "D /srv/empty", "D /usr/share/doc/other/README"):
        assert line in listed, (line, listed)

    out = _cli("commit", str(upper), "-o", str(tmp_path / "up.tar"), "--gzip").splitlines()
    assert out[0].startswith("sha256:") and out[0].endswith("up.tar") and out[1].endswith("up.tar.gz")
    assert _cli("commit", str(upper), "-o", str(tmp_path / "again.tar")).split()[0] == out[0].split()[0]

    flat = tmp_path / "flat"
    for layer in (tars[0], Path(str(tars[1]) + ".gz"), tmp_path / "up.tar.gz"):
        _cli("apply", "--flatten", str(layer), str(flat))
    assert diff(merged, _tree(flat), limit=None) == []

    lower2 = tmp_path / "lower2"
    _cli("apply", str(tmp_path / "up.tar"), str(lower2))
    mnt2 = tmp_path / "mnt2"
    with mounted(who, mount, [lower2, *lowers], None, None, mnt2):
        stacked = _tree(mnt2)
    assert not is_mounted(mnt2)
    assert diff(merged, stacked, limit=None) == []
