"""``UnionFS.readdir_at``: reading a directory without a handle, as the kernel
does after the zero-message opendir (``Engine.opendir`` answers ENOSYS).

The offsets must do what a handle's own listing does: a reader that stops
and resumes, while the directory changes under it, sees every name it had
not seen yet that is still there, each once; and a new read sees the changes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.fs.cache import MAX_HELD_VERSIONS
from pyunionfs.fs.callers import DAEMON, Caller
from pyunionfs.fs import directories
from pyunionfs.fs.directories import offset_of, parse_offset
from pyunionfs.fs.writes import WritableUnionFS

from .conftest import b, errno_of, lookup_path, mkfile, mkwhiteout

NAMES = [f"f{i:03}".encode() for i in range(60)]


@pytest.fixture
def fs(tmp_path: Path):
    """A merged directory ``d``: names from two lowers, one hidden by a whiteout, and the upper;
    and ``e``, a directory of the upper alone holding the same names."""
    low1, low2, up, work = (tmp_path / n for n in ("l1", "l2", "u", "w"))
    for i, name in enumerate(NAMES):
        mkfile((low1 if i % 3 else low2) / "d" / name.decode(), b"x")
        mkfile(up / "e" / name.decode(), b"x")
    mkfile(low2 / "d/hidden")
    mkwhiteout(up / "d/hidden")
    work.mkdir()
    cfg = MountConfig(lowers=(b(low1), b(low2)), upper=b(up), mountpoint=b(tmp_path / "mnt-unused"), workdir=b(work))
    core = WritableUnionFS(cfg)
    yield core
    core.close()


def _read(fs: WritableUnionFS, ino: int, cookie: int, count: int | None = None) -> list[tuple[int, bytes]]:
    """(offset, name) of up to *count* entries from *cookie*, as one READDIR takes them."""
    out = []
    for off, name, node, _ in fs.readdir_at(ino, cookie):
        if node is not None:
            fs.remember(node)
        out.append((off, name))
        if count is not None and len(out) == count:
            break
    return out


def _names(entries: list[tuple[int, bytes]]) -> list[bytes]:
    return [n for _, n in entries if n not in (b".", b"..")]


def test_a_whole_read_lists_each_visible_name_once(fs: WritableUnionFS) -> None:
    ino, _ = lookup_path(fs, "d")
    entries = _read(fs, ino, 0)
    assert [n for _, n in entries[:2]] == [b".", b".."]
    assert sorted(_names(entries)) == NAMES
    assert len({off for off, _ in entries}) == len(entries), "offsets must differ"
    assert 0 not in {off for off, _ in entries}


def test_a_reader_resumes_in_its_listing_whatever_changed_since(fs: WritableUnionFS) -> None:
    """As ``shutil.rmtree`` and ``rm -r`` do: read part, remove what was read,
    read on.  With positions into the new listing, every removed name would
    shift the rest down and as many names would be skipped."""
    ino, _ = lookup_path(fs, "d")
    first = _read(fs, ino, 0, 22)
    for name in _names(first):
        fs.unlink(ino, name)
    fs.create(ino, b"new", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DAEMON)
    rest = _read(fs, ino, first[-1][0])
    seen = _names(first) + _names(rest)
    assert sorted(n for n in seen if n != b"new") == NAMES, "a name not yet seen was skipped or repeated"
    # A new read (offset 0) lists the directory as it is now.
    again = _names(_read(fs, ino, 0))
    assert sorted(again) == sorted([b"new", *(n for n in NAMES if n not in _names(first))])


def test_a_reader_of_an_upper_directory_resumes_in_its_listing(fs: WritableUnionFS) -> None:
    """The same in a directory of the upper alone, where a removed name leaves no whiteout and
    the names after it would move down in a new listing: the reader skips none of them."""
    ino, _ = lookup_path(fs, "e")
    first = _read(fs, ino, 0, 22)
    for name in _names(first):
        fs.unlink(ino, name)
    rest = _read(fs, ino, first[-1][0])
    assert sorted(_names(first) + _names(rest)) == NAMES, "a name not yet seen was skipped or repeated"
    assert sorted(_names(_read(fs, ino, 0))) == sorted(_names(rest)), "a new read lists what is there now"


def test_resuming_after_every_entry_loses_nothing(fs: WritableUnionFS) -> None:
    """One entry per READDIR (a tiny buffer), a name removed before each."""
    ino, _ = lookup_path(fs, "d")
    seen, off = [], 0
    while batch := _read(fs, ino, off, 1):
        off, name = batch[0]
        if name not in (b".", b".."):
            seen.append(name)
            fs.unlink(ino, name)
    assert sorted(seen) == NAMES
    assert _names(_read(fs, ino, 0)) == []


def test_an_unchanged_directory_is_listed_once_for_every_reader(fs: WritableUnionFS) -> None:
    ino, _ = lookup_path(fs, "d")
    a, b_ = _read(fs, ino, 0), _read(fs, ino, 0)
    assert a == b_
    cache = fs.resolver.cache
    # (The listing holds candidate names: the hidden one too, resolved away as it is read.)
    assert (cache.live_listings, cache.live_listed_names) == (1, len(NAMES) + 1)


def test_a_listing_pushed_out_of_memory_resumes_on_the_current_one(fs: WritableUnionFS) -> None:
    ino, _ = lookup_path(fs, "d")
    cache = fs.resolver.cache
    cache.held.max_names = len(NAMES)  # room for one listing
    first = _read(fs, ino, 0, 12)
    fs.create(ino, b"new", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DAEMON)
    _read(fs, ino, 0)  # the new version pushes the first one out
    assert cache.live_listings == 1
    rest = _read(fs, ino, first[-1][0])
    # On at the same position of the current listing (the best guess left).
    now = _read(fs, ino, 0)
    assert rest == now[len(first):]
    assert _names(rest)


def test_a_removed_directory_reads_empty_and_a_file_is_not_a_directory(fs: WritableUnionFS) -> None:
    ino, _ = lookup_path(fs, "d")
    first = _read(fs, ino, 0, 5)
    for name in NAMES:
        fs.unlink(ino, name)
    root = lookup_path(fs, "")[0]
    fs.rmdir(root, b"d")
    assert _names(_read(fs, ino, first[-1][0])) == []
    other, _ = lookup_path(fs, "")
    fs.create(other, b"plain", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DAEMON)
    plain, _ = lookup_path(fs, "plain")
    assert errno_of(lambda: list(fs.readdir_at(plain, 0))) == errno.ENOTDIR


def test_an_offset_naming_another_directorys_listing_lists_none_of_it(tmp_path: Path) -> None:
    """Offsets are the reader's to choose (lseek) and versions are small numbers: an offset
    carrying the version of another directory's held listing must not list that directory's
    names, neither resolved nor from its scan (a plain READDIR of a one-layer directory)."""
    low, up, work = tmp_path / "l", tmp_path / "u", tmp_path / "w"
    for i in range(40):
        mkfile(low / "secret" / f"hidden-{i:02}", b"x")
        mkfile(low / "open" / f"shown-{i:02}", b"x")
    up.mkdir()
    work.mkdir()
    cfg = MountConfig(lowers=(b(low),), upper=b(up), mountpoint=b(tmp_path / "mnt-unused"), workdir=b(work))
    fs = WritableUnionFS(cfg)
    try:
        secret, _ = lookup_path(fs, "secret")
        opened, _ = lookup_path(fs, "open")
        assert len(list(fs.readdir_at(secret, 0, plain=True))) == 42
        held = fs.resolver.cache.held.get(fs.node(secret).entry.ident, lambda lst: True)
        assert held is not None
        # Every form an offset naming that listing could take: short with either directory's
        # position bits (both 6: 40 names), or long.
        for cookie in (offset_of(held.version, 6, 2), offset_of(held.version, None, 2)):
            assert parse_offset(cookie)[3] == 2
            for plain in (True, False):
                names = [name for _, name, _, _ in fs.readdir_at(opened, cookie, plain)]
                assert names and not [n for n in names if n.startswith(b"hidden-")]
    finally:
        fs.close()


def test_one_users_readers_push_out_their_own_listings_not_anothers(tmp_path: Path) -> None:
    """Past the bound, the user holding the most names loses its least recently read listing:
    a user reading many directories cannot push out the one another user is part-way through;
    and the listing read last is held whatever its size."""
    low, up, work = tmp_path / "l", tmp_path / "u", tmp_path / "w"
    for d in ("b", *(f"a{i}" for i in range(6)), "huge"):
        for i in range(60 if d == "huge" else 10):
            mkfile(low / d / f"n{i:02}", b"")
    up.mkdir()
    work.mkdir()
    cfg = MountConfig(lowers=(b(low),), upper=b(up), mountpoint=b(tmp_path / "mnt-unused"), workdir=b(work))
    fs = WritableUnionFS(cfg)
    try:
        held = fs.resolver.cache.held
        held.max_names = 33  # (three listings of 10 names: each counts one more)
        alice, bob = Caller(1000, 1000, 0, 1), Caller(1001, 1001, 0, 2)

        def ident(name: str) -> tuple[int, int]:
            return fs.node(lookup_path(fs, name)[0]).entry.ident

        def start(name: str, caller: Caller) -> int:
            next(iter(fs.readdir_at(lookup_path(fs, name)[0], 0, False, caller)))
            lst = held.get(ident(name), lambda lst: True)
            assert lst is not None
            return lst.version

        def still_held(name: str, version: int) -> bool:
            return held.get(ident(name), lambda lst: lst.version == version) is not None

        mine = start("b", bob)
        versions = [start(f"a{i}", alice) for i in range(6)]
        assert still_held("b", mine), "bob's listing was let go"
        assert held.names <= 33 and len(held) == 3  # bob's, and alice's two read last
        assert [still_held(f"a{i}", v) for i, v in enumerate(versions)] == [False] * 4 + [True] * 2
        start("huge", alice)
        assert len(held) == 1 and held.names == 61
    finally:
        fs.close()


def test_entries_the_kernel_holds_or_a_plain_read_wants_come_bare(fs: WritableUnionFS) -> None:
    """A READDIRPLUS entry of a node the kernel holds already carries no node, where the engine
    can send that (the kernel would only refresh it, and take a reference it then forgets); a
    READDIR's entries never do.  Bare
    entries still carry the number and kind stat shows."""
    ino, _ = lookup_path(fs, "d")
    held, held_attr = lookup_path(fs, "d/f005")
    whole = {name: node for _, name, node, _ in fs.readdir_at(ino, 0, plain=False)}
    assert whole[b"f005"] is not None, "only an engine that can send bare entries asks for them"
    entries = {name: (node, attr) for _, name, node, attr in fs.readdir_at(ino, 0, plain=False, lean=True)}
    node, attr = entries[b"f005"]
    assert node is None and (attr.ino, attr.mode) == (held, held_attr.mode)
    assert all(node is not None for name, (node, _) in entries.items() if name not in (b".", b"..", b"f005"))
    plain = {name: (node, attr) for _, name, node, attr in fs.readdir_at(ino, 0, plain=True)}
    assert all(node is None for node, _ in plain.values())
    assert {name: (a.ino, a.mode) for name, (_, a) in plain.items() if name != b"."} == {
        name: (a.ino, a.mode) for name, (_, a) in entries.items() if name != b"."}


def test_offsets_fit_32_bit_readers_and_long_listings_take_long_ones(
    fs: WritableUnionFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offsets stay under 2**31 (32-bit programs' readdir fails past it); a listing too long
    for that takes 63-bit offsets, and readers resume exactly in either form."""
    ino, _ = lookup_path(fs, "e")
    short = _read(fs, ino, 0)
    assert all(0 < off < 1 << 31 for off, _ in short)
    assert offset_of(5, None, 7) >= 1 << 31 and parse_offset(offset_of(5, None, 7)) == (5, -1, None, 7)
    assert parse_offset(offset_of(5, 7, 9))[2:] == (7, 9)
    monkeypatch.setattr(directories, "_MOST_BITS", 4)  # (60 names: too long now)
    first = _read(fs, ino, 0, 22)
    assert all(off >= 1 << 31 for off, _ in first)
    for name in _names(first):
        fs.unlink(ino, name)
    rest = _read(fs, ino, first[-1][0])
    assert sorted(_names(first) + _names(rest)) == NAMES


