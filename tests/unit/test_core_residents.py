"""Resident nodes (``fs/residents.py``): the files of a big lower directory listed with
attributes are held as columns, and behave as full nodes in every way the kernel can see.

Each test reads a directory of more than ``RESIDENT_FROM`` lower files as READDIRPLUS does
and then asks what the kernel would: attributes, xattrs, an open, a lookup by name, a
rename, an unlink, a copy-up, forgets.  The answers must be the object's own (never another
file's at the same name), and the memory a held node costs must stay under 100 bytes.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.fs.attributes import SetAttr
from pyunionfs.fs.callers import DAEMON
from pyunionfs.fs.inodes import Node
from pyunionfs.fs.residents import RESIDENT_FROM, Residents
from pyunionfs.fs.writes import WritableUnionFS

from .conftest import b, errno_of, lookup_path, read_file

N = RESIDENT_FROM + 76


def _name(i: int) -> str:
    return f"f{i:05d}"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``low/big``: N files, each holding its own name; one with an xattr, one symlink,
    one hard-linked pair and one subdirectory (neither of which can be resident)."""
    big = tmp_path / "low" / "big"
    big.mkdir(parents=True)
    for i in range(N):
        (big / _name(i)).write_bytes(_name(i).encode())
    os.setxattr(big / _name(7), "user.colour", b"blue")
    os.symlink("target-of-link", big / "link")
    (big / "hard").write_bytes(b"hard")
    os.link(big / "hard", big / "hard2")
    (big / "sub").mkdir()
    for d in ("up", "work"):
        (tmp_path / d).mkdir()
    return tmp_path


@pytest.fixture
def fs(tree: Path) -> Iterator[WritableUnionFS]:
    cfg = MountConfig(lowers=(b(tree / "low"),), upper=b(tree / "up"), mountpoint=b(tree / "mnt-unused"),
                      workdir=b(tree / "work"))
    core = WritableUnionFS(cfg)
    yield core
    core.close()


def _plus(fs: WritableUnionFS, ino: int) -> dict[bytes, int]:
    """Read directory *ino* as the native engine answers READDIRPLUS, every entry the kernel
    takes remembered; name -> node number of the entries that came with a node."""
    out = {}
    for _, name, node, attr in fs.readdir_at(ino, 0, plain=False, lean=True):
        if node is not None:
            fs.remember(node)
            out[name] = attr.ino
    return out


def _listed(fs: WritableUnionFS) -> tuple[int, dict[bytes, int]]:
    big, _ = lookup_path(fs, "big")
    return big, _plus(fs, big)


def test_a_big_listing_read_with_attributes_holds_its_files_as_columns(fs: WritableUnionFS, tree: Path) -> None:
    _, inos = _listed(fs)
    assert len(inos) == N + 3  # (hard2 is hard's node, which the kernel then holds: a bare entry)
    assert len(fs.inodes.residents) == N + 1  # the files and the symlink
    for name in (b"hard2" if b"hard2" in inos else b"hard", b"sub"):  # (a hard link, a directory: full nodes)
        assert inos[name] in fs.inodes.nodes
    before = len(fs.inodes.nodes)
    for i in range(N):
        ino, lower = inos[_name(i).encode()], os.lstat(tree / "low" / "big" / _name(i))
        attr = fs.getattr(ino)
        assert (attr.ino, attr.size, attr.mode, attr.mtime_ns) == (lower.st_ino, lower.st_size, lower.st_mode,
                                                                 lower.st_mtime_ns)
        assert errno_of(lambda ino=ino: fs.getxattr(ino, b"security.selinux")) == errno.ENODATA
        assert errno_of(lambda ino=ino: fs.getxattr(ino, b"system.posix_acl_access")) == errno.ENODATA
    assert fs.getxattr(inos[_name(7).encode()], b"user.colour") == b"blue"
    assert fs.listxattr(inos[_name(7).encode()]) == [b"user.colour"]
    assert len(fs.inodes.nodes) == before and len(fs.inodes.residents) == N + 1  # (reads make no node)
    assert fs.usage()["resident_nodes"] == N + 1


