"""Shared helpers for the core unit tests: layers as real directories, a UnionFS
factory that is always closed, and small drivers for lookup/readdir/read.

No FUSE and no mounting: the core (:class:`pyunionfs.fs.union.UnionFS`) is called
directly by inode number.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.union import Attr, UnionFS

# -- building layers on disk ------------------------------------------------


def mkfile(path: Path | str, data: bytes = b"", mode: int | None = None) -> Path:
    """A regular file with *data*, parents created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def mkdir(path: Path | str) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def mkwhiteout(path: Path | str) -> Path:
    """A kernel overlayfs whiteout: character device 0/0."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return path


def set_opaque(path: Path | str, value: bytes = b"y", ns: str = "trusted") -> Path:
    """Mark directory *path* with ``<ns>.overlay.opaque = value``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, f"{ns}.overlay.opaque".encode(), value)
    return path


def mkxwhiteout(path: Path | str, ns: str = "trusted", parent_x: bool = True) -> Path:
    """An xattr whiteout: zero-size file with ``<ns>.overlay.whiteout``.

    With *parent_x* the parent directory gets ``<ns>.overlay.opaque = x``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if parent_x:
        os.setxattr(path.parent, f"{ns}.overlay.opaque".encode(), b"x")
    path.write_bytes(b"")
    os.setxattr(path, f"{ns}.overlay.whiteout".encode(), b"")
    return path


def mklink(path: Path | str, target: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def b(path: Path | str) -> bytes:
    return os.fsencode(os.path.abspath(path))


# -- driving the core -----------------------------------------------------------


def lookup_path(fs: UnionFS, rel: str | bytes) -> tuple[int, Attr]:
    """Successive lookups from the root; returns (ino, attr) of the last one."""
    if isinstance(rel, str):
        rel = os.fsencode(rel)
    ino, attr = ROOT_INO, fs.getattr(ROOT_INO)
    for name in [n for n in rel.split(b"/") if n]:
        node, attr = fs.lookup(ino, name)
        ino = node.ino
    return ino, attr


def readdir_all(fs: UnionFS, ino: int, start: int = 0) -> list[tuple[int, bytes, object, Attr]]:
    """Every (next_offset, name, node, attr) of a directory, opened and released here."""
    fh = fs.opendir(ino)
    try:
        return list(fs.readdir(fh, start))
    finally:
        fs.releasedir(fh)


def listdir(fs: UnionFS, rel: str | bytes = b"") -> list[bytes]:
    """Names of a directory through the core, without ``.`` and ``..``, sorted."""
    ino, _ = lookup_path(fs, rel)
    return sorted(name for _, name, _, _ in readdir_all(fs, ino) if name not in (b".", b".."))


def read_file(fs: UnionFS, ino: int) -> bytes:
    fh = fs.open(ino, os.O_RDONLY)
    try:
        out = []
        off = 0
        while True:
            chunk = fs.read(fh, off, 65536)
            if not chunk:
                return b"".join(out)
            out.append(chunk)
            off += len(chunk)
    finally:
        fs.release(fh)


def read_path(fs: UnionFS, rel: str | bytes) -> bytes:
    return read_file(fs, lookup_path(fs, rel)[0])


def errno_of(fn: Callable[[], object]) -> int:
    """Call *fn*, which must raise OSError; return its errno."""
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def layer(tmp_path: Path) -> Callable[[str], Path]:
    """``layer("l1")`` makes (once) and returns the directory tmp_path/l1."""

    def make(name: str) -> Path:
        p = tmp_path / name
        p.mkdir(exist_ok=True)
        return p

    return make


@pytest.fixture
def make_fs(tmp_path: Path) -> Iterator[Callable[..., UnionFS]]:
    """``make_fs(lowers, upper=None, **cfg)``: a UnionFS over real dirs, closed at teardown.

    *lowers* is a list of paths, topmost first.  Extra keyword arguments go to
    :class:`MountConfig` (readonly, userxattr, oci_whiteouts, ...).  readonly
    defaults to True when there is no upper, as build_config would decide.
    """
    made: list[UnionFS] = []

    def make(lowers, upper=None, **kw) -> UnionFS:
        kw.setdefault("readonly", upper is None)
        cfg = MountConfig(
            lowers=tuple(b(p) for p in lowers),
            upper=None if upper is None else b(upper),
            mountpoint=b(tmp_path / "mnt-unused"),
            **kw,
        )
        fs = UnionFS(cfg)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()