def test_a_directory_changed_and_read_over_and_over_holds_few_versions(fs: WritableUnionFS) -> None:
    """Every change followed by a read from the start makes a new version: one directory keeps at
    most MAX_HELD_VERSIONS of them, so neither memory nor the search of an offset's listing grows
    with the churn.  And empty listings count too, else they would pile up unbounded."""
    root, _ = lookup_path(fs, "")
    d, _ = fs.mkdir(root, b"churn", 0o755, DAEMON)
    held = fs.resolver.cache.held
    for i in range(40):
        fs.mkdir(d.ino, b"x%d" % i, 0o755, DAEMON)
        if i:
            fs.rmdir(d.ino, b"x%d" % (i - 1))
        assert [n for _, n, _, _ in fs.readdir_at(d.ino, 0)][2:] == [b"x%d" % i]
    assert len(held) == MAX_HELD_VERSIONS
    empties = [fs.mkdir(root, b"empty%d" % i, 0o755, DAEMON)[0].ino for i in range(10)]
    before = held.names
    for ino in empties:
        list(fs.readdir_at(ino, 0))
    assert held.names == before + 10
    held.max_names = 5
    list(fs.readdir_at(fs.mkdir(root, b"one-more", 0o755, DAEMON)[0].ino, 0))
    assert held.names <= 5
