"""READDIR without attributes (``readdir(plain=True)``): in a directory of one
lower layer, files and symlinks are numbered and typed from the directory's own
entries, with no lstat each (:meth:`pyunionfs.fs.resolve.Resolver.scanned`).
What it answers must be what a full resolution answers, entry for entry:
the same names in the same order, the same inode numbers and types, whiteouts
and markers still hidden, and, once the directory changed, each name as it is now.
"""

from __future__ import annotations

import os
import stat
import tracemalloc

import pytest

from pyunionfs.fs.directories import SCAN_FROM
from pyunionfs.fs.union import UnionFS

from .conftest import lookup_path, mkfile, mklink, mkwhiteout
from .test_core_writes import env, ino_of  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices")


def _entries(fs: UnionFS, ino: int, plain: bool, start: int = 0) -> list[tuple[int, bytes, int, int]]:
    handle = fs.opendir(ino)
    try:
        out = [(off, name, attr.ino, stat.S_IFMT(attr.mode)) for off, name, _, attr in fs.readdir(handle, 0, plain)]
        if start:  # a second call from the middle, at the offset the last entry taken gave, as the kernel continues
            out = out[:start] + [(off, name, attr.ino, stat.S_IFMT(attr.mode))
                                 for off, name, _, attr in fs.readdir(handle, out[start - 1][0], plain)]  # fmt: skip
        return out
    finally:
        fs.releasedir(handle)


def _scanned(fs: UnionFS, ino: int) -> bool:
    handle = fs.opendir(ino)
    try:
        list(fs.readdir(handle, 0, plain=True))
        listing = fs.dirs.listing_of(handle)
        return listing is not None and listing.scan is not None
    finally:
        fs.releasedir(handle)


def _lower_dir(root) -> None:
    for i in range(50):
        mkfile(root / f"d/f{i:02}", b"x" * i)
    os.link(root / "d/f00", root / "d/hard")
    mklink(root / "d/link", "f01")
    mklink(root / "d/dangling", "nowhere")
    (root / "d/sub").mkdir()
    mkfile(root / "d/sub/inner")
    os.mkfifo(root / "d/fifo")
    os.mknod(root / "d/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    mkwhiteout(root / "d/whited")  # hides nothing below it, and is not listed
    mkfile(root / "d/.wh.marker")  # an OCI marker: never an entry


def test_one_lower_layer_answers_as_a_full_resolution(env) -> None:  # noqa: F811
    _lower_dir(env.l1)
    fs = env.mount()
    d = ino_of(fs, "d")
    full = _entries(fs, d, plain=False)
    assert _entries(fs, d, plain=True) == full
    assert _entries(fs, d, plain=True, start=20) == full
    assert _scanned(fs, d)
    names = [n for _, n, _, _ in full]
    assert b"whited" not in names and b".wh.marker" not in names and b"fifo" in names and b"null" in names
    # The numbers are the ones a lookup gives.
    for _, name, ino, kind in full[2:]:
        found, attr = fs.lookup(d, name)
        assert (found.ino, stat.S_IFMT(attr.mode)) == (ino, kind), name
        fs.forget(found.ino, 1)


def test_a_scan_keeps_the_listing_s_names_not_a_copy(env) -> None:  # noqa: F811
    """A held listing of a huge directory keeps its scan as long as itself:
    with a second name object each, the names cost twice (about 50 bytes an
    entry: a tenth of what a held entry of a 200,000-entry directory costs)."""
    _lower_dir(env.l1)
    fs = env.mount()
    d = ino_of(fs, "d")
    handle = fs.opendir(d)
    try:
        list(fs.readdir(handle, 0, plain=True))
        listing = fs.dirs.listing_of(handle)
        assert listing is not None and listing.scan is not None
        assert listing.scan.names is listing.names
        assert len(listing.scan.inos) == len(listing.scan.kinds) == len(listing.names)
    finally:
        fs.releasedir(handle)


def test_listing_and_scanning_a_huge_directory_never_holds_its_names_twice(env) -> None:  # noqa: F811
    """Reading a listing and then its scan peaks at little more than what stays: the names once
    (about 50 bytes each here) and the scan's numbers and kinds (9).  Read as str and encoded
    whole, then read again for the scan, the names were held three and four times over at the
    peak: the most memory a 200,000-entry directory took, more than the nodes ``ls -l`` leaves."""
    count = 20_000
    (env.l1 / "d").mkdir()
    for i in range(count):
        os.close(os.open(env.l1 / "d" / f"entry{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644))
    fs = env.mount()
    d = ino_of(fs, "d")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        handle = fs.opendir(d)
        for _ in fs.readdir(handle, 0, plain=True):
            pass
        listing = fs.dirs.listing_of(handle)
        held, peak = (m - base for m in tracemalloc.get_traced_memory())
        fs.releasedir(handle)
    finally:
        tracemalloc.stop()
    assert listing is not None and listing.scan is not None and len(listing.names) == count
    per_entry = f"{held / count:.0f} bytes an entry held, {peak / count:.0f} at the peak"
    assert held / count < 75 and peak / count < 90, per_entry


def test_merged_and_upper_directories_resolve_each_name(env) -> None:  # noqa: F811
    _lower_dir(env.l1)
    mkfile(env.l2 / "d/below", b"l2")  # d now merges two layers
    mkfile(env.u / "top/own", b"up")
    fs = env.mount()
    d, top = ino_of(fs, "d"), ino_of(fs, "top")
    assert _entries(fs, d, plain=True) == _entries(fs, d, plain=False)
    assert _entries(fs, top, plain=True) == _entries(fs, top, plain=False)
    assert not _scanned(fs, d) and not _scanned(fs, top)


def test_a_changed_directory_lists_each_name_as_it_is_now(env) -> None:  # noqa: F811
    _lower_dir(env.l1)
    fs = env.mount()
    d = ino_of(fs, "d")
    handle = fs.opendir(d)
    try:
        first = [name for _, name, _, _ in fs.readdir(handle, 0, plain=True)][:5]
        fs.unlink(d, b"f30")  # copies d up, whites f30 out: the listing is not current any more
        rest = [name for _, name, _, _ in fs.readdir(handle, len(first), plain=True)]
    finally:
        fs.releasedir(handle)
    assert b"f30" not in rest and b"f31" in rest
    assert first[:2] == [b".", b".."]
    assert lookup_path(fs, "d/f31")[1].size == 31


def test_a_few_names_are_resolved_without_reading_the_directory_again(env) -> None:  # noqa: F811
    for i in range(SCAN_FROM):
        mkfile(env.l1 / f"small/f{i}")
    fs = env.mount()
    small = ino_of(fs, "small")
    assert _entries(fs, small, plain=True) == _entries(fs, small, plain=False)
    assert not _scanned(fs, small)


def test_a_directory_that_cannot_be_read_again_is_resolved_name_by_name(layer, make_fs) -> None:
    """A lower changed under the mount is undefined (as on the kernel), but
    a listing must not fail for it: the names left are resolved one by one."""
    low = layer("low")
    for i in range(40):
        mkfile(low / f"d/f{i:02}")
    fs = make_fs([low])
    d, _ = lookup_path(fs, "d")
    handle = fs.opendir(d)
    try:
        (low / "d").rename(low / "elsewhere")
        mkfile(low / "d")  # not a directory any more
        fs.stack.fds.clear()  # the directory fds held open (a drop of the caches clears them too)
        assert [name for _, name, _, _ in fs.readdir(handle, 0, plain=True)] == [b".", b".."]
    finally:
        fs.releasedir(handle)
