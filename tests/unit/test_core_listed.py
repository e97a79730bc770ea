"""``Resolver.listed``: a listing's names resolved as ``Resolver.child`` resolves them.

``listed`` is the per-listing shortcut that READDIRPLUS and emptiness checks
take; ``child`` is the rule.  Each test resolves every name of every directory
twice, on two fresh cores over the same layers, once each way, and compares
the entries and what each left in the resolution cache.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.fs.entry import Entry
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.writes import WritableUnionFS

from .conftest import b, mkdir, mkfile, mklink, mkwhiteout, set_opaque

Found = dict[bytes, tuple[Entry | None, tuple[bool, Entry | None]]]


def _core(tmp: Path, lowers: list[Path], upper: Path | None) -> WritableUnionFS:
    cfg = MountConfig(
        lowers=tuple(b(p) for p in lowers),
        upper=None if upper is None else b(upper),
        mountpoint=b(tmp / "mnt-unused"),
        workdir=None if upper is None else b(tmp / "work"),
        readonly=upper is None,
    )
    return WritableUnionFS(cfg)


def _resolve_all(fs: WritableUnionFS, listed: bool) -> dict[bytes, Found]:
    """Every directory's names resolved, walking the merged tree from the root."""
    r = fs.resolver
    out: dict[bytes, Found] = {}
    todo: list[tuple[bytes, Entry]] = [(b"", fs.inodes[ROOT_INO].entry)]
    while todo:
        rel, d = todo.pop()
        names = r.names(d, rel)
        child = r.listed(d, rel) if listed else (lambda n, d=d, rel=rel: r.child(d, rel, n))
        found: Found = {}
        for name in names:
            entry = child(name)
            found[name] = (entry, r.cache.lookup(d.ident, name))
            if entry is not None and entry.is_dir:
                todo.append(((rel + b"/" if rel else b"") + name, entry))
        out[rel] = found
    return out


def _compare(tmp: Path, lowers: list[Path], upper: Path | None) -> dict[bytes, Found]:
    found = []
    for listed in (False, True):
        fs = _core(tmp, lowers, upper)
        try:
            found.append(_resolve_all(fs, listed))
        finally:
            fs.close()
    want, got = found
    assert got == want
    return got


def _tree(root: Path) -> None:
    mkfile(root / "plain", b"data")
    mkfile(root / "empty")
    mklink(root / "link", "plain")
    mklink(root / "dangling", "nowhere")
    mkfile(root / "sub/inner", b"inner")
    mkfile(root / "sub/deeper/leaf", b"leaf")
    mkdir(root / "emptydir")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    mkfile(root / "hard1", b"linked")
    os.link(root / "hard1", root / "hard2")
    mkfile(root / ".wh.oci-hidden")  # an OCI marker: never a name of the listing


def test_one_lower_layer(tmp_path: Path) -> None:
    low = mkdir(tmp_path / "low")
    _tree(low)
    mkwhiteout(low / "sub/gone")  # a whiteout in the bottom layer hides nothing: not listed
    got = _compare(tmp_path, [low], None)
    assert got[b""][b"plain"][0] is not None and got[b"sub"][b"gone"][0] is None
    assert b".wh.oci-hidden" not in got[b""]


def test_several_layers_and_an_upper(tmp_path: Path) -> None:
    top, low, up = mkdir(tmp_path / "top"), mkdir(tmp_path / "low"), mkdir(tmp_path / "up")
    _tree(low)
    _tree(top / "only-top")  # a directory of the top layer alone, below a merged root
    mkfile(top / "plain", b"over")
    mkwhiteout(top / "empty")
    mkfile(top / "sub/new", b"new")
    set_opaque(top / "emptydir")
    mkfile(up / "sub/up-only", b"up")
    got = _compare(tmp_path, [top, low], up)
    assert got[b""][b"empty"][0] is None and got[b""][b"plain"][0] is not None


def test_a_lower_hard_link_copied_up_through_its_other_name(tmp_path: Path) -> None:
    """The name still only below resolves to the index copy (never cached),
    as ``child`` resolves it."""
    low, up = mkdir(tmp_path / "low"), mkdir(tmp_path / "up")
    mkfile(low / "d/h1", b"linked")
    os.link(low / "d/h1", low / "d/h2")
    mkfile(low / "d/other", b"x")
    fs = _core(tmp_path, [low], up)  # h1 copied up (to the index) through a core of its own
    try:
        d = fs.lookup(ROOT_INO, b"d")[0].ino
        ino = fs.lookup(d, b"h1")[0].ino
        fs.release(fs.open_file(ino, os.O_RDWR))
    finally:
        fs.close()
    assert os.listdir(up / "d") == ["h1"]
    got = _compare(tmp_path, [low], up)
    h2, cached = got[b"d"][b"h2"]
    assert h2 is not None and h2.index is not None and cached == (False, None)


@pytest.mark.parametrize("layers", [1, 3])
def test_a_cached_upper_object_is_checked_again(tmp_path: Path, layers: int) -> None:
    """A name resolved once, then changed in the upper behind the cache's
    back, is looked at again by both ways (``child`` restats upper objects)."""
    lows = [mkdir(tmp_path / f"l{i}") for i in range(layers)]
    up = mkdir(tmp_path / "up")
    mkfile(lows[-1] / "f", b"low")
    mkfile(up / "u", b"up")
    fs = _core(tmp_path, lows, up)
    try:
        r, root = fs.resolver, fs.inodes[ROOT_INO].entry
        first = r.listed(root, b"")(b"u")
        assert first is not None
        with open(up / "u", "ab") as f:
            f.write(b" and more")
        again = r.listed(root, b"")(b"u")
        assert again is not None and again.st.st_size == len(b"up and more")
    finally:
        fs.close()