def test_a_small_listing_keeps_full_nodes(fs: WritableUnionFS, tree: Path) -> None:
    for i in range(5):
        (tree / "low" / "small" / _name(i)).parent.mkdir(exist_ok=True)
        (tree / "low" / "small" / _name(i)).write_bytes(b"x")
    small, _ = lookup_path(fs, "small")
    assert len(_plus(fs, small)) == 5 and len(fs.inodes.residents) == 0


def test_a_held_node_costs_under_100_bytes(fs: WritableUnionFS, tree: Path) -> None:
    """What ``ls -l`` leaves behind, per entry: the listing, its nodes, what xattr reads noted."""
    big = tree / "low" / "many"
    big.mkdir()
    count = 20_000
    for i in range(count):
        os.close(os.open(big / f"entry{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644))
    many, _ = lookup_path(fs, "many")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        inos = list(_plus(fs, many).values())
        for ino in inos:
            for name in (b"security.selinux", b"system.posix_acl_access"):
                errno_of(lambda ino=ino, name=name: fs.getxattr(ino, name))
        listed = len(inos)
        del inos  # (the test's own)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert listed == count and len(fs.inodes.residents) == count
    assert held / count < 100, f"{held / count:.0f} bytes a held entry"


def test_an_open_reads_the_file_and_makes_its_node_full(fs: WritableUnionFS) -> None:
    _, inos = _listed(fs)
    ino = inos[_name(3).encode()]
    assert read_file(fs, ino) == _name(3).encode()
    node = fs.inodes.nodes[ino]
    assert (node.path, node.lookups) == (b"big/" + _name(3).encode(), 1)
    assert ino not in [t.inos[p] for t, p in fs.inodes.residents]


def test_a_lookup_by_name_takes_the_same_node_and_its_lookups(fs: WritableUnionFS) -> None:
    big, inos = _listed(fs)
    ino = inos[_name(4).encode()]
    node, attr = fs.lookup(big, _name(4).encode())
    assert node.ino == attr.ino == ino and node.lookups == 2
    fs.forget(ino, 1)
    assert ino in fs.inodes
    fs.forget(ino, 1)
    assert ino not in fs.inodes


def test_a_second_listing_gives_held_files_without_a_new_reference(fs: WritableUnionFS) -> None:
    big, inos = _listed(fs)
    assert _plus(fs, big) == {}  # (every entry the kernel holds already goes bare)
    ino = inos[_name(5).encode()]
    fs.forget(ino, 1)
    assert ino not in fs.inodes  # one reference, so one forget


def test_a_new_listing_of_the_directory_gives_held_files_bare_and_the_rest_resident(fs: WritableUnionFS) -> None:
    """After the listing is dropped (caches dropped), a new one lists the same files in a second
    table: the ones the kernel still holds come bare, the ones it forgot become resident again."""
    big, inos = _listed(fs)
    files = [inos[_name(i).encode()] for i in range(N)]
    for ino in files[: N // 2]:
        fs.forget(ino, 1)
    fs.drop_caches()
    again = _plus(fs, big)
    assert sorted(again.values()) == sorted(files[: N // 2])
    assert len(fs.inodes.residents) == N + 1
    for ino in files:
        assert fs.getattr(ino).ino == ino
        fs.forget(ino, 1)
    fs.forget(inos[b"link"], 1)
    assert len(fs.inodes.residents) == 0 and fs.inodes.residents.only(big, []) is not None


def test_unlinked_files_old_node_still_reaches_the_old_file(fs: WritableUnionFS, tree: Path) -> None:
    big, inos = _listed(fs)
    ino = inos[_name(6).encode()]
    fs.unlink(big, _name(6).encode())
    fh, _, _ = fs.create(big, _name(6).encode(), 0o644, os.O_WRONLY | os.O_CREAT, DAEMON)
    fs.release(fh)
    node = fs.inodes.nodes[ino]
    assert node.gone
    assert fs.getattr(ino).size == len(_name(6))
    assert read_file(fs, ino) == _name(6).encode()
    new, _ = fs.lookup(big, _name(6).encode())
    assert new.ino != ino


def test_renamed_file_keeps_its_node(fs: WritableUnionFS, tree: Path) -> None:
    big, inos = _listed(fs)
    ino = inos[_name(8).encode()]
    fs.rename(big, _name(8).encode(), big, b"moved", 0)
    assert fs.inodes.nodes[ino].path == b"big/moved"
    assert read_file(fs, ino) == _name(8).encode()
    assert fs.lookup(big, b"moved")[0].ino == ino
    assert errno_of(lambda: fs.lookup(big, _name(8).encode())) == errno.ENOENT


def test_copy_up_keeps_the_number_and_reaches_the_copy(fs: WritableUnionFS, tree: Path) -> None:
    _, inos = _listed(fs)
    ino = inos[_name(9).encode()]
    fs.setattr(ino, SetAttr(mode=0o600), None)
    up = os.lstat(tree / "up" / "big" / _name(9))
    assert stat.S_IMODE(up.st_mode) == 0o600
    attr = fs.getattr(ino)
    assert attr.ino == ino and stat.S_IMODE(attr.mode) == 0o600
    assert stat.S_IMODE(os.lstat(tree / "low" / "big" / _name(9)).st_mode) != 0o600  # (the lower is never written)


def test_symlink_is_read_through_its_node(fs: WritableUnionFS) -> None:
    _, inos = _listed(fs)
    assert fs.readlink(inos[b"link"]) == b"target-of-link"


def test_forgets_drop_residents_and_a_nearly_empty_table_becomes_full_nodes(fs: WritableUnionFS) -> None:
    _, inos = _listed(fs)
    files = [inos[_name(i).encode()] for i in range(N)]
    keep = files[:10]
    for ino in files[10:]:
        fs.forget(ino, 1)
    assert len(fs.inodes.residents) == 0  # (the symlink and the ten left were made full)
    for ino in keep:
        assert fs.inodes.nodes[ino].lookups == 1
        assert fs.getattr(ino).ino == ino
    fs.forget(inos[b"link"], 1)
    for ino in keep:
        fs.forget(ino, 1)
        assert ino not in fs.inodes


def test_dropping_caches_names_every_resident_node(fs: WritableUnionFS) -> None:
    big, inos = _listed(fs)
    forget = fs.drop_caches()
    assert set(inos.values()) <= set(forget.inodes)
    assert {(big, n) for n in inos} <= set(forget.entries)


def test_nodes_are_only_made_of_what_the_layer_still_holds(fs: WritableUnionFS, tree: Path) -> None:
    """A lower changed under the mount (which it must not be) makes no node of another file."""
    _, inos = _listed(fs)
    ino = inos[_name(10).encode()]
    os.replace(tree / "low" / "big" / _name(11), tree / "low" / "big" / _name(10))
    assert errno_of(lambda: fs.getattr(ino)) == errno.ESTALE
    assert errno_of(lambda: fs.open(ino, os.O_RDONLY)) == errno.ESTALE


def test_the_hash_finds_every_member_through_growth_and_removal() -> None:
    """Against a dict: adds, removes (backward shifts), growth and shrinking, colliding numbers."""
    rng = random.Random(17)
    res = Residents()
    names = [b"x"] * 5000
    model: dict[int, tuple[int, int]] = {}
    free = list(range(5000))
    rng.shuffle(free)
    for step in range(30_000):
        if model and (rng.random() < 0.45 or not free):
            ino = rng.choice(list(model))
            found = res.find(ino)
            assert found is not None
            assert found[0].parent == model[ino][0] and found[1] == model[ino][1]
            res.remove(*found)
            free.append(model.pop(ino)[1])
        else:
            ino = rng.choice((rng.getrandbits(40) + 2, (rng.getrandbits(8) << 48) | rng.getrandbits(10) * 1024))
            if ino in model:
                continue
            pos = free.pop()
            res.add(7, 0, names, pos, ino)
            model[ino] = (7, pos)
        if step % 997 == 0:
            for ino, (_, pos) in model.items():
                found = res.find(ino)
                assert found is not None and found[1] == pos
            assert res.find(1) is None and len(res) == len(model)


def test_full_nodes_are_the_default_for_everything_else(fs: WritableUnionFS) -> None:
    """A plain READDIR makes no nodes at all."""
    big, _ = lookup_path(fs, "big")
    for _, _, node, _ in fs.readdir_at(big, 0, plain=True, lean=True):
        assert node is None
    assert len(fs.inodes.residents) == 0
    assert isinstance(fs.inodes[1], Node)
